"""``specmq generate``: whole-generation jobs through the broker's generate queue to fused workers.

Text mode streams each completion as its ``Tokens`` arrive, in prompt order (``workers.generate_client``).
``--json`` prints one object per prompt with the same keys as ``specmq draft --json``.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from specmq.cliutil import add_command, print_json
from specmq.commands.draft import add_prompt_args, add_sampling_args, check_common, read_prompt_args
from workers.draft_worker import DEFAULT_BROKER, DEFAULT_MODEL


def _run(args: argparse.Namespace) -> int:
    check_common(args)
    prompts = read_prompt_args(args)
    from broker.curve import client_kwargs
    from workers.generate_client import OrderedStream, run_jobs

    stream = None if args.json else OrderedStream(prompts)
    curve = client_kwargs(args)  # CurveError and DraftError: one line each, like CommandError
    results = asyncio.run(run_jobs(prompts, broker=args.broker, model=args.model, max_new_tokens=args.max_new_tokens,
                                   gamma=0 if args.gamma == "auto" else args.gamma, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                   concurrency=args.concurrency, timeout=args.timeout,
                                   connect_timeout=args.connect_timeout, stream=stream, curve=curve,
                                   queue_timeout=args.queue_timeout))
    if args.json:
        for r in results:
            print_json(r.to_json())
    failed = [r for r in results if r.error]
    if failed:
        print(f"specmq generate: {len(failed)} of {len(results)} prompts failed; first: [{failed[0].index}] "
              f"{failed[0].error}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "generate", help="send whole-generation jobs to fused workers", json_flag=True,
                    description="Send whole-generation jobs through the broker's generate queue to fused "
                                "workers; text mode streams completions in prompt order.",
                    example="specmq generate --prompt 'def fib(n):' --max-new-tokens 64 --gamma 4", func=_run)
    p.add_argument("--broker", default=DEFAULT_BROKER, help=f"broker frontend (default: {DEFAULT_BROKER})")
    # --gamma (from add_sampling_args): a job's gamma; 'auto' (or 0) leaves it to the fused worker's configuration
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="directory whose tokenizer encodes prompts and decodes streams (default: models/tiny-draft)")
    add_prompt_args(p)
    add_sampling_args(p)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus truncation (default: 1)")
    from broker.curve import add_client_flags

    add_client_flags(p)
    for action in p._actions:
        if action.dest == "timeout":
            action.default = 30.0
            action.help = "seconds without any message from a job before it fails (default: 30)"

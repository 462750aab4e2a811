"""``specmq fused``: serve whole generate jobs with a draft and a target engine in one process."""
from __future__ import annotations

import argparse
import socket

from specmq.cliutil import add_worker_liveness_flags, CommandError, add_command, positive
from workers.serving import (DEFAULT_BACKEND, DEFAULT_DRAFT_MODEL, DEFAULT_TARGET_MODEL, capture_graphs,
                             load_engine_or_fail, run_service)


def _run(args: argparse.Namespace) -> int:
    from workers.fused_worker import FusedConfig, serve_fused
    from workers.tokenizer_text import TokenizerError, load_tokenizer

    from specmq.commands.draft import gamma_value

    try:
        args.gamma = gamma_value(args.gamma)
    except argparse.ArgumentTypeError as exc:
        raise CommandError(f"--gamma {exc}") from None
    auto = args.gamma == "auto"
    if auto:
        args.gamma = 4  # the γ of a job before the controller has planned it is never used: the controller decides
    for name in ("gamma", "jobs", "max_gamma", "prefill_chunk", "max_batch_tokens", "max_batch_rows"):
        positive(name.replace("_", "-"), getattr(args, name))
    if args.tpot_slo_ms is not None:
        positive("tpot-slo-ms", args.tpot_slo_ms, 0.001)
    if args.cost_table:
        from workers.cost_table import load_table

        load_table(args.cost_table)  # CostTableError: one line naming the file and the problem
    positive("tick-ms", args.tick_ms, 0)
    target = load_engine_or_fail(args.target_model, device=args.device, dtype=args.dtype, slots=args.jobs,
                                 max_context=args.max_context, backend=args.backend, what="target model",
                                 grow=args.grow)
    draft = load_engine_or_fail(args.draft_model, device=args.device, dtype=args.dtype, slots=args.jobs,
                                max_context=args.max_context, backend=args.backend, what="draft model",
                                grow=args.draft_grow)
    if args.capture:
        capture_graphs(target, "target model")
        capture_graphs(draft, "draft model")
    tf, df = target.info.tokenizer_fingerprint, draft.info.tokenizer_fingerprint
    if tf and df and tf != df:
        raise CommandError(f"draft tokenizer {df} ({args.draft_model}) != target tokenizer {tf} ({args.target_model})")
    try:
        tokenizer = load_tokenizer(args.target_model)
    except TokenizerError as exc:
        raise CommandError(str(exc)) from None
    config = FusedConfig(gamma=args.gamma, max_gamma=args.max_gamma, adaptive_gamma=bool(args.adaptive_gamma),
                         prefill_chunk=args.prefill_chunk, max_batch_tokens=args.max_batch_tokens,
                         max_batch_rows=args.max_batch_rows, tick_ms=args.tick_ms,
                         name=args.name or f"fused@{socket.gethostname()}", auto=auto, cost_table=args.cost_table,
                         tpot_slo_ms=args.tpot_slo_ms)
    return run_service(lambda stop: serve_fused(args.broker, draft, target, tokenizer, config, stop=stop,
                                                heartbeat_interval=args.heartbeat_interval,
                                                liveness=args.liveness))


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "fused", help="run a fused (draft + target) worker",
                    example="specmq fused --broker tcp://127.0.0.1:5556 --gamma 4 --jobs 8 --prefill-chunk 128",
                    func=_run)
    p.add_argument("--broker", default=DEFAULT_BACKEND, help=f"broker backend address (default: {DEFAULT_BACKEND})")
    p.add_argument("--target-model", default=str(DEFAULT_TARGET_MODEL), help="target HF model directory "
                   "(default: shipped models/tiny-target)")
    p.add_argument("--draft-model", default=str(DEFAULT_DRAFT_MODEL), help="draft HF model directory "
                   "(default: shipped models/tiny-draft)")
    p.add_argument("--grow", default=None, metavar="SHAPE",
                   help="grow the target model in memory to this shape (llama-3.1-8b, or key=value pairs as in "
                        "'specmq model grow'): same outputs at that shape's cost (default: off)")
    p.add_argument("--draft-grow", default=None, metavar="SHAPE",
                   help="the draft model grown likewise, e.g. llama-3.2-1b (default: off)")
    p.add_argument("--gamma", default=4,
                   help="draft tokens per round when a job names none, or 'auto': the goodput controller chooses "
                        "every job's gamma each tick from the batch and the step cost (docs/goodput.md) (default: 4)")
    p.add_argument("--cost-table", default=None, metavar="FILE",
                   help="step-cost table (specmq profile; target and draft grids) for --gamma auto (default: the "
                        "whole tick's cost fitted online)")
    p.add_argument("--tpot-slo-ms", type=float, default=None,
                   help="with --gamma auto: keep every job's predicted time per output token under this")
    p.add_argument("--max-gamma", type=int, default=16,
                   help="largest gamma a job may ask for, and the ceiling of --adaptive-gamma (default: 16)")
    p.add_argument("--adaptive-gamma", action="store_true",
                   help="choose every job's gamma each round from its acceptance rate (AdaptiveGamma, 1..max-gamma) "
                        "instead of the job's fixed gamma (default: off)")
    p.add_argument("--jobs", type=int, default=8, help="concurrent jobs (credit and KV slots) (default: 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--no-capture", dest="capture", action="store_false",
                   help="capture CUDA graphs on first use instead of at start (backend cuda; default: at start)")
    p.add_argument("--backend", default="auto",
                   help="engine backend of both models: auto, llama, cuda (CUDA graphs), reference (default: auto)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--max-context", type=int, default=None, help="tokens per slot (default: model's, at most 2048)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens of one new job per tick, prefilled while running jobs keep their rounds "
                        "(default: 256)")
    p.add_argument("--max-batch-tokens", type=int, default=512,
                   help="target forward tokens per tick: rounds (gamma+1 each) first, prefill chunks in the rest "
                        "(default: 512)")
    p.add_argument("--max-batch-rows", type=int, default=64, help="target forward rows per tick (default: 64)")
    p.add_argument("--tick-ms", type=float, default=0.0,
                   help="longest an idle worker's new job waits for more jobs to share its first tick (default: 0)")
    p.add_argument("--name", default="", help="worker name shown in stats (default: fused@HOST)")
    add_worker_liveness_flags(p)

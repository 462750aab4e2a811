"""``specmq draft``: run prompts through the broker's target workers with a local draft model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specmq.cliutil import CommandError, add_command, print_json
from workers.draft_worker import DEFAULT_BROKER, DEFAULT_MODEL

ADAPTIVE_HELP = (
    "adaptive gamma (workers/adaptive_gamma.py): each session estimates its per-token acceptance alpha as an EWMA "
    "of accepted / examined draft tokens (weight 0.3, alpha starts at 0.6) and drafts the gamma in "
    "[1, --max-gamma] that maximises expected committed tokens per unit cost, (1 - alpha^(g+1)) / (1 - alpha) "
    "divided by (g * 0.1 + 1) (one draft forward costs ~0.1 of a verify)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """--prompt / --prompt-file (shared with ``specmq generate``)."""
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for several); or use --prompt-file")
    p.add_argument("--prompt-file", type=Path, default=None,
                   help="prompts: plain text one per line, or .jsonl with {\"prompt\": ...} per line")


def read_prompt_args(args: argparse.Namespace) -> list[str]:
    """The prompts named by --prompt / --prompt-file, in order; CommandError when none or unreadable."""
    prompts: list[str] = list(args.prompt or [])
    if args.prompt_file is not None:
        prompts += _read_prompt_file(args.prompt_file)
    if not prompts:
        raise CommandError("no prompts: give --prompt TEXT or --prompt-file FILE")
    return prompts


def _read_prompt_file(path: Path) -> list[str]:
    from workers.prompts import PromptFileError, read_prompts

    try:
        return read_prompts(path)
    except PromptFileError as exc:
        raise CommandError(str(exc)) from None


def check_common(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise CommandError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.gamma < 1:
        raise CommandError(f"--gamma must be >= 1, got {args.gamma}")
    if args.concurrency < 1:
        raise CommandError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.temperature < 0:
        raise CommandError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < getattr(args, "top_p", 1.0) <= 1:
        raise CommandError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.timeout <= 0:
        raise CommandError(f"--timeout must be > 0, got {args.timeout}")


def print_text_result(r: dict, out=sys.stdout) -> None:
    """One prompt's completion and a stats line (text mode)."""
    head = r["prompt"].splitlines()[0] if r["prompt"] else ""
    print(f"=== [{r['index']}] {head[:70]}", file=out)
    if r.get("error"):
        print(f"!!! failed: {r['error']}", file=out)
    print(r["prompt"] + r["text"], file=out)
    print(f"--- {r['new_tokens']} tokens in {r['rounds']} rounds, acceptance {r['acceptance_rate']:.2f} "
          f"({r['accepted']}/{r['drafted']}), {r['mean_accepted']:.2f} accepted/round, "
          f"{r['tokens_per_s']:.1f} tok/s, {r['wall_s']:.2f} s", file=out, flush=True)


def _run(args: argparse.Namespace) -> int:
    from workers.draft_worker import DraftConfig, run_prompts, write_profile

    check_common(args)
    if args.max_gamma < 1:
        raise CommandError(f"--max-gamma must be >= 1, got {args.max_gamma}")
    if args.link_delay_ms < 0:
        raise CommandError(f"--link-delay-ms must be >= 0, got {args.link_delay_ms}")
    if args.profile is not None and args.profile.suffix.lower() not in (".csv", ".json"):
        raise CommandError(f"--profile {args.profile}: name a .csv or .json file")
    if not Path(args.model).is_dir():
        raise CommandError(f"--model {args.model}: not a directory")
    prompts = read_prompt_args(args)
    try:
        from workers.sampling import SamplingError, SamplingParams

        SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    except SamplingError as exc:
        raise CommandError(str(exc)) from None
    from broker.curve import client_kwargs

    curve = client_kwargs(args)  # CurveError: one line, like CommandError
    cfg = DraftConfig(broker=args.broker, model=args.model, max_new_tokens=args.max_new_tokens, gamma=args.gamma,
                      adaptive_gamma=args.adaptive_gamma, max_gamma=args.max_gamma, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed, concurrency=args.concurrency,
                      link_delay_ms=args.link_delay_ms, timeout=args.timeout, connect_timeout=args.connect_timeout,
                      policy=args.policy, threads=args.threads, curve=curve)
    results, rows = run_prompts(cfg, prompts)  # DraftError: one line, like CommandError
    for r in results:
        d = r.to_json()
        print_json(d) if args.json else print_text_result(d)
    if args.profile is not None:
        write_profile(args.profile, rows)
    failed = [r for r in results if r.error]
    if failed:
        print(f"specmq draft: {len(failed)} of {len(results)} prompts failed; first: [{failed[0].index}] "
              f"{failed[0].error}", file=sys.stderr)
        return 1
    return 0


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round (default: 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples, lossless")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i (default: 0)")
    p.add_argument("--concurrency", type=int, default=16, help="prompts in flight at once (default: 16)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for a reply before resending (3 resends) (default: 10)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="the broker must answer within this many seconds at start (default: 5)")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "draft", help="run a draft worker over prompts", json_flag=True,
                    description="Draft tokens locally for many prompts at once and have the broker's target "
                                "workers verify them. " + ADAPTIVE_HELP + ".",
                    example="specmq draft --prompt-file examples/prompts.txt --gamma 4 --concurrency 16 --json",
                    func=_run)
    p.add_argument("--broker", default=DEFAULT_BROKER, help=f"broker frontend (default: {DEFAULT_BROKER})")
    from broker.curve import add_client_flags

    add_client_flags(p)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="draft model directory (default: models/tiny-draft)")
    add_prompt_args(p)
    add_sampling_args(p)
    p.add_argument("--adaptive-gamma", action="store_true", help=ADAPTIVE_HELP)
    p.add_argument("--max-gamma", type=int, default=8, help="ceiling of --adaptive-gamma (default: 8)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus truncation of the draft and target (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="top-k truncation, 0 = off (default: 0)")
    p.add_argument("--policy", default="exact", help="acceptance policy on the target (default: exact, lossless)")
    p.add_argument("--profile", type=Path, default=None,
                   help="write per-round rows (session, round, gamma, accepted, draft_ms, network_ms, verify_ms) "
                        "to this .csv or .json file (network_ms = round trip minus verify_ms)")
    p.add_argument("--link-delay-ms", type=float, default=0.0,
                   help="artificial one-way delay added to every send and every receive (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for drafting (default: torch's choice)")

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


def gamma_value(text: str | int) -> int | str:
    """``--gamma``: "auto" or a whole number >= 0 (argparse type; also checks values from a --config file)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    else:
        try:
            value = int(str(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number >= 0, got {value}")
    return value


def check_common(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise CommandError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        args.gamma = gamma_value(args.gamma)
    except argparse.ArgumentTypeError as exc:
        raise CommandError(f"--gamma {exc}") from None
    if args.concurrency < 1:
        raise CommandError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.temperature < 0:
        raise CommandError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < getattr(args, "top_p", 1.0) <= 1:
        raise CommandError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.timeout <= 0:
        raise CommandError(f"--timeout must be > 0, got {args.timeout}")
    if args.queue_timeout <= 0:
        raise CommandError(f"--queue-timeout must be > 0, got {args.queue_timeout}")


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
    if args.decode_tokens < 1:
        raise CommandError(f"--decode-tokens must be >= 1, got {args.decode_tokens}")
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
                      queue_timeout=args.queue_timeout,
                      policy=args.policy, threads=args.threads, curve=curve, decode_tokens=args.decode_tokens,
                      device=args.device, dtype=args.dtype, backend=args.backend, grow=args.grow)
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
    p.add_argument("--gamma", type=gamma_value, default="auto",
                   help="draft tokens per round: 'auto' (the target's goodput controller picks each round's gamma, "
                        "0 included), a fixed number, or 0 (decode mode: the target decodes alone, no drafting) "
                        "(default: auto)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples, lossless")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i (default: 0)")
    p.add_argument("--concurrency", type=int, default=16, help="prompts in flight at once (default: 16)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for a reply before resending it, until --queue-timeout (default: 10)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="the broker must answer within this many seconds at start (default: 5)")
    p.add_argument("--queue-timeout", type=float, default=120.0,
                   help="seconds a session open, chunk or job may wait out overload (a full admission queue, Busy), "
                        "a draining or a restarting broker before it fails as overloaded (default: 120)")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "draft", help="run a draft worker over prompts", json_flag=True,
                    description="Draft tokens locally for many prompts at once and have the broker's target "
                                "workers verify them. By default the target chooses each round's gamma from its "
                                "batch and step cost (docs/goodput.md); --adaptive-gamma chooses it here from "
                                "acceptance alone: " + ADAPTIVE_HELP + ".",
                    example="specmq draft --prompt-file examples/prompts.txt --gamma 4 --concurrency 16 --json",
                    func=_run)
    p.add_argument("--broker", default=DEFAULT_BROKER, help=f"broker frontend (default: {DEFAULT_BROKER})")
    from broker.curve import add_client_flags

    add_client_flags(p)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="draft model directory (default: models/tiny-draft)")
    add_prompt_args(p)
    add_sampling_args(p)
    p.add_argument("--adaptive-gamma", action="store_true", help=ADAPTIVE_HELP)
    p.add_argument("--max-gamma", type=int, default=8, help="ceiling of --adaptive-gamma and auto (default: 8)")
    p.add_argument("--decode-tokens", type=int, default=8,
                   help="tokens one decode-mode request (gamma 0) asks the target for (default: 8)")
    from workers.engine import BACKENDS

    p.add_argument("--device", default="cpu", help="draft model device: cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", help="draft model dtype (default: float32)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="draft engine backend (default: auto)")
    p.add_argument("--grow", default=None, metavar="SHAPE",
                   help="grow the draft model in memory to this shape (e.g. llama-3.2-1b): same outputs at that "
                        "shape's cost (default: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus truncation of the draft and target (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="top-k truncation, 0 = off (default: 0)")
    p.add_argument("--policy", default="exact", help="acceptance policy on the target (default: exact, lossless)")
    p.add_argument("--profile", type=Path, default=None,
                   help="write per-round rows (session, round, gamma, accepted, draft_ms, network_ms, verify_ms, "
                        "queue_ms, batch, draft_wait_ms, path_ms, busy_wait_ms) to this .csv or .json file "
                        "(network_ms = round trip minus verify_ms; a round = draft_wait + draft + path + busy_wait "
                        "+ verify)")
    p.add_argument("--link-delay-ms", type=float, default=0.0,
                   help="artificial one-way delay added to every send and every receive (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for drafting (default: torch's choice)")

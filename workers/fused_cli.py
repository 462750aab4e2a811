"""``specmq fused``: serve whole generate jobs with a draft and a target engine in one process."""
from __future__ import annotations

import argparse
import socket

from specmq.cliutil import CommandError, add_command
from workers.serving import (DEFAULT_BACKEND, DEFAULT_DRAFT_MODEL, DEFAULT_TARGET_MODEL, capture_graphs,
                             load_engine_or_fail, positive, run_service)


def _run(args: argparse.Namespace) -> int:
    from workers.fused_worker import FusedConfig, serve_fused
    from workers.tokenizer_text import TokenizerError, load_tokenizer

    for name in ("gamma", "jobs", "max_gamma", "prefill_chunk"):
        positive(name.replace("_", "-"), getattr(args, name))
    target = load_engine_or_fail(args.target_model, device=args.device, dtype=args.dtype, slots=args.jobs,
                                 max_context=args.max_context, backend=args.backend, what="target model")
    draft = load_engine_or_fail(args.draft_model, device=args.device, dtype=args.dtype, slots=args.jobs,
                                max_context=args.max_context, backend=args.backend, what="draft model")
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
    config = FusedConfig(gamma=args.gamma, max_gamma=args.max_gamma, prefill_chunk=args.prefill_chunk,
                         name=args.name or f"fused@{socket.gethostname()}")
    return run_service(lambda stop: serve_fused(args.broker, draft, target, tokenizer, config, stop=stop,
                                                heartbeat_interval=args.heartbeat_interval,
                                                liveness=args.liveness))


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "fused", help="run a fused (draft + target) worker",
                    example="specmq fused --broker tcp://127.0.0.1:5556 --gamma 4 --jobs 8", func=_run)
    p.add_argument("--broker", default=DEFAULT_BACKEND, help=f"broker backend address (default: {DEFAULT_BACKEND})")
    p.add_argument("--target-model", default=str(DEFAULT_TARGET_MODEL), help="target HF model directory "
                   "(default: shipped models/tiny-target)")
    p.add_argument("--draft-model", default=str(DEFAULT_DRAFT_MODEL), help="draft HF model directory "
                   "(default: shipped models/tiny-draft)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round when a job names none (default: 4)")
    p.add_argument("--max-gamma", type=int, default=16, help="largest gamma a job may ask for (default: 16)")
    p.add_argument("--jobs", type=int, default=8, help="concurrent jobs (credit and KV slots) (default: 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--no-capture", dest="capture", action="store_false",
                   help="capture CUDA graphs on first use instead of at start (backend cuda; default: at start)")
    p.add_argument("--backend", default="auto",
                   help="engine backend of both models: auto, llama, cuda (CUDA graphs), reference (default: auto)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--max-context", type=int, default=None, help="tokens per slot (default: model's, at most 2048)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill forward (default: 256)")
    p.add_argument("--name", default="", help="worker name shown in stats (default: fused@HOST)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--liveness", type=int, default=3, help="missed beats before the broker is presumed dead")

"""``specmq target``: serve a target (verifier) model on the broker's backend until SIGINT/SIGTERM."""
from __future__ import annotations

import argparse
import socket

from specmq.cliutil import add_worker_liveness_flags, add_command, positive
from workers.serving import DEFAULT_BACKEND, DEFAULT_TARGET_MODEL, capture_graphs, load_engine_or_fail, run_service


def _run(args: argparse.Namespace) -> int:
    from workers.target_worker import TargetConfig, serve_target

    for name in ("slots", "max_batch_tokens", "max_batch_rows", "max_gamma", "prefill_chunk"):
        positive(name.replace("_", "-"), getattr(args, name))
    positive("tick-ms", args.tick_ms, 0)
    positive("max-decode", args.max_decode)
    if args.tpot_slo_ms is not None:
        positive("tpot-slo-ms", args.tpot_slo_ms, 0.001)
    if args.cost_table:
        from workers.cost_table import load_table

        load_table(args.cost_table)  # CostTableError: one line naming the file and the problem
    engine = load_engine_or_fail(args.model, device=args.device, dtype=args.dtype, slots=args.slots,
                                 max_context=args.max_context, backend=args.backend, what="target model",
                                 grow=args.grow)
    if args.capture:
        capture_graphs(engine, "target model")
    config = TargetConfig(tick_ms=args.tick_ms, max_batch_tokens=args.max_batch_tokens,
                          max_batch_rows=args.max_batch_rows, prefill_chunk=args.prefill_chunk,
                          max_gamma=args.max_gamma, name=args.name or f"target@{socket.gethostname()}",
                          max_decode=args.max_decode, controller=args.controller, tpot_slo_ms=args.tpot_slo_ms,
                          cost_table=args.cost_table)
    return run_service(lambda stop: serve_target(args.broker, engine, config, stop=stop,
                                                 heartbeat_interval=args.heartbeat_interval,
                                                 liveness=args.liveness))


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "target", help="run a target (verifier) worker",
                    example="specmq target --broker tcp://127.0.0.1:5556 --model models/tiny-target --slots 32",
                    func=_run)
    p.add_argument("--broker", default=DEFAULT_BACKEND, help=f"broker backend address (default: {DEFAULT_BACKEND})")
    p.add_argument("--model", default=str(DEFAULT_TARGET_MODEL), help="HF model directory (default: shipped "
                   "models/tiny-target)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--no-capture", dest="capture", action="store_false",
                   help="capture CUDA graphs on first use instead of at start (backend cuda; default: at start)")
    p.add_argument("--backend", default="auto",
                   help="engine backend: auto, llama, cuda (CUDA graphs), reference (default: auto)")
    p.add_argument("--grow", default=None, metavar="SHAPE",
                   help="grow the model in memory to this shape (llama-3.1-8b, llama-3.2-1b, or key=value pairs as in "
                        "'specmq model grow'): same outputs at that shape's cost (default: off)")
    p.add_argument("--slots", type=int, default=16, help="concurrent sessions (KV cache slots) (default: 16)")
    p.add_argument("--max-context", type=int, default=None, help="tokens per slot (default: model's, at most 2048)")
    p.add_argument("--tick-ms", type=float, default=2.0, help="longest a chunk waits for company (default: 2)")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per forward pass (default: 512)")
    p.add_argument("--max-batch-rows", type=int, default=64, help="sequences per forward pass (default: 64)")
    p.add_argument("--max-gamma", type=int, default=16, help="longest draft chunk accepted (default: 16)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per session per tick (default: 256)")
    p.add_argument("--max-decode", type=int, default=64,
                   help="most tokens one decode-mode request (a chunk with no draft tokens) may ask for (default: 64)")
    p.add_argument("--no-controller", dest="controller", action="store_false",
                   help="give drafters no gamma advice (default: the goodput controller picks each session's next "
                        "gamma, docs/goodput.md)")
    p.add_argument("--cost-table", default=None, metavar="FILE",
                   help="step-cost table (specmq profile) for the goodput controller (default: a cost line fitted "
                        "from measured ticks)")
    p.add_argument("--tpot-slo-ms", type=float, default=None,
                   help="the controller keeps every session's predicted time per output token under this "
                        "(default: none; goodput only)")
    p.add_argument("--name", default="", help="worker name shown in stats (default: target@HOST)")
    add_worker_liveness_flags(p)

"""``specmq echo-worker``: a model-free worker (``workers.echo_worker``) for tests and benchmarks."""
from __future__ import annotations

import argparse
import asyncio

from protocol.messages import WORKER_KINDS
from specmq.cliutil import add_worker_liveness_flags, CommandError, add_command


def _run(args: argparse.Namespace) -> int:
    from workers.echo_worker import serve_echo

    if args.kind not in WORKER_KINDS:
        raise CommandError(f"--kind must be target or fused, not {args.kind!r}")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(serve_echo(args.broker, args.kind, capacity=args.capacity, name=args.name,
                          vocab_size=args.vocab_size, heartbeat_interval=args.heartbeat_interval,
                          liveness=args.liveness, delay_ms=args.delay_ms))
    except KeyboardInterrupt:
        pass
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "echo-worker", help="run a model-free echo worker (testing and benchmarks)",
                    example="specmq echo-worker --broker tcp://127.0.0.1:5556 --kind target", func=_run)
    p.add_argument("--broker", default="tcp://127.0.0.1:5556", help="broker backend address")
    p.add_argument("--kind", default="target", help="target or fused (default: target)")
    p.add_argument("--capacity", type=int, default=256, help="session slots / concurrent jobs (default: 256)")
    p.add_argument("--name", default="echo", help="worker name shown in stats")
    p.add_argument("--vocab-size", type=int, default=32000, help="announced vocab size (default: 32000)")
    add_worker_liveness_flags(p)
    p.add_argument("--delay-ms", type=float, default=0.0, help="simulated work per batch (default: 0)")

"""``specmq broker``: run the ZeroMQ broker until SIGINT/SIGTERM (graceful: drain within --grace-s, exit 0)."""
from __future__ import annotations

import argparse

import zmq

from broker.routing import ROUTERS
from broker.state import BrokerConfig
from specmq.cliutil import CommandError, add_command


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    if args.router not in ROUTERS:
        raise CommandError(f"unknown --router {args.router!r}; choose one of {', '.join(sorted(ROUTERS))}")
    for name in ("heartbeat_interval", "grace_s"):
        if getattr(args, name) <= 0 and name != "grace_s":
            raise CommandError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("liveness", "max_queue", "max_frame", "max_deliveries", "hwm"):
        if int(getattr(args, name)) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1")
    return BrokerConfig(frontend=args.frontend, backend=args.backend, router=args.router,
                        heartbeat_interval=float(args.heartbeat_interval), liveness=int(args.liveness),
                        max_queue=int(args.max_queue), max_frame=int(args.max_frame),
                        max_deliveries=int(args.max_deliveries), grace_s=float(args.grace_s),
                        retry_ms=int(args.retry_ms), sndhwm=int(args.hwm), rcvhwm=int(args.hwm))


def _run(args: argparse.Namespace) -> int:
    from broker.broker import run_broker

    config = config_from_args(args)
    try:
        return run_broker(config)
    except zmq.ZMQError as exc:
        raise CommandError(f"cannot bind {config.frontend} / {config.backend}: {exc}") from None


def register(sub: argparse._SubParsersAction) -> None:
    d = BrokerConfig()
    p = add_command(sub, "broker", help="run the ZeroMQ broker",
                    example="specmq broker --frontend tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556 "
                            "--config configs/broker.yaml", func=_run)
    p.add_argument("--frontend", default=d.frontend, help=f"ROUTER for drafts and clients (default: {d.frontend})")
    p.add_argument("--backend", default=d.backend, help=f"ROUTER for target/fused workers (default: {d.backend})")
    p.add_argument("--router", default=d.router, help=f"session placement policy: {', '.join(sorted(ROUTERS))}")
    p.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval, help="seconds between beats")
    p.add_argument("--liveness", type=int, default=d.liveness, help="missed beats before a worker is dead")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="bound of each queue (then Busy)")
    p.add_argument("--max-frame", type=int, default=d.max_frame, help="largest accepted frame in bytes (1 MiB)")
    p.add_argument("--max-deliveries", type=int, default=d.max_deliveries, help="generate delivery cap")
    p.add_argument("--grace-s", type=float, default=d.grace_s, help="shutdown grace period in seconds")
    p.add_argument("--retry-ms", type=int, default=d.retry_ms, help="retry hint sent with Busy")
    p.add_argument("--hwm", type=int, default=d.sndhwm, help="SNDHWM/RCVHWM of both ROUTER sockets")

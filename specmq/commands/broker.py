"""``specmq broker``: run the ZeroMQ broker until SIGINT/SIGTERM (graceful: drain within --grace-s, exit 0).

Every flag is a ``BrokerConfig`` field of the same name (``--hwm`` is ``hwm``...), so ``configs/broker.yaml``
keys, flags and the dataclass agree.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

import zmq

from broker.routing import ROUTERS
from broker.state import BrokerConfig
from specmq.cliutil import CommandError, add_command


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    values = {f.name: getattr(args, f.name) for f in fields(BrokerConfig) if hasattr(args, f.name)}
    for f in fields(BrokerConfig):  # a YAML config may give "3" or 3.0 where a number goes
        if f.name in values and f.type in ("int", "float"):
            try:
                values[f.name] = (int if f.type == "int" else float)(values[f.name])
            except (TypeError, ValueError):
                raise CommandError(f"--{f.name.replace('_', '-')} must be a number, got {values[f.name]!r}") from None
    if values["router"] not in ROUTERS:
        raise CommandError(f"unknown --router {values['router']!r}; choose one of {', '.join(sorted(ROUTERS))}")
    if values["heartbeat_interval"] <= 0:
        raise CommandError("--heartbeat-interval must be > 0")
    if values["session_idle_s"] < 0:
        raise CommandError("--session-idle-s must be >= 0 (0 = never)")
    if values["queue_timeout_s"] <= 0:
        raise CommandError("--queue-timeout-s must be > 0")
    for name in ("liveness", "max_queue", "max_frame", "max_deliveries", "hwm"):
        if values[name] < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1")
    values.update(ops_config(args))
    return BrokerConfig(**values)


def ops_config(args: argparse.Namespace) -> dict:
    """Monitoring, capture and CURVE settings, checked before anything binds."""
    from pathlib import Path

    port = args.metrics_port
    if port is not None and not 0 <= int(port) <= 65535:
        raise CommandError(f"--metrics-port must be in 0..65535, got {port}")
    if int(args.capture_max_bytes) < 0:
        raise CommandError("--capture-max-bytes must be >= 0")
    if args.capture:
        parent = Path(args.capture).resolve().parent
        if not parent.is_dir():
            raise CommandError(f"--capture {args.capture}: directory {parent} does not exist")
    if bool(args.curve_secret) != bool(args.allow):
        raise CommandError("CURVE needs both --curve-secret (the broker's .key_secret) and --allow DIR")
    if args.curve_secret:
        from broker.curve import load_allowed, load_keypair

        load_keypair(args.curve_secret)  # CurveError: one line, like CommandError
        load_allowed(args.allow)
    stats_pub = args.stats_pub
    if stats_pub in ("off", "none"):
        stats_pub = ""
    return {"metrics_port": None if port is None else int(port), "metrics_host": args.metrics_host,
            "stats_pub": stats_pub, "capture": args.capture or "", "capture_max_bytes": int(args.capture_max_bytes),
            "curve_secret": args.curve_secret or "", "allow": args.allow or ""}


def _run(args: argparse.Namespace) -> int:
    from broker.broker import run_broker

    config = config_from_args(args)
    try:
        return run_broker(config)
    except zmq.ZMQError as exc:
        raise CommandError(f"cannot bind {config.frontend} / {config.backend} (or metrics / stats PUB): {exc}") from None
    except OSError as exc:
        raise CommandError(f"cannot start the broker: {exc}") from None


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
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="bound of each queue: verify queues, the generate queue and the admission queue of opens "
                        f"waiting for a target slot (then Busy) (default: {d.max_queue})")
    p.add_argument("--max-frame", type=int, default=d.max_frame, help="largest accepted frame in bytes (1 MiB)")
    p.add_argument("--max-deliveries", type=int, default=d.max_deliveries, help="generate delivery cap")
    p.add_argument("--grace-s", type=float, default=d.grace_s, help="shutdown grace period in seconds")
    p.add_argument("--retry-ms", type=int, default=d.retry_ms, help="retry hint sent with Busy")
    p.add_argument("--hwm", type=int, default=d.hwm, help="SNDHWM/RCVHWM of both ROUTER sockets")
    p.add_argument("--session-idle-s", type=float, default=d.session_idle_s,
                   help=f"close a session whose client is silent this long, freeing its target slot; 0 = never "
                        f"(default: {d.session_idle_s:g})")
    p.add_argument("--queue-timeout-s", type=float, default=d.queue_timeout_s,
                   help="longest an open or generate job waits for a slot when its client names no deadline, then "
                        f"Error(overloaded) (default: {d.queue_timeout_s:g})")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (default: off)")
    p.add_argument("--metrics-host", default=d.metrics_host, help=f"metrics bind address (default: {d.metrics_host})")
    p.add_argument("--stats-pub", default=d.stats_pub,
                   help="PUB address of 1 s stats snapshots; 'auto' = frontend port + 2, 'off' (default: auto)")
    p.add_argument("--capture", default="", help="record every message in and out to this file (msgpack)")
    p.add_argument("--capture-max-bytes", type=int, default=0, help="rotate the capture past this size (FILE.1, ...)")
    p.add_argument("--curve-secret", default="", help="broker CURVE secret key file: encrypts the frontend")
    p.add_argument("--allow", default="", help="directory of allowed client public keys (*.key), with --curve-secret")

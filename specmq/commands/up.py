"""``specmq up``: broker + target worker(s) + fused worker(s) on loopback, in one command.

Each piece runs as its own process (``python -m specmq.cli ...``, ``workers.local_cluster``), exactly as it would
be started by hand. ``up`` asks the broker for stats until every worker has registered, prints a ``ready`` line with
the addresses, then watches: Ctrl-C / SIGTERM stops everything it started (exit 0); a child that dies takes the rest
down and ``up`` exits 1 naming it.
"""
from __future__ import annotations

import argparse
import signal
import threading

from specmq.cliutil import CommandError, add_command


def _run(args: argparse.Namespace) -> int:
    from workers.local_cluster import LocalCluster

    if args.targets < 0 or args.fused < 0 or args.targets + args.fused < 1:
        raise CommandError("need at least one worker (--targets N and/or --fused N, each >= 0)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log = ["--log-level", args.log_level]
    ops = ((["--metrics-port", str(args.metrics_port)] if args.metrics_port is not None else [])
           + (["--capture", args.capture] if args.capture else []))
    with LocalCluster(args.frontend, args.backend) as cluster:
        cluster.start_broker(*ops, *log)
        for i in range(args.targets):
            cluster.start_worker("target", f"target{i}", "--device", args.device, "--slots", str(args.slots), *log,
                                 *(["--model", args.target_model] if args.target_model else []))
        for i in range(args.fused):
            cluster.start_worker("fused", f"fused{i}", "--device", args.device, "--jobs", str(args.jobs), *log,
                                 *(["--target-model", args.target_model] if args.target_model else []),
                                 *(["--draft-model", args.draft_model] if args.draft_model else []))
        # ClusterError (a child exited, or too few registered in time): one line, like CommandError
        if not cluster.wait_registered(count=args.targets + args.fused, timeout_s=args.ready_timeout, stop=stop):
            return 0
        http = ""
        if args.http is not None:
            from gateway.server import wait_listening

            proc = cluster.start("gateway", "serve", "--broker", cluster.frontend, "--listen",
                                 f"{args.http_host}:{args.http}", *log,
                                 *(["--tokenizer", args.target_model] if args.target_model else []))
            host = "127.0.0.1" if args.http_host in ("0.0.0.0", "::") else args.http_host
            url = f"http://{host}:{args.http}"
            wait_listening(url, args.ready_timeout, alive=lambda: proc.poll() is None)
            http = f" http={url}"
        print(f"specmq up: ready frontend={args.frontend} backend={args.backend} targets={args.targets} "
              f"fused={args.fused}{http}", flush=True)
        while not stop.wait(0.2):
            dead = cluster.exited()
            if dead is not None:
                raise CommandError(f"{dead.describe_exit()}; stopped the rest")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "up", help="start broker + target + fused workers on loopback in one command",
                    example="specmq up --targets 1 --fused 1", func=_run)
    p.add_argument("--frontend", default="tcp://127.0.0.1:5555", help="broker frontend (default: tcp://127.0.0.1:5555)")
    p.add_argument("--backend", default="tcp://127.0.0.1:5556", help="broker backend (default: tcp://127.0.0.1:5556)")
    p.add_argument("--targets", type=int, default=1, help="target workers (default: 1)")
    p.add_argument("--fused", type=int, default=1, help="fused workers (default: 1)")
    p.add_argument("--device", default="cpu", help="device for every worker: cpu or cuda[:N] (default: cpu)")
    p.add_argument("--target-model", default="", help="target model directory (default: the shipped one)")
    p.add_argument("--draft-model", default="", help="draft model directory (default: the shipped one)")
    p.add_argument("--slots", type=int, default=16, help="sessions per target worker (default: 16)")
    p.add_argument("--jobs", type=int, default=8, help="concurrent jobs per fused worker (default: 8)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for registration")
    p.add_argument("--metrics-port", type=int, default=None, help="broker: serve Prometheus metrics on this port")
    p.add_argument("--capture", default="", help="broker: record every message to this file (specmq capture)")
    p.add_argument("--http", type=int, default=None, metavar="PORT",
                   help="also start the OpenAI-compatible HTTP gateway (specmq serve) on this port (default: off)")
    p.add_argument("--http-host", default="127.0.0.1", help="address the HTTP gateway listens on (default: 127.0.0.1)")

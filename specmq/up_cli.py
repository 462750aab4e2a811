"""``specmq up``: broker + target worker(s) + fused worker(s) on loopback, in one command.

Each piece runs as its own process (``python -m specmq.cli ...``), exactly as it would be started by hand. ``up``
polls the broker (StatsRequest) until every worker has registered, prints a ``ready`` line with the addresses,
then watches: Ctrl-C / SIGTERM stops everything it started (exit 0); a child that dies takes the rest down and
``up`` exits 1 naming it.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from specmq.cliutil import CommandError, add_command

STOP_GRACE_S = 10.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen


def broker_stats(frontend: str, timeout_s: float = 0.5) -> dict | None:
    """One stats snapshot from the broker's frontend, or None when it does not answer in time."""
    import zmq

    from protocol.codec import decode, encode
    from protocol.messages import Stats, StatsRequest

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(frontend)
        sock.send(encode(StatsRequest()))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        msg = decode(sock.recv(), max_frame=1 << 26)
        return msg.snapshot if isinstance(msg, Stats) else None
    finally:
        sock.close(linger=0)


def stop_processes(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every live process (last started first), then SIGKILL whatever is still alive after ``grace_s``."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def stop_all(children: list[Child]) -> None:
    stop_processes([c.proc for c in children])


def _dead(children: list[Child]) -> Child | None:
    return next((c for c in children if c.proc.poll() is not None), None)


def _run(args: argparse.Namespace) -> int:
    if args.targets < 0 or args.fused < 0 or args.targets + args.fused < 1:
        raise CommandError("need at least one worker (--targets N and/or --fused N, each >= 0)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    base = [sys.executable, "-m", "specmq.cli"]
    log = ["--log-level", args.log_level]
    ops = ((["--metrics-port", str(args.metrics_port)] if args.metrics_port is not None else [])
           + (["--capture", args.capture] if args.capture else []))
    plan = [("broker", ["broker", "--frontend", args.frontend, "--backend", args.backend, *ops, *log])]
    for i in range(args.targets):
        cmd = ["target", "--broker", args.backend, "--device", args.device, "--name", f"target{i}",
               "--slots", str(args.slots), *log]
        plan.append((f"target{i}", cmd + (["--model", args.target_model] if args.target_model else [])))
    for i in range(args.fused):
        cmd = ["fused", "--broker", args.backend, "--device", args.device, "--name", f"fused{i}",
               "--jobs", str(args.jobs), *log]
        cmd += ["--target-model", args.target_model] if args.target_model else []
        cmd += ["--draft-model", args.draft_model] if args.draft_model else []
        plan.append((f"fused{i}", cmd))
    children: list[Child] = []
    try:
        for name, cmd in plan:
            children.append(Child(name, subprocess.Popen(base + cmd, stdin=subprocess.DEVNULL)))
        want = args.targets + args.fused
        deadline = time.monotonic() + args.ready_timeout
        while True:
            if stop.is_set():
                return 0
            dead = _dead(children)
            if dead is not None:
                raise CommandError(f"{dead.name} exited with code {dead.proc.returncode} before everything was ready")
            snap = broker_stats(args.frontend)
            if snap is not None and len(snap.get("workers", {})) >= want:
                break
            if time.monotonic() > deadline:
                got = 0 if snap is None else len(snap.get("workers", {}))
                raise CommandError(f"only {got} of {want} workers registered within {args.ready_timeout:g}s")
            stop.wait(0.2)
        print(f"specmq up: ready frontend={args.frontend} backend={args.backend} targets={args.targets} "
              f"fused={args.fused}", flush=True)
        while not stop.wait(0.2):
            dead = _dead(children)
            if dead is not None:
                raise CommandError(f"{dead.name} exited with code {dead.proc.returncode}; stopped the rest")
        return 0
    finally:
        stop_all(children)


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

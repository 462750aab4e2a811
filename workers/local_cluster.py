"""A broker and its workers as ``specmq`` subprocesses on loopback: start them, wait until registered, stop them.

One place for what ``specmq up``, the end-to-end benchmarks and the cluster tests all do::

    with LocalCluster(logdir=Path("logs")) as cluster:
        cluster.start_broker("--heartbeat-interval", "0.2")
        cluster.start_worker("target", "t0", "--slots", "8")
        cluster.wait_registered({"t0"})          # stats requests until the broker lists every name
        ...                                      # cluster.frontend / cluster.backend
    # leaving the block: SIGTERM to every process (last started first), SIGKILL to any still alive after the grace

Each process runs ``python -m specmq.cli ...`` exactly as it would be started by hand; its output goes to
``logdir/NAME.log`` when a log directory is given, else to this process's stdout and stderr.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from broker.client import request_stats
from protocol.errors import SpecmqError

STOP_GRACE_S = 10.0
POLL_S = 0.2  # between two readiness checks


class ClusterError(SpecmqError):
    """A process of the cluster exited early, or the workers did not register in time."""


def free_endpoint(host: str = "127.0.0.1") -> str:
    """``tcp://HOST:PORT`` with a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def stop_processes(procs: Iterable[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every live process (last started first), then SIGKILL whatever is still alive after ``grace_s``."""
    procs = list(procs)
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


@dataclass
class Service:
    """One process of the cluster."""

    name: str
    proc: subprocess.Popen
    log: Path | None = None
    _log_file: IO | None = None

    @property
    def exited(self) -> bool:
        return self.proc.poll() is not None

    def describe_exit(self) -> str:
        where = f" (log: {self.log})" if self.log is not None else ""
        return f"{self.name} exited with code {self.proc.returncode}{where}"


class LocalCluster:
    """Broker and workers on loopback; ``frontend`` / ``backend`` default to free ports on 127.0.0.1.

    ``env`` and ``cwd`` apply to every process (default: this process's); ``logdir``: one ``NAME.log`` per process.
    """

    def __init__(self, frontend: str | None = None, backend: str | None = None, *, logdir: Path | None = None,
                 env: dict[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.frontend = frontend or free_endpoint()
        self.backend = backend or free_endpoint()
        self.logdir = Path(logdir) if logdir is not None else None
        self.env = env
        self.cwd = cwd
        self.services: dict[str, Service] = {}

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ starting
    def start(self, name: str, *args: str, cpu: int | None = None) -> subprocess.Popen:
        """Run ``specmq ARGS...`` as the process ``name``; ``cpu``: pin it to that CPU (when there are several)."""
        if name in self.services:
            raise ValueError(f"a process named {name!r} is already part of the cluster")
        log_path = log_file = None
        if self.logdir is not None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            log_path = self.logdir / f"{name}.log"
            log_file = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None and cpu in cpus and len(cpus) > 1 else None
        proc = subprocess.Popen([sys.executable, "-m", "specmq.cli", *args], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT if log_file else None, env=self.env,
                                cwd=self.cwd, preexec_fn=pin)
        self.services[name] = Service(name, proc, log_path, log_file)
        return proc

    def start_broker(self, *flags: str, cpu: int | None = None) -> subprocess.Popen:
        """``specmq broker`` on this cluster's frontend and backend, named "broker"."""
        return self.start("broker", "broker", "--frontend", self.frontend, "--backend", self.backend, *flags, cpu=cpu)

    def start_worker(self, kind: str, name: str, *flags: str, cpu: int | None = None) -> subprocess.Popen:
        """``specmq KIND`` (target, fused, echo-worker) on the backend, registered under ``name``."""
        return self.start(name, kind, "--broker", self.backend, "--name", name, *flags, cpu=cpu)

    # ------------------------------------------------------------------ watching
    def snapshot(self, timeout_s: float = 1.0) -> dict | None:
        """The broker's stats snapshot, or None when it does not answer within ``timeout_s``."""
        return request_stats(self.frontend, timeout_s)

    def exited(self) -> Service | None:
        """The first process that has exited, if any."""
        return next((s for s in self.services.values() if s.exited), None)

    def wait_registered(self, names: Iterable[str] | None = None, *, count: int | None = None,
                        timeout_s: float = 120.0, stop: threading.Event | None = None) -> bool:
        """Wait until the broker lists every worker in ``names`` (or at least ``count`` workers).

        Returns False when ``stop`` was set first; raises ``ClusterError`` when a process exits before, or when
        ``timeout_s`` passes.
        """
        want = set(names or ())
        need = count if count is not None else len(want)
        deadline = time.monotonic() + timeout_s
        while True:
            if stop is not None and stop.is_set():
                return False
            dead = self.exited()
            if dead is not None:
                raise ClusterError(f"{dead.describe_exit()} before everything was ready")
            snap = self.snapshot(min(1.0, max(0.1, deadline - time.monotonic())))
            have = set((snap or {}).get("workers", {}))
            if snap is not None and want <= have and len(have) >= need:
                return True
            if time.monotonic() > deadline:
                missing = f" (missing: {', '.join(sorted(want - have))})" if want - have else ""
                raise ClusterError(f"only {len(have)} of {need} workers registered within {timeout_s:g}s{missing}")
            if stop is not None:
                stop.wait(POLL_S)
            else:
                time.sleep(POLL_S)

    # ------------------------------------------------------------------ stopping
    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash, for fault tests)."""
        proc = self.services[name].proc
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every process (last started first), SIGKILL those still alive after ``grace_s``."""
        stop_processes([s.proc for s in self.services.values()], grace_s)
        for s in self.services.values():
            if s._log_file is not None:
                s._log_file.close()
                s._log_file = None

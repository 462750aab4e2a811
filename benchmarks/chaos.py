"""Soak under random faults: steady drafter sessions and generate jobs while targets, fused workers and the broker are
killed (-9), frozen (SIGSTOP) and restarted; every finished output is checked against target-only greedy decoding.

A broker, ``--targets`` target workers and ``--fused`` fused workers run as processes (``workers.local_cluster``);
this process runs the load: ``--sessions`` drafter sessions at once (``workers.draft_worker``'s sessions, one
batched draft model), each lane starting its next prompt as soon as one finishes, plus ``--jobs`` generate jobs at
once. Every ``--fault-every`` seconds (default: random in 5-10 s), once every process is back, one fault from
``--faults`` hits a random victim:

- ``target-kill`` / ``fused-kill``: SIGKILL, then the same worker is started again (it loads and re-registers);
- ``target-stop`` / ``fused-stop`` / ``broker-stop``: SIGSTOP for ``--stop-s``, then SIGCONT (its peers declare it
  dead meanwhile);
- ``broker-kill`` / ``broker-term``: SIGKILL, or SIGTERM (a drain of ``--grace-s``), then a new broker on the same
  ports after ``--restart-gap-s``.

Recovery of a fault: from the signal until every session or job it affected has received a new token (sessions
placed on the victim target; every job in flight for a fused fault, since a client cannot see which fused worker
holds its job; everything in flight for a broker fault, counting only tokens served once the broker is back, since
a draining broker still delivers what was in flight). A unit that fails makes its fault unrecovered.

Reported: sessions and jobs completed, lost (failed, or unfinished ``--drain-s`` after the soak ended), wrong
(finished with an output other than target-only greedy), duplicated and missing tokens, p50/p99 recovery per fault
kind, and each process's RSS over time (/proc). A progress line goes to stderr; the report is written, with the
machine and the command, to ``--output`` (default ``benchmarks/results/chaos_cpu.md``). Exit 1 when anything was
lost or wrong.

    specmq bench chaos --minutes 2 --sessions 20 --seed 1
    specmq bench chaos --minutes 10 --sessions 20 --faults target-kill,broker-kill --json
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import itertools
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks import BenchmarkError, print_json, quiet_logs

HELP = "soak under random faults (kill -9, SIGSTOP, restarts of targets, fused workers, broker); checks every output"
DESCRIPTION = __doc__.split("\n\n")[0]
EXAMPLE = "specmq bench chaos --minutes 2 --sessions 20 --seed 1"
ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "models" / "tiny-target"
DRAFT = ROOT / "models" / "tiny-draft"
PROMPT_FILE = ROOT / "examples" / "prompts.txt"
RESULTS = ROOT / "benchmarks" / "results" / "chaos_cpu.md"
FAULT_KINDS = ("target-kill", "target-stop", "fused-kill", "fused-stop", "broker-kill", "broker-term", "broker-stop")
HEALTH_TIMEOUT_S = 180.0  # longest wait for every process to be registered again before the next fault


@dataclass
class SoakConfig:
    minutes: float = 2.0
    sessions: int = 20  # concurrent drafter sessions
    jobs: int = 2  # concurrent generate jobs
    seed: int = 0
    fault_every: float | None = None  # None: uniform in [5, 10] s
    faults: tuple[str, ...] = FAULT_KINDS
    targets: int = 2
    fused: int = 2
    max_new_tokens: int = 32
    gamma: int = 3
    link_delay_ms: float = 0.0
    stop_s: float = 3.0
    restart_gap_s: float = 1.0
    grace_s: float = 1.0
    heartbeat_interval: float = 0.2
    liveness: int = 5
    timeout: float = 5.0  # a client's per-try request timeout
    queue_timeout: float = 120.0  # how long a request or job waits out overload and restarts
    drain_s: float = 60.0
    rss_every_s: float = 5.0
    threads: int = 1


# --------------------------------------------------------------------------- outputs
def classify(got: Sequence[int], want: Sequence[int]) -> tuple[str, int]:
    """("ok", 0), ("duplicated", extra tokens), ("missing", absent tokens) or ("wrong", first differing position)."""
    got, want = list(got), list(want)
    if got == want:
        return "ok", 0
    if len(got) > len(want) and _subsequence(want, got):
        return "duplicated", len(got) - len(want)
    if len(got) < len(want) and _subsequence(got, want):
        return "missing", len(want) - len(got)
    return "wrong", next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def _subsequence(short: list[int], long: list[int]) -> bool:
    it = iter(long)
    return all(t in it for t in short)


def target_only(prompts_ids: Sequence[Sequence[int]], max_new: int) -> list[list[int]]:
    """Target-only greedy ids of each prompt (the reference every output must equal)."""
    from workers.engine import load_engine
    from workers.sampling import SamplingParams
    from workers.speculation import autoregressive_generate

    engine = load_engine(TARGET, slots=1, max_context=max(len(p) for p in prompts_ids) + max_new + 8)
    return [autoregressive_generate(engine, list(p), max_new, SamplingParams()).tokens for p in prompts_ids]


@dataclass
class JobOutcome:
    index: int
    prompt: str
    streamed: list[int] = field(default_factory=list)  # Tokens in order, repeats dropped by index (as clients do)
    token_ids: list[int] = field(default_factory=list)  # Done's ids
    finished: bool = False
    error: str | None = None


# --------------------------------------------------------------------------- faults and their recovery
@dataclass
class Fault:
    kind: str
    victim: str
    at: float  # time.monotonic() of the signal
    t_s: float  # seconds into the soak
    affected: int
    pending: set[str]
    count_after: float  # tokens delivered before this time do not recover the fault
    lost: int = 0
    recovered_s: float | None = None

    def row(self) -> dict[str, Any]:
        return {"kind": "fault", "t_s": round(self.t_s, 2), "fault": self.kind, "victim": self.victim,
                "affected": self.affected, "recovery_s": None if self.recovered_s is None else round(self.recovered_s, 3),
                "lost": self.lost, "unresolved": len(self.pending)}


class Ledger:
    """Where every session runs, which units (``s:SESSION``, ``j:JOB``) are in flight, and each fault's recovery.

    Written from the load's event loop (client replies) and read from the fault loop, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.placement: dict[str, str] = {}  # session unit -> target name (from SessionOpened.worker)
        self.active: set[str] = set()
        self.faults: list[Fault] = []
        self._open: list[Fault] = []

    def start(self, unit: str) -> None:
        with self.lock:
            self.active.add(unit)

    def placed(self, unit: str, worker: str) -> None:
        with self.lock:
            self.placement[unit] = worker

    def commit(self, unit: str) -> None:
        now = time.monotonic()
        with self.lock:
            for f in self._open:
                if unit in f.pending and now > f.count_after:
                    f.pending.discard(unit)
            self._close(now)

    def end(self, unit: str, ok: bool) -> None:
        now = time.monotonic()
        with self.lock:
            self.active.discard(unit)
            self.placement.pop(unit, None)
            for f in self._open:
                if unit in f.pending:
                    f.pending.discard(unit)
                    f.lost += not ok
            self._close(now)

    def _close(self, now: float) -> None:
        still = []
        for f in self._open:
            if f.pending:
                still.append(f)
            elif f.lost == 0:
                f.recovered_s = now - f.at
        self._open = still

    def resume(self, fault: Fault) -> None:
        """The broker is back (restarted, or continued): from now on tokens recover ``fault``."""
        with self.lock:
            fault.count_after = time.monotonic()

    def fault(self, kind: str, victim: str, t_s: float) -> Fault:
        """Record a fault about to happen, with the units it affects right now; a broker fault counts tokens only
        after ``resume``."""
        with self.lock:
            if kind.startswith("target"):
                units = {u for u in self.active if self.placement.get(u) == victim}
            elif kind.startswith("fused"):
                units = {u for u in self.active if u.startswith("j:")}
            else:
                units = set(self.active)
            at = time.monotonic()
            f = Fault(kind, victim, at, t_s, len(units), units, math.inf if kind.startswith("broker") else at)
            self.faults.append(f)
            if units:
                self._open.append(f)
            return f


def watched_client_class(ledger: Ledger) -> type:
    """A ``BrokerClient`` that tells ``ledger`` about every placement and every token delivery it receives."""
    from broker.client import BrokerClient
    from protocol.messages import Done, Result, SessionOpened, Tokens

    class WatchedClient(BrokerClient):
        def _deliver(self, msg: Any) -> None:
            if isinstance(msg, Result):
                if msg.tokens:
                    ledger.commit("s:" + msg.session)
            elif isinstance(msg, SessionOpened):
                ledger.placed("s:" + msg.session, msg.worker)
            elif isinstance(msg, Done) or (isinstance(msg, Tokens) and msg.tokens):
                ledger.commit("j:" + msg.job)
            super()._deliver(msg)

    return WatchedClient


# --------------------------------------------------------------------------- the load (its own thread and loop)
class SoakLoad:
    """``sessions`` drafter lanes and ``jobs`` generate lanes, each starting its next prompt when one ends."""

    def __init__(self, cfg: SoakConfig, frontend: str, prompts: list[tuple[str, list[int]]], ledger: Ledger) -> None:
        self.cfg = cfg
        self.frontend = frontend
        self.prompts = prompts
        self.ledger = ledger
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.sessions: list[Any] = []  # workers.draft_worker.PromptResult, in order of completion
        self.jobs: list[JobOutcome] = []
        self.error: BaseException | None = None
        self._count = itertools.count()
        self._thread = threading.Thread(target=self._main, name="chaos-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _main(self) -> None:
        try:
            asyncio.run(self.main())
        except Exception as exc:  # surfaced by the fault loop
            self.error = exc
            self.ready.set()

    async def main(self) -> None:
        from workers.draft_worker import DraftBatcher, DraftConfig, DraftWorker, probe_broker

        cfg = self.cfg
        client_cls = watched_client_class(self.ledger)
        drafts = client_cls(self.frontend, timeout=cfg.timeout)
        jobs = client_cls(self.frontend, timeout=cfg.timeout)
        config = DraftConfig(broker=self.frontend, model=DRAFT, max_new_tokens=cfg.max_new_tokens, gamma=cfg.gamma,
                             max_gamma=max(8, cfg.gamma), concurrency=cfg.sessions, timeout=cfg.timeout,
                             queue_timeout=cfg.queue_timeout, threads=cfg.threads)
        drafter = DraftWorker(config)
        await drafts.start()
        await jobs.start()
        batch_task = None
        try:
            await probe_broker(drafts, self.frontend, 10.0)
            drafter._load([ids for _, ids in self.prompts] * cfg.sessions)  # one draft slot per lane
            batcher = DraftBatcher(drafter.engine, config.gather_ms / 1000.0)
            batch_task = asyncio.create_task(batcher.run())
            run_id = uuid.uuid4().hex[:6]
            lanes = [asyncio.create_task(self.session_lane(drafter, drafts, batcher, run_id))
                     for _ in range(cfg.sessions)]
            lanes += [asyncio.create_task(self.job_lane(jobs, run_id)) for _ in range(cfg.jobs)]
            self.ready.set()
            while not self.stop.is_set():
                await asyncio.sleep(0.1)
                for t in lanes:
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise t.exception()
            _, pending = await asyncio.wait(lanes, timeout=cfg.drain_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            if batch_task is not None:
                batch_task.cancel()
                await asyncio.gather(batch_task, return_exceptions=True)
            await drafts.close()
            await jobs.close()

    def _next(self) -> tuple[int, str, list[int]]:
        n = next(self._count)
        prompt, ids = self.prompts[n % len(self.prompts)]
        return n, prompt, ids

    async def session_lane(self, drafter: Any, client: Any, batcher: Any, run_id: str) -> None:
        from workers.draft_worker import PromptResult

        while not self.stop.is_set():
            n, prompt, ids = self._next()
            res = PromptResult(n, prompt, list(ids))
            sid = f"{run_id}-{n}"
            self.ledger.start("s:" + sid)
            try:
                await drafter._session(client, batcher, res, sid)
            except asyncio.CancelledError:
                res.error, res.error_code = res.error or "unfinished when the soak ended", "unfinished"
                raise
            finally:
                self.ledger.end("s:" + sid, ok=res.error is None and res.finished)
                self.sessions.append(res)

    async def job_lane(self, client: Any, run_id: str) -> None:
        from protocol.messages import Done, Error, Generate, Tokens

        cfg = self.cfg
        while not self.stop.is_set():
            n, prompt, ids = self._next()
            out = JobOutcome(n, prompt)
            jid = f"{run_id}-g{n}"
            self.ledger.start("j:" + jid)
            job = Generate(job=jid, prompt_ids=list(ids), max_new_tokens=cfg.max_new_tokens, gamma=cfg.gamma,
                           seed=n, queue_timeout_s=cfg.queue_timeout)
            try:
                async for msg in client.generate(job, timeout=max(30.0, 6 * cfg.timeout),
                                                 queue_timeout=cfg.queue_timeout):
                    if isinstance(msg, Tokens):
                        if msg.index <= len(out.streamed):
                            out.streamed += list(msg.tokens)[len(out.streamed) - msg.index:]
                        else:  # a gap: keep what came, the check will call it missing or wrong
                            out.streamed += list(msg.tokens)
                    elif isinstance(msg, Done):
                        out.token_ids, out.finished = list(msg.token_ids), True
                    elif isinstance(msg, Error):
                        out.error = f"{msg.code}: {msg.message}"
            except TimeoutError as exc:
                out.error = str(exc)
            except asyncio.CancelledError:
                out.error = "unfinished when the soak ended"
                raise
            finally:
                self.ledger.end("j:" + jid, ok=out.finished and out.error is None)
                self.jobs.append(out)


# --------------------------------------------------------------------------- processes
def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MB (/proc), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


class SoakCluster:
    """Broker, targets ``t0..``, fused workers ``f0..`` (``workers.local_cluster``); restarts keep name and ports."""

    def __init__(self, cfg: SoakConfig, logdir: Path) -> None:
        from workers.local_cluster import LocalCluster

        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), PYTHONPATH=path, PYTHONUNBUFFERED="1")
        self.cfg = cfg
        self.local = LocalCluster(logdir=logdir, env=env, cwd=ROOT)
        self.frontend = self.local.frontend
        self.logdir = logdir
        self.targets = [f"t{i}" for i in range(cfg.targets)]
        self.fused = [f"f{i}" for i in range(cfg.fused)]
        self.restarts: dict[str, int] = {}
        self.unexpected_exits = 0
        hb = ("--heartbeat-interval", str(cfg.heartbeat_interval), "--liveness", str(cfg.liveness))
        self.broker_flags = (*hb, "--stats-pub", "off", "--grace-s", str(cfg.grace_s))
        self.worker_args = {t: ("target", t, "--model", str(TARGET), "--slots", str(cfg.sessions), *hb)
                            for t in self.targets}
        self.worker_args.update({f: ("fused", f, "--target-model", str(TARGET), "--draft-model", str(DRAFT),
                                     "--jobs", str(max(2, cfg.jobs)), "--gamma", str(cfg.gamma), *hb)
                                 for f in self.fused})

    @property
    def workers(self) -> list[str]:
        return self.targets + self.fused

    def start(self) -> None:
        self.local.start_broker(*self.broker_flags)
        for name in self.workers:
            self.local.start_worker(*self.worker_args[name])

    def pids(self) -> dict[str, int]:
        return {name: s.proc.pid for name, s in list(self.local.services.items()) if not s.exited}

    def restart(self, name: str) -> None:
        """Start ``name`` again (the old process has exited); its old log is kept as ``NAME.log.N``."""
        old = self.local.services.pop(name)
        if old._log_file is not None:
            old._log_file.close()
        n = self.restarts[name] = self.restarts.get(name, 0) + 1
        if old.log is not None and old.log.exists():
            old.log.rename(old.log.with_name(f"{old.log.name}.{n}"))
        if name == "broker":
            self.local.start_broker(*self.broker_flags)
        else:
            self.local.start_worker(*self.worker_args[name])

    def healthy(self) -> bool:
        """Every process runs and the broker lists every worker with a fresh heartbeat."""
        for name, s in list(self.local.services.items()):
            if s.exited:  # not one of our faults (they restart at once): start it again and count it
                self.unexpected_exits += 1
                self.restart(name)
                return False
        snap = self.local.snapshot(1.0)
        if snap is None:
            return False
        fresh = self.cfg.heartbeat_interval * self.cfg.liveness
        live = {label.split("#")[0] for label, w in snap.get("workers", {}).items()
                if w.get("heartbeat_age_s", 0) < fresh}
        return set(self.workers) <= live

    def signal(self, name: str, sig: int) -> None:
        self.local.services[name].proc.send_signal(sig)

    def inject(self, kind: str, victim: str, resume: Callable[[], None]) -> None:
        """Do the fault (its record is made by the caller right before); ``resume()`` is called right before the
        broker comes back (restart or SIGCONT)."""
        cfg = self.cfg
        if kind == "broker-kill":
            self.local.kill("broker")
            time.sleep(cfg.restart_gap_s)  # the outage itself
            resume()
            self.restart("broker")
        elif kind == "broker-term":
            self.signal("broker", signal.SIGTERM)
            try:
                self.local.services["broker"].proc.wait(cfg.grace_s + 15)
            except subprocess.TimeoutExpired:
                self.local.kill("broker")
            time.sleep(cfg.restart_gap_s)
            resume()
            self.restart("broker")
        elif kind.endswith("-kill"):
            self.local.kill(victim)
            self.restart(victim)
        else:  # -stop
            self.signal(victim, signal.SIGSTOP)
            try:
                time.sleep(cfg.stop_s)  # the fault itself
            finally:
                if victim == "broker":
                    resume()
                self.signal(victim, signal.SIGCONT)

    def close(self) -> None:
        for s in self.local.services.values():
            if not s.exited:
                s.proc.send_signal(signal.SIGCONT)  # a stopped process would sit out SIGTERM
        self.local.stop(grace_s=15.0)


# --------------------------------------------------------------------------- the soak
@dataclass
class SoakOutcome:
    cfg: SoakConfig
    wall_s: float
    sessions: list[Any]
    jobs: list[JobOutcome]
    faults: list[Fault]
    rss: dict[str, list[tuple[float, float]]]
    reference: dict[str, list[int]]
    restarts: dict[str, int]
    unexpected_exits: int
    health_wait_s: float
    logdir: Path


def run_soak(cfg: SoakConfig, prompts: list[str], logdir: Path, progress: bool = True) -> SoakOutcome:
    import torch

    from workers.tokenizer_text import encode, load_tokenizer

    torch.set_num_threads(cfg.threads)
    tok = load_tokenizer(DRAFT)
    prompts_ids = [(p, encode(tok, p)) for p in dict.fromkeys(prompts)]
    if any(not ids for _, ids in prompts_ids):
        raise BenchmarkError("a prompt tokenizes to nothing")
    reference = dict(zip((p for p, _ in prompts_ids), target_only([ids for _, ids in prompts_ids],
                                                                  cfg.max_new_tokens)))
    rng = random.Random(cfg.seed)
    ledger = Ledger()
    cluster = SoakCluster(cfg, logdir)
    load: SoakLoad | None = None
    watcher: Watcher | None = None
    health_wait = 0.0
    t0 = time.monotonic()
    try:
        cluster.start()
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while not cluster.healthy():
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the workers did not register within {HEALTH_TIMEOUT_S:g} s (logs: {logdir})")
            time.sleep(0.2)
        load = SoakLoad(cfg, cluster.frontend, prompts_ids, ledger)
        load.start()
        if not load.ready.wait(120) or load.error is not None:
            raise BenchmarkError(f"the load did not start: {load.error or 'no drafter within 120 s'}")
        t0 = time.monotonic()
        watcher = Watcher(cfg, cluster, load, ledger, reference, t0, progress)
        watcher.start()
        end = t0 + cfg.minutes * 60
        next_fault = t0 + _interval(cfg, rng)
        while time.monotonic() < end:
            if load.error is not None:
                raise BenchmarkError(f"the load failed: {type(load.error).__name__}: {load.error}")
            if time.monotonic() < next_fault:
                time.sleep(0.1)
                continue
            waited = time.monotonic()
            while not cluster.healthy() and time.monotonic() < end:  # every process back before the next fault
                if time.monotonic() - waited > HEALTH_TIMEOUT_S:
                    raise BenchmarkError(f"the cluster did not recover within {HEALTH_TIMEOUT_S:g} s (logs: {logdir})")
                time.sleep(0.2)
            health_wait += time.monotonic() - waited
            if time.monotonic() >= end:
                break
            kind = rng.choice(cfg.faults)
            victim = "broker" if kind.startswith("broker") else rng.choice(
                cluster.targets if kind.startswith("target") else cluster.fused)
            fault = ledger.fault(kind, victim, time.monotonic() - t0)
            cluster.inject(kind, victim, functools.partial(ledger.resume, fault))
            next_fault = time.monotonic() + _interval(cfg, rng)
        load.stop.set()
        if not load.join(cfg.drain_s + 30):
            raise BenchmarkError("the load did not stop after the soak")
    finally:
        if watcher is not None:
            watcher.close()
        if load is not None:
            load.stop.set()
            load.join(cfg.drain_s + 30)
        cluster.close()
    return SoakOutcome(cfg, time.monotonic() - t0, list(load.sessions), list(load.jobs), list(ledger.faults),
                       watcher.rss, reference, dict(cluster.restarts), cluster.unexpected_exits, health_wait, logdir)


def _interval(cfg: SoakConfig, rng: random.Random) -> float:
    return cfg.fault_every if cfg.fault_every is not None else rng.uniform(5.0, 10.0)


class Watcher:
    """From its own thread: each process's RSS every ``rss_every_s`` and the progress line (stderr) every 2 s, so
    both go on while the fault loop waits out a SIGSTOP or a restart."""

    def __init__(self, cfg: SoakConfig, cluster: SoakCluster, load: SoakLoad, ledger: Ledger,
                 reference: dict[str, list[int]], t0: float, progress: bool) -> None:
        self.cfg, self.cluster, self.load, self.ledger, self.reference = cfg, cluster, load, ledger, reference
        self.t0 = t0
        self.progress = progress
        self.rss: dict[str, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chaos-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()
        if self.progress:
            self.line(final=True)

    def _main(self) -> None:
        next_rss = next_line = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_rss:
                self.sample()
                next_rss = now + self.cfg.rss_every_s
            if self.progress and now >= next_line:
                self.line()
                next_line = now + 2.0
            self._stop.wait(0.5)

    def sample(self) -> None:
        t = round(time.monotonic() - self.t0, 1)
        for name, pid in dict(self.cluster.pids(), bench=os.getpid()).items():
            mb = rss_mb(pid)
            if mb is not None:
                self.rss.setdefault(name, []).append((t, round(mb, 1)))

    def line(self, final: bool = False) -> None:
        sessions, jobs, ref = list(self.load.sessions), list(self.load.jobs), self.reference
        ok = sum(1 for r in sessions if r.error is None and r.token_ids == ref[r.prompt])
        lost = sum(1 for r in sessions if r.error is not None)
        jok = sum(1 for j in jobs if j.error is None and j.token_ids == ref[j.prompt])
        jlost = sum(1 for j in jobs if j.error is not None)
        faults = list(self.ledger.faults)
        last = f" | last: {faults[-1].kind} {faults[-1].victim}" if faults else ""
        line = (f"chaos {time.monotonic() - self.t0:5.0f}/{self.cfg.minutes * 60:.0f} s | sessions {ok} ok, "
                f"{lost} lost, {len(sessions) - ok - lost} wrong | jobs {jok} ok, {jlost} lost, "
                f"{len(jobs) - jok - jlost} wrong | faults {len(faults)}{last}")
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line.ljust(120) + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# --------------------------------------------------------------------------- report
def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    vals = sorted(values)
    rank = math.ceil(q / 100 * len(vals))
    return vals[min(len(vals), max(1, rank)) - 1]


def summarize(out: SoakOutcome) -> list[dict[str, Any]]:
    """Rows: one summary, one per fault kind (recovery), one per fault, one per process (RSS)."""
    cfg = out.cfg
    counts = {"duplicated_tokens": 0, "missing_tokens": 0}

    def tally(units: list[tuple[str | None, bool, list[int], list[int]]]) -> dict[str, int]:
        c = {"completed": 0, "lost": 0, "unfinished": 0, "wrong": 0}
        for error, finished, got, want in units:
            if error is not None or not finished:
                c["unfinished" if error is None or error.startswith("unfinished") else "lost"] += 1
                continue
            c["completed"] += 1
            verdict, n = classify(got, want)
            if verdict != "ok":
                c["wrong"] += 1
                if verdict in ("duplicated", "missing"):
                    counts[f"{verdict}_tokens"] += n
        return c

    s = tally([(r.error, r.finished, r.token_ids, out.reference[r.prompt]) for r in out.sessions])
    streamed_bad = sum(1 for j in out.jobs if j.finished and j.error is None and j.streamed != j.token_ids)
    j = tally([(x.error, x.finished, x.token_ids, out.reference[x.prompt]) for x in out.jobs])
    for x in out.jobs:  # the stream a client shows must hold the same tokens as Done
        if x.finished and x.error is None and x.streamed != x.token_ids:
            verdict, n = classify(x.streamed, x.token_ids)
            if verdict in ("duplicated", "missing"):
                counts[f"{verdict}_tokens"] += n
    errors = sorted({r.error for r in out.sessions if r.error} | {x.error for x in out.jobs if x.error})
    summary = {"kind": "summary", "minutes": cfg.minutes, "sessions": cfg.sessions, "jobs": cfg.jobs,
               "seed": cfg.seed, "fault_every_s": cfg.fault_every or "5-10", "faults": len(out.faults),
               "wall_s": round(out.wall_s, 1), "sessions_completed": s["completed"], "sessions_lost": s["lost"],
               "sessions_unfinished": s["unfinished"], "sessions_wrong": s["wrong"],
               "jobs_completed": j["completed"], "jobs_lost": j["lost"], "jobs_unfinished": j["unfinished"],
               "jobs_wrong": j["wrong"], "jobs_stream_mismatch": streamed_bad, **counts,
               "tokens": sum(len(r.token_ids) for r in out.sessions) + sum(len(x.token_ids) for x in out.jobs),
               "restarts": sum(out.restarts.values()), "unexpected_exits": out.unexpected_exits,
               "health_wait_s": round(out.health_wait_s, 1), "first_errors": errors[:3]}
    rows = [summary]
    for kind in cfg.faults:
        fs = [f for f in out.faults if f.kind == kind]
        hit = [f for f in fs if f.affected]
        rec = [f.recovered_s for f in hit if f.recovered_s is not None]
        rows.append({"kind": "recovery", "fault": kind, "injected": len(fs), "hit": len(hit),
                     "recovered": len(rec), "unrecovered": len(hit) - len(rec),
                     "affected_mean": round(sum(f.affected for f in hit) / len(hit), 1) if hit else None,
                     "p50_s": _r(percentile(rec, 50)), "p99_s": _r(percentile(rec, 99)), "max_s": _r(max(rec, default=None))})
    rows += [f.row() for f in out.faults]
    for name, samples in sorted(out.rss.items()):
        mbs = [mb for _, mb in samples]
        rows.append({"kind": "rss", "process": name, "restarts": out.restarts.get(name, 0), "start_mb": mbs[0],
                     "end_mb": mbs[-1], "max_mb": max(mbs), "samples": samples})
    return rows


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _table(rows: list[dict], columns: Sequence[str]) -> list[str]:
    cells = [[("-" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return out


def _md_table(rows: list[dict], columns: Sequence[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in columns) + " |" for r in rows]
    return out


RECOVERY_COLS = ("fault", "injected", "hit", "recovered", "unrecovered", "affected_mean", "p50_s", "p99_s", "max_s")
FAULT_COLS = ("t_s", "fault", "victim", "affected", "recovery_s", "lost", "unresolved")
RSS_COLS = ("process", "restarts", "start_mb", "end_mb", "max_mb")
OUTCOME_KEYS = ("sessions_completed", "sessions_lost", "sessions_unfinished", "sessions_wrong", "jobs_completed",
                "jobs_lost", "jobs_unfinished", "jobs_wrong", "jobs_stream_mismatch", "duplicated_tokens",
                "missing_tokens", "tokens", "faults", "restarts", "unexpected_exits", "wall_s")


def print_report(rows: list[dict]) -> None:
    summary = rows[0]
    print("outcome: " + ", ".join(f"{k}={summary[k]}" for k in OUTCOME_KEYS))
    if summary["first_errors"]:
        print("first errors: " + " | ".join(summary["first_errors"]))
    print("\nrecovery per fault kind (s: from the signal until every affected session/job had a new token)")
    print("\n".join(_table([r for r in rows if r["kind"] == "recovery"], RECOVERY_COLS)))
    print("\nRSS per process (MB)")
    print("\n".join(_table([r for r in rows if r["kind"] == "rss"], RSS_COLS)), flush=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_v = torch.__version__
    except ImportError:
        torch_v = "absent"
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return (f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch_v}")


def write_markdown(path: Path, rows: list[dict], command: str) -> None:
    summary = rows[0]
    lines = [
        "# specmq bench chaos (CPU)", "",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        (f"- load average (1/5/15 min) when written: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (other work "
         "on the machine shares its cores with the soak)"),
        ("- load: drafter sessions and generate jobs on the shipped pair (float32), every output compared with "
         "target-only greedy; faults every few seconds on targets, fused workers and the broker "
         "(`benchmarks/chaos.py` says how each is done and what recovery means)"), "",
        "## Outcome", "", *_md_table([summary], OUTCOME_KEYS), "",
    ]
    if summary["first_errors"]:
        lines += ["First errors: " + " | ".join(f"`{e}`" for e in summary["first_errors"]), ""]
    lines += ["## Recovery per fault kind", "",
              "Seconds from the signal until every session or job it affected had a new token.", "",
              *_md_table([r for r in rows if r["kind"] == "recovery"], RECOVERY_COLS), "",
              "## Faults", "", *_md_table([r for r in rows if r["kind"] == "fault"], FAULT_COLS), "",
              "## RSS per process (MB)", "", *_md_table([r for r in rows if r["kind"] == "rss"], RSS_COLS), "",
              "RSS over time (seconds into the soak: MB):", ""]
    for r in rows:
        if r["kind"] == "rss":
            samples = r["samples"]
            step = max(1, math.ceil(len(samples) / 24))  # a readable line; --json has every sample
            shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
            lines.append(f"- {r['process']}: " + ", ".join(f"{t:g}: {mb:g}" for t, mb in shown))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- command
def config_from_args(args: argparse.Namespace) -> SoakConfig:
    faults = tuple(f.strip() for f in str(args.faults).split(",") if f.strip())
    unknown = [f for f in faults if f not in FAULT_KINDS]
    if not faults or unknown:
        raise BenchmarkError(f"--faults: unknown {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(FAULT_KINDS)}")
    if args.minutes <= 0:
        raise BenchmarkError(f"--minutes must be > 0, got {args.minutes}")
    for name in ("sessions", "max_new_tokens", "gamma", "targets"):
        if getattr(args, name) < 1:
            raise BenchmarkError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.jobs < 0 or args.fused < 0:
        raise BenchmarkError("--jobs and --fused must be >= 0")
    if args.fault_every is not None and args.fault_every <= 0:
        raise BenchmarkError(f"--fault-every must be > 0, got {args.fault_every}")
    if (args.jobs or any(f.startswith("fused") for f in faults)) and args.fused < 1:
        raise BenchmarkError("generate jobs and fused faults need --fused >= 1")
    if args.stop_s < 0 or args.restart_gap_s < 0:
        raise BenchmarkError("--stop-s and --restart-gap-s must be >= 0")
    return SoakConfig(minutes=args.minutes, sessions=args.sessions, jobs=args.jobs, seed=args.seed,
                      fault_every=args.fault_every, faults=faults, targets=args.targets, fused=args.fused,
                      max_new_tokens=args.max_new_tokens, gamma=args.gamma, stop_s=args.stop_s,
                      restart_gap_s=args.restart_gap_s, drain_s=args.drain_s)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from workers.prompts import PromptFileError, read_prompts

    try:
        prompts = read_prompts(args.prompt_file)
    except PromptFileError as exc:
        raise BenchmarkError(str(exc)) from None
    quiet_logs("error")  # the processes' own logs are in --logdir; the drafter here would flood the progress line
    logdir = Path(args.logdir) if args.logdir else Path(tempfile.mkdtemp(prefix="specmq-chaos-"))
    out = run_soak(cfg, prompts, logdir)
    rows = summarize(out)
    if args.json:
        for r in rows:
            print_json(r)
    else:
        print_report(rows)
    command = "specmq " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.output:
        write_markdown(Path(args.output), rows, command)
    s = rows[0]
    bad = {k: s[k] for k in ("sessions_lost", "sessions_unfinished", "sessions_wrong", "jobs_lost",
                             "jobs_unfinished", "jobs_wrong", "jobs_stream_mismatch") if s[k]}
    if bad:
        raise BenchmarkError("not lossless under faults: " + ", ".join(f"{k}={v}" for k, v in bad.items())
                             + f" (logs: {logdir})")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=2.0, help="length of the soak (default: 2)")
    p.add_argument("--sessions", type=int, default=20, help="concurrent drafter sessions (default: 20)")
    p.add_argument("--jobs", type=int, default=2, help="concurrent generate jobs (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (kinds, victims, gaps) "
                   "(default: 0)")
    p.add_argument("--fault-every", type=float, default=None, metavar="S",
                   help="seconds between faults (default: random in 5-10)")
    p.add_argument("--faults", default=",".join(FAULT_KINDS),
                   help=f"comma list of fault kinds to draw from (default: all: {','.join(FAULT_KINDS)})")
    p.add_argument("--targets", type=int, default=2, help="target workers (default: 2)")
    p.add_argument("--fused", type=int, default=2, help="fused workers (default: 2)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per session and job (default: 32)")
    p.add_argument("--gamma", type=int, default=3, help="draft tokens per round (default: 3)")
    p.add_argument("--stop-s", type=float, default=3.0, help="SIGSTOP length (default: 3)")
    p.add_argument("--restart-gap-s", type=float, default=1.0,
                   help="seconds the broker stays down before it restarts (default: 1)")
    p.add_argument("--drain-s", type=float, default=60.0,
                   help="after the soak, how long running sessions may take to finish (default: 60)")
    p.add_argument("--prompt-file", type=Path, default=PROMPT_FILE,
                   help="prompts the lanes cycle through (default: examples/prompts.txt)")
    p.add_argument("--logdir", default="", help="keep every process's log here (default: a temporary directory)")
    p.add_argument("--output", default=str(RESULTS),
                   help="markdown report with machine and command; '' = none (default: "
                        "benchmarks/results/chaos_cpu.md)")

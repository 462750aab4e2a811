"""Chaos: one fault per test, injected into real processes on loopback while results flow.

Each test starts its own broker and workers (``workers.local_cluster``) with fast heartbeats, runs drafter sessions
(``specmq draft``) or generate jobs (``specmq generate``) on the shipped float32 pair, injects one fault once the
broker's stats show work flowing, and checks what DESIGN.md (liveness, queues, faults) promises: every
session completes, every output equals target-only greedy decoding token for token (nothing duplicated, nothing
lost), and a client that has to fail says why. Faults: kill -9 of a target, of a fused worker, of the broker
(restarted on the same ports), SIGTERM of the broker (restarted), SIGSTOP of a target, 10x overload, kill -9 of a
drafter, a CURVE key the broker does not list.

Every process a test starts is stopped by the ``chaos`` fixture even when the test fails; waits are conditions on
the broker's stats with timeouts; the only fixed waits are the faults' own durations (``STOP_S``, ``RESTART_GAP_S``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from benchmarks.chaos import classify
from workers.local_cluster import ClusterError, LocalCluster, Service, stop_processes

pytestmark = pytest.mark.slow  # real processes; the whole file takes a few minutes on 2 cores

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "models" / "tiny-target"
DRAFT = ROOT / "models" / "tiny-draft"
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os", "def read_config(path):", "for i in range(10):"]
MAX_NEW = 32
HB = ("--heartbeat-interval", "0.2", "--liveness", "5")  # a silent peer is dead after 1 s
STOP_S = 3.0  # SIGSTOP length: well past the 1 s liveness window
RESTART_GAP_S = 1.0  # the broker is down this long before it comes back on the same ports
LINK_DELAY_MS = "20"  # slows a drafter's rounds so a fault lands mid-session
FLOW_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 150.0


# --------------------------------------------------------------------------- reference
@pytest.fixture(scope="module")
def reference(one_torch_thread) -> dict[str, list[int]]:
    """Target-only greedy ids of every prompt (``MAX_NEW`` tokens; shorter runs compare with a prefix)."""
    from workers.engine import load_engine
    from workers.sampling import SamplingParams
    from workers.speculation import autoregressive_generate
    from workers.tokenizer_text import encode, load_tokenizer

    tok = load_tokenizer(TARGET)
    engine = load_engine(TARGET, slots=1, max_context=256)
    return {p: autoregressive_generate(engine, encode(tok, p), MAX_NEW, SamplingParams()).tokens for p in PROMPTS}


def describe_difference(got: list[int], want: list[int]) -> str:
    """Why ``got`` is not ``want``: duplicated tokens, missing tokens, or the first position that differs."""
    verdict, n = classify(got, want)
    if verdict in ("duplicated", "missing"):
        return f"{n} {verdict} token(s)"
    return f"differs from position {n}: got {got[n:n + 6]}, want {want[n:n + 6]}"


def check_outputs(rows: list[dict], prompts: list[str], reference: dict[str, list[int]], max_new: int = MAX_NEW
                  ) -> None:
    """One finished row per prompt, in order, each equal to target-only greedy (no duplicated or missing token)."""
    assert [r["prompt"] for r in rows] == prompts, f"expected {len(prompts)} rows in prompt order, got {len(rows)}"
    for i, r in enumerate(rows):
        assert r["error"] is None, f"[{i}] {r['prompt']!r} failed: {r['error']}"
        want = reference[r["prompt"]][:max_new]
        assert r["token_ids"] == want, f"[{i}] {r['prompt']!r}: {describe_difference(r['token_ids'], want)}"
        assert r["new_tokens"] == len(want)


# --------------------------------------------------------------------------- processes
def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def prompt_flags(prompts: list[str]) -> list[str]:
    return [flag for p in prompts for flag in ("--prompt", p)]


class ClientRun:
    """A ``specmq draft`` / ``specmq generate`` process: stdout (``--json`` rows) and stderr each in a file."""

    def __init__(self, name: str, args: list[str], logdir: Path) -> None:
        self.name = name
        self.out_path, self.err_path = logdir / f"{name}.out", logdir / f"{name}.err"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "specmq.cli", *args], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=child_env(), cwd=ROOT)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def finish(self, timeout: float = CLIENT_TIMEOUT_S) -> tuple[int, list[dict], str]:
        """Wait for the exit: (exit code, JSON rows, stderr)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"{self.name} did not finish within {timeout:g}s; stderr tail:\n{self.stderr[-3000:]}")
        rows = [json.loads(line) for line in self.out_path.read_text().splitlines() if line.startswith("{")]
        return rc, rows, self.stderr

    def rows(self, timeout: float = CLIENT_TIMEOUT_S) -> list[dict]:
        """The JSON rows of a run that must succeed (exit 0)."""
        rc, rows, err = self.finish(timeout)
        assert rc == 0, f"{self.name} exited {rc}:\n{err[-3000:]}"
        return rows


class ChaosCluster(LocalCluster):
    """Broker + workers + clients of one test; the broker can be restarted on the same ports; ``close`` stops all."""

    def __init__(self, logdir: Path, *broker_flags: str) -> None:
        super().__init__(logdir=logdir, env=child_env(), cwd=ROOT)
        self.broker_flags = (*HB, "--stats-pub", "off", "--grace-s", "1", *broker_flags)
        self.clients: list[ClientRun] = []
        self.retired: list[Service] = []  # brokers that were killed or stopped before a restart
        self.start_broker(*self.broker_flags)

    # ------------------------------------------------------------------ workers and clients
    def target(self, name: str, slots: int = 8) -> None:
        self.start_worker("target", name, "--model", str(TARGET), "--slots", str(slots), *HB)

    def fused(self, name: str, jobs: int = 2) -> None:
        self.start_worker("fused", name, "--target-model", str(TARGET), "--draft-model", str(DRAFT), "--jobs",
                          str(jobs), "--gamma", "2", *HB)

    def wait_workers(self, names: set[str], timeout: float = 90.0) -> None:
        try:
            self.wait_registered(names, timeout_s=timeout)
        except ClusterError as exc:
            dead = self.exited()
            tail = dead.log.read_text()[-2000:] if dead is not None and dead.log is not None else ""
            pytest.fail(f"{exc}\n{tail}")

    def client(self, name: str, *args: str) -> ClientRun:
        run = ClientRun(name, list(args), self.logdir)
        self.clients.append(run)
        return run

    def draft(self, name: str, prompts: list[str], *flags: str, max_new: int = MAX_NEW,
              link_delay_ms: str = LINK_DELAY_MS) -> ClientRun:
        return self.client(name, "draft", "--broker", self.frontend, "--model", str(DRAFT),
                           *prompt_flags(prompts), "--max-new-tokens", str(max_new),
                           "--gamma", "2", "--concurrency", str(len(prompts)), "--json", "--threads", "1",
                           "--link-delay-ms", link_delay_ms, "--timeout", "2", *flags)

    def generate(self, name: str, prompts: list[str], *flags: str, max_new: int = MAX_NEW) -> ClientRun:
        return self.client(name, "generate", "--broker", self.frontend, "--model", str(DRAFT),
                           *prompt_flags(prompts), "--max-new-tokens", str(max_new),
                           "--gamma", "2", "--concurrency", str(len(prompts)), "--json", "--timeout", "20", *flags)

    # ------------------------------------------------------------------ faults
    def wait_for(self, condition: Callable[[dict], bool], what: str, clients: list[ClientRun],
                 timeout: float = FLOW_TIMEOUT_S) -> dict:
        """Poll the broker's stats until ``condition(snapshot)``; fail when a client exits first (the run ended
        before the fault could land mid-run) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        snap = None
        while time.monotonic() < deadline:
            snap = self.snapshot(0.5)
            if snap is not None and condition(snap):
                return snap
            for run in clients:
                if run.proc.poll() is not None:
                    pytest.fail(f"{run.name} exited (code {run.proc.returncode}) before {what}:\n"
                                f"{run.stderr[-2000:]}")
            time.sleep(0.02)
        pytest.fail(f"no {what} within {timeout:g}s; last stats: {snap}")

    def pid(self, name: str) -> int:
        return self.services[name].proc.pid

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.pid(name), sig)

    def wait_exit(self, name: str, timeout: float) -> int:
        proc = self.services[name].proc
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still runs {timeout:g}s after it was told to stop")

    def restart_broker(self) -> None:
        """Start a new broker on the same frontend and backend (the old one must have exited)."""
        old = self.services.pop("broker")
        assert old.exited, "restart_broker: the old broker still runs"
        self.retired.append(old)
        self.start_broker(*self.broker_flags)

    def close(self) -> None:
        everyone = [s.proc for s in (*self.retired, *self.services.values())] + [c.proc for c in self.clients]
        for proc in everyone:  # a stopped process would sit out the SIGTERM until the grace ends
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        stop_processes([c.proc for c in self.clients], grace_s=5.0)
        self.stop(grace_s=10.0)
        for s in self.retired:
            if s._log_file is not None:
                s._log_file.close()
                s._log_file = None


@pytest.fixture
def chaos(tmp_path) -> Iterator[Callable[..., ChaosCluster]]:
    """Factory ``chaos(*broker_flags)``: a started broker; every process of every cluster stops at teardown."""
    made: list[ChaosCluster] = []

    def make(*broker_flags: str) -> ChaosCluster:
        c = ChaosCluster(tmp_path / f"cluster{len(made)}", *broker_flags)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


def verifying_on(worker: str, results: int = 10) -> Callable[[dict], bool]:
    """Stats condition: ``worker`` holds sessions and the broker has passed at least ``results`` results."""
    def cond(snap: dict) -> bool:
        w = snap.get("workers", {}).get(worker, {})
        return w.get("sessions", 0) > 0 and snap["counters"]["msgs_in"].get("result", 0) >= results
    return cond


def streaming_on(worker: str, tokens: int = 3) -> Callable[[dict], bool]:
    """Stats condition: fused ``worker`` holds jobs and at least ``tokens`` Tokens messages went through."""
    def cond(snap: dict) -> bool:
        w = snap.get("workers", {}).get(worker, {})
        return w.get("jobs", 0) > 0 and snap["counters"]["msgs_in"].get("tokens", 0) >= tokens
    return cond


def both(*conds: Callable[[dict], bool]) -> Callable[[dict], bool]:
    return lambda snap: all(c(snap) for c in conds)


# --------------------------------------------------------------------------- faults
def test_target_kill9_sessions_finish_on_the_other_target(chaos, reference):
    c = chaos()
    c.target("ta")
    c.target("tb")
    c.wait_workers({"ta", "tb"})
    run = c.draft("draft", PROMPTS)
    c.wait_for(verifying_on("ta"), "results from target ta", [run])
    c.kill("ta")
    rows = run.rows()
    check_outputs(rows, PROMPTS, reference)
    assert sum(r["reopens"] for r in rows) >= 1  # the killed target held sessions
    assert c.snapshot(2.0)["counters"]["dead_workers"] >= 1


def test_fused_kill9_jobs_are_redelivered(chaos, reference):
    prompts = PROMPTS + PROMPTS[:3]  # 8 jobs on 2 x 2 fused slots: both workers stay busy
    c = chaos()
    c.fused("fa")
    c.fused("fb")
    c.wait_workers({"fa", "fb"})
    run = c.generate("generate", prompts)
    c.wait_for(streaming_on("fa"), "tokens from fused worker fa", [run])
    c.kill("fa")
    check_outputs(run.rows(), prompts, reference)
    snap = c.snapshot(2.0)
    assert snap["counters"]["redeliveries"] >= 1 and "fa" not in snap["workers"]


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_broker_restart_on_same_ports_loses_nothing(chaos, reference, how):
    """Sessions re-open from their committed tokens and in-flight jobs are sent again to the new broker."""
    c = chaos()
    c.target("t1")
    c.fused("f1")
    c.wait_workers({"t1", "f1"})
    drafts = c.draft("draft", PROMPTS, link_delay_ms="40")
    c.wait_for(verifying_on("t1", 1), "results flowing", [drafts])  # the drafter is up: its sessions last seconds
    jobs = c.generate("generate", PROMPTS)
    c.wait_for(both(verifying_on("t1"), streaming_on("f1", 1)), "results and tokens flowing", [drafts, jobs])
    if how == "kill9":
        c.kill("broker")
    else:
        c.signal("broker", signal.SIGTERM)
        assert c.wait_exit("broker", 15.0) == 0  # a drain of at most --grace-s, then a clean exit
    time.sleep(RESTART_GAP_S)  # the outage itself
    c.restart_broker()
    c.wait_workers({"t1", "f1"}, timeout=30.0)  # workers find the new broker by themselves
    draft_rows = drafts.rows()
    check_outputs(draft_rows, PROMPTS, reference)
    check_outputs(jobs.rows(), PROMPTS, reference)
    assert sum(r["reopens"] for r in draft_rows) >= 1  # sessions were re-opened on the new broker


def test_target_sigstop_then_sigcont(chaos, reference):
    """A frozen target is declared dead (its sessions move); when it thaws it re-registers and its stale answers
    change nothing."""
    c = chaos()
    c.target("ta")
    c.target("tb")
    c.wait_workers({"ta", "tb"})
    run = c.draft("draft", PROMPTS)
    c.wait_for(verifying_on("ta"), "results from target ta", [run])
    c.signal("ta", signal.SIGSTOP)
    try:
        time.sleep(STOP_S)  # the fault itself
    finally:
        c.signal("ta", signal.SIGCONT)
    rows = run.rows()
    check_outputs(rows, PROMPTS, reference)
    assert sum(r["reopens"] for r in rows) >= 1
    c.wait_workers({"ta", "tb"}, timeout=30.0)  # the thawed target serves again
    assert c.snapshot(2.0)["counters"]["dead_workers"] >= 1


def test_overload_10x_every_session_completes(chaos, reference):
    """24 sessions on a 2-slot target behind a broker whose queues hold 2: they wait their turn, none is lost."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(24)]
    c = chaos("--max-queue", "2")
    c.target("t1", slots=2)
    c.wait_workers({"t1"})
    run = c.draft("draft", prompts, max_new=16, link_delay_ms="0")
    check_outputs(run.rows(), prompts, reference, max_new=16)
    c.wait_for(lambda s: s["sessions"] == 0 and s["workers"]["t1"]["sessions"] == 0, "every session closed", [],
               timeout=10.0)


def test_drafter_kill9_target_slots_are_reclaimed(chaos, reference):
    """A crashed drafter's sessions expire after --session-idle-s; the freed slots serve the next drafter."""
    c = chaos("--session-idle-s", "1")
    c.target("t1", slots=4)
    c.wait_workers({"t1"})
    doomed = c.draft("doomed", PROMPTS[:4])
    c.wait_for(lambda s: s["workers"].get("t1", {}).get("sessions", 0) == 4
               and s["counters"]["msgs_in"].get("result", 0) >= 8, "4 sessions verifying on t1", [doomed])
    doomed.proc.kill()
    doomed.proc.wait(10)

    def reclaimed(snap: dict) -> bool:
        t1 = snap["workers"].get("t1", {})
        return (snap["sessions"] == 0 and t1.get("sessions") == 0 and snap["counters"]["sessions_expired"] >= 4
                and t1.get("stats", {}).get("slots_used") == 0)

    c.wait_for(reclaimed, "the crashed drafter's slots freed (broker sessions expired, target slots_used 0)", [],
               timeout=30.0)
    check_outputs(c.draft("next", PROMPTS[:4], link_delay_ms="0").rows(), PROMPTS[:4], reference)


@pytest.mark.parametrize("cmd", ["draft", "generate"])
def test_curve_unlisted_key_fails_with_the_curve_reason(chaos, tmp_path, cmd):
    from broker.client import request_stats
    from broker.curve import generate_keypair

    server_pub, server_sec = generate_keypair(tmp_path / "server", "broker")
    allowed_pub, allowed_sec = generate_keypair(tmp_path / "allow", "laptop")
    _, stranger_sec = generate_keypair(tmp_path / "other", "stranger")
    c = chaos("--curve-secret", str(server_sec), "--allow", str(tmp_path / "allow"))
    allowed = {"curve_secret": str(allowed_sec), "curve_server": str(server_pub), "curve_public": str(allowed_pub)}
    deadline = time.monotonic() + 30
    while request_stats(c.frontend, 1.0, curve=allowed) is None:  # the broker is up (for a listed key)
        assert time.monotonic() < deadline and not c.exited(), "the CURVE broker did not answer a listed key"
    t0 = time.monotonic()
    rc, rows, err = c.client(cmd, cmd, "--broker", c.frontend, "--model", str(DRAFT), "--prompt", "x",
                             "--max-new-tokens", "4", "--curve-secret", str(stranger_sec), "--curve-server",
                             str(server_pub), "--connect-timeout", "3", "--timeout", "2").finish(90)
    assert rc == 1 and rows == []
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "CURVE" in last and "key" in last, last  # the reason: the broker refused this client's key
    assert "not reachable" not in err, last
    assert time.monotonic() - t0 < 60
    snap = request_stats(c.frontend, 2.0, curve=allowed)
    assert snap is not None and snap["counters"]["auth_failures"] >= 1

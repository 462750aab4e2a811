"""Reliability: no session is lost to a broker restart (graceful or not) or to overload.

- A draining broker answers ``shutting_down``: clients back off and retry until a broker answers again, then
  re-open from their committed tokens (``BrokerClient.request(deadline=...)``, ``DraftWorker``).
- Every reply and heartbeat answer names the broker instance; a client that waits heartbeats the broker, so it
  notices a new instance within a few beats instead of after a request timeout, and re-opens or re-sends.
- Under overload, opens and jobs wait in the broker's bounded admission queues (FIFO, with the client's deadline);
  past the bound, Busy, retried with jittered back-off; only a passed deadline fails (``overloaded``).

The first tests use an in-process broker and scripted workers; the ``slow`` ones run a broker and a target as real
processes on 127.0.0.1 with the tiny float32 pair, and check outputs against target-only greedy decoding.
"""
from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from broker.client import BrokerClient, request_stats, wait_for
from conftest import TEST_CONFIG, BrokerThread, run_async, wait_until
from protocol import errors as E
from protocol.messages import (Busy, Disconnect, Done, Error, Generate, Heartbeat, Ready, Reopen, SessionClose,
                               SessionOpen, SessionOpened, StatsRequest, Verify)
from tests.model_fixtures import tiny_pair  # noqa: F401  (fixture)
from workers.echo_worker import answer
from workers.link import WorkerLink

HB = 0.1  # client heartbeat interval in these tests


class Scripted:
    """A worker on ``WorkerLink`` that answers like the echo worker, except request types in ``hold`` (kept, never
    answered: a slow worker)."""

    def __init__(self, backend: str, name: str, kind: str = "target", capacity: int = 8,
                 hold: tuple[type, ...] = ()) -> None:
        ready = Ready(kind=kind, model="echo", capacity=capacity, vocab_size=1000, worker=name, max_gamma=8)
        self.name, self.hold = name, hold
        self.link = WorkerLink(backend, ready, heartbeat_interval=0.1, liveness=10, initial_credit=capacity)
        self.held: list = []
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "Scripted":
        await self.link.start()
        self.task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.link.close()

    async def _serve(self) -> None:
        while True:
            for msg in await self.link.recv_batch():
                if isinstance(msg, Disconnect):
                    continue
                if isinstance(msg, self.hold):
                    self.held.append(msg)
                    continue
                for reply in answer(msg, self.name, vocab_size=1000):
                    await self.link.send(reply)
                self.link.grant(1)


def restart(old: BrokerThread) -> BrokerThread:
    """Stop ``old`` (graceful: it drains) and start a new broker on the same two ports."""
    front, back = old.frontend, old.backend
    old.stop()
    deadline = time.monotonic() + 10
    while True:  # ZeroMQ releases the old ports from its I/O thread, a moment after close
        try:
            return BrokerThread(replace(old.config, frontend=front, backend=back)).start()
        except RuntimeError as exc:
            if "Address already in use" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def brokers():
    """Brokers started by a test (restarts included); every one still running is stopped at the end."""
    started: list[BrokerThread] = []

    def start(**overrides) -> BrokerThread:
        b = BrokerThread(replace(TEST_CONFIG, **overrides)).start()
        started.append(b)
        return b

    def track(b: BrokerThread) -> BrokerThread:
        started.append(b)
        return b

    start.track = track
    yield start
    for b in started:
        if b._thread.is_alive():
            b.stop()


async def workers_up(broker: BrokerThread, names: set[str]) -> None:
    assert await wait_for(lambda: names <= set(broker.snapshot()["workers"]), 10), broker.snapshot()["workers"]


# --------------------------------------------------------------------------- instance id and heartbeats
def test_every_reply_names_the_broker_instance(make_broker):
    broker = make_broker(max_queue=1)

    async def main():
        async with Scripted(broker.backend, "a", capacity=1), BrokerClient(broker.frontend) as c:
            await workers_up(broker, {"a"})
            me = broker.snapshot()["instance"]
            assert len(me) >= 8
            opened = await c.request(SessionOpen(session="s", prompt_ids=[1, 2]))
            result = await c.request(Verify(session="s", seq=0, pos=2, tokens=[3]))
            refused = await c.request(Verify(session="nope", seq=0, pos=0, tokens=[1]))
            stats = await c.request(StatsRequest())
            await c.send(SessionOpen(session="w", prompt_ids=[1]))  # no slot: it waits in the admission queue
            await wait_for(lambda: broker.snapshot()["queues"]["admission"]["depth"] == 1)
            await c.send(SessionOpen(session="x", prompt_ids=[1]))  # the queue is full: Busy
            busy = await c.recv(2)
            await c.send(Heartbeat())
            after = await c.request(StatsRequest())  # answered after the heartbeat (one socket, in order)
            assert c.inbox.empty()  # the heartbeat's answer was the client's own business, not a reply to hand out
            for msg in (opened, result, refused, stats, busy, after):
                assert msg.broker == me, msg
            assert isinstance(busy, Busy) and busy.queue == "admission"
            assert c.broker_id == me and c.restarts == 0

    run_async(main())


def test_waiting_verify_becomes_reopen_when_a_new_broker_answers(brokers):
    """The chunk in flight is held by the target; the broker restarts (drains, exits, a new one binds the same
    ports). The client's heartbeats reach the new instance and the waiting request returns ``Reopen`` at once,
    long before its 60 s timeout."""
    broker = brokers()

    async def main():
        async with Scripted(broker.backend, "a", hold=(Verify,)) as a, \
                BrokerClient(broker.frontend, timeout=60, heartbeat_interval=HB) as c:
            await workers_up(broker, {"a"})
            assert isinstance(await c.request(SessionOpen(session="s", prompt_ids=[1, 2])), SessionOpened)
            first = c.broker_id
            pending = asyncio.create_task(c.request(Verify(session="s", seq=0, pos=2, tokens=[3])))
            assert await wait_for(lambda: len(a.held) == 1, 5)
            new = brokers.track(await asyncio.to_thread(restart, broker))
            reply = await asyncio.wait_for(pending, 20)
            assert isinstance(reply, Reopen) and reply.reason == "broker_restarted" and reply.session == "s"
            assert c.restarts == 1 and c.broker_id == new.snapshot()["instance"] != first
            await workers_up(new, {"a"})  # the worker's link re-registered with the new broker
            again = await c.request(SessionOpen(session="s", prompt_ids=[1, 2, 3, 4]), deadline=time.monotonic() + 10)
            assert isinstance(again, SessionOpened) and again.pos == 4

    run_async(main(), timeout=45)


def test_client_beats_while_a_request_waits(make_broker):
    broker = make_broker()
    beats: list[bytes] = []

    def tap(direction: str, side: str, ident: bytes, body: bytes) -> None:
        if direction == "in" and side == "frontend" and b"heartbeat" in body:
            beats.append(ident)

    broker.broker.taps.append(tap)

    async def main():
        async with Scripted(broker.backend, "a", hold=(Verify,)), \
                BrokerClient(broker.frontend, heartbeat_interval=HB) as c:
            await workers_up(broker, {"a"})
            await c.request(SessionOpen(session="s", prompt_ids=[1]))
            pending = asyncio.create_task(c.request(Verify(session="s", seq=0, pos=1, tokens=[2]), timeout=30))
            assert await wait_for(lambda: len(beats) >= 3, 5)  # the held chunk waits: the client beats
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
            assert not c.broker_silent and c.silences == 0  # every beat was answered

    run_async(main())


def test_generate_job_is_sent_again_to_a_restarted_broker(brokers):
    """A job held by its fused worker when the broker restarts: the client sends it again to the new broker (which
    knew nothing of it) and it completes there; nothing waits for the 60 s silence timeout."""
    broker = brokers()

    async def main():
        async with Scripted(broker.backend, "f", kind="fused", capacity=1, hold=(Generate,)) as f, \
                BrokerClient(broker.frontend, timeout=60, heartbeat_interval=HB) as c:
            await workers_up(broker, {"f"})
            stream = c.generate(Generate(job="j", prompt_ids=[1]), queue_timeout=20)
            first = asyncio.create_task(stream.__anext__())
            assert await wait_for(lambda: len(f.held) == 1, 5)
            f.hold = ()  # from now on it answers
            new = brokers.track(await asyncio.to_thread(restart, broker))
            msgs = [await asyncio.wait_for(first, 20)] + [m async for m in stream]
            assert isinstance(msgs[-1], Done) and msgs[-1].job == "j" and msgs[-1].broker == new.snapshot()["instance"]
            assert [m.index for m in msgs[:-1]] == [0, 1, 2] and c.restarts == 1

    run_async(main(), timeout=45)


# --------------------------------------------------------------------------- a draining broker
def test_draining_broker_is_retried_until_a_broker_answers(brokers):
    """A job held by a fused worker keeps the broker draining; opens and chunks meanwhile get ``shutting_down``
    and are retried with back-off, not failed. Once the old broker is gone and a new one is up, the open succeeds
    and the chunk turns into a ``Reopen`` (re-open from the committed tokens)."""
    broker = brokers(grace_s=1.5)

    async def main():
        async with Scripted(broker.backend, "t"), Scripted(broker.backend, "f", kind="fused", capacity=1,
                                                                 hold=(Generate,)) as f, \
                BrokerClient(broker.frontend, timeout=60, heartbeat_interval=HB) as c:
            await workers_up(broker, {"t", "f"})
            assert isinstance(await c.request(SessionOpen(session="s", prompt_ids=[1, 2])), SessionOpened)
            await c.send(Generate(job="hold", prompt_ids=[1]))
            assert await wait_for(lambda: len(f.held) == 1, 5)
            stopping = asyncio.create_task(asyncio.to_thread(restart, broker))
            assert await wait_for(lambda: not broker.snapshot()["accepting"], 5)
            refused = await c.request(SessionOpen(session="late", prompt_ids=[1]))  # no deadline: the raw answer
            assert isinstance(refused, Error) and refused.code == E.SHUTTING_DOWN
            deadline = time.monotonic() + 20
            opened, chunk = await asyncio.gather(
                c.request(SessionOpen(session="new", prompt_ids=[5, 6, 7]), deadline=deadline),
                c.request(Verify(session="s", seq=0, pos=2, tokens=[3]), deadline=deadline))
            new = brokers.track(await stopping)
            assert isinstance(opened, SessionOpened) and opened.pos == 3 and opened.broker == new.snapshot()["instance"]
            # the chunk must come back as "re-open": a Reopen when the client saw the new instance first, or
            # unknown_session from the new broker when the resent chunk reached it first (both re-open, FLOW.md)
            assert ((isinstance(chunk, Reopen) and chunk.reason == "broker_restarted")
                    or (isinstance(chunk, Error) and chunk.code == E.UNKNOWN_SESSION
                        and chunk.broker == new.snapshot()["instance"])), chunk

    run_async(main(), timeout=45)


# --------------------------------------------------------------------------- overload
def test_admission_queue_is_fifo_bounded_and_deadlined(make_broker):
    """One target slot. A second open waits in the admission queue (not at the target), a third is Busy (bound 1);
    when the slot frees, the waiting open gets it; an open whose deadline passes gets ``overloaded``."""
    broker = make_broker(max_queue=1)

    async def main():
        async with Scripted(broker.backend, "a", capacity=1), BrokerClient(broker.frontend) as c:
            await workers_up(broker, {"a"})
            assert isinstance(await c.request(SessionOpen(session="s0", prompt_ids=[1])), SessionOpened)
            await c.send(SessionOpen(session="s1", prompt_ids=[1, 2]))
            assert await wait_for(lambda: broker.snapshot()["queues"]["admission"]["depth"] == 1)
            await c.send(SessionOpen(session="s1", prompt_ids=[1, 2]))  # a resend keeps its place
            busy = await c.request(SessionOpen(session="s2", prompt_ids=[1]), busy_retries=0)
            assert isinstance(busy, Busy) and busy.queue == "admission" and busy.retry_ms > 0
            assert broker.snapshot()["workers"]["a"]["sessions"] == 1  # the target never saw more than its slots
            await c.send(SessionClose(session="s0"))
            opened = await c.recv(3)
            assert isinstance(opened, SessionOpened) and opened.session == "s1" and opened.pos == 2
            snap = broker.snapshot()
            assert snap["counters"]["admitted"] == 1 and snap["queues"]["admission"]["depth"] == 0
            late = await c.request(SessionOpen(session="s3", prompt_ids=[1], queue_timeout_s=0.3), timeout=5)
            assert isinstance(late, Error) and late.code == E.OVERLOADED and late.session == "s3"
            assert late.message == "no target slot within 0.3 s; 1 sessions waiting"
            assert broker.snapshot()["counters"]["overloaded"] == 1

    run_async(main())


def test_busy_is_retried_with_backoff_until_the_deadline(make_broker):
    broker = make_broker(max_queue=1)

    async def main():
        async with Scripted(broker.backend, "a", capacity=1), BrokerClient(broker.frontend) as c:
            await workers_up(broker, {"a"})
            await c.request(SessionOpen(session="s0", prompt_ids=[1]))
            await c.send(SessionOpen(session="s1", prompt_ids=[1]))  # fills the admission queue
            assert await wait_for(lambda: broker.snapshot()["queues"]["admission"]["depth"] == 1)
            t0 = time.monotonic()
            waiting = asyncio.create_task(c.request(SessionOpen(session="s2", prompt_ids=[7, 8]),
                                                    deadline=t0 + 20))
            assert await wait_for(lambda: broker.snapshot()["counters"]["busy"] >= 2, 5)  # refused, retried
            await c.send(SessionClose(session="s0"))  # s1 takes the slot, s2 gets into the queue
            assert await wait_for(lambda: broker.snapshot()["queues"]["admission"]["depth"] == 1, 10)
            await c.send(SessionClose(session="s1"))
            opened = await asyncio.wait_for(waiting, 10)
            assert isinstance(opened, SessionOpened) and opened.session == "s2" and opened.pos == 2
            # past its deadline a refusal is returned, not retried for ever
            await c.send(SessionOpen(session="s3", prompt_ids=[1]))  # queued behind s2's slot
            assert await wait_for(lambda: broker.snapshot()["queues"]["admission"]["depth"] == 1)
            busy = await c.request(SessionOpen(session="s4", prompt_ids=[1]), deadline=time.monotonic() + 0.5)
            assert isinstance(busy, Busy)

    run_async(main())


def test_generate_waits_in_the_queue_until_its_deadline(make_broker):
    """A fused worker holds its only job; the next job waits in the generate queue; one more is Busy and retried;
    past their deadlines both end as ``overloaded`` (never a silent hang, never an early failure)."""
    broker = make_broker(max_queue=1)

    async def main():
        async with Scripted(broker.backend, "f", kind="fused", capacity=1, hold=(Generate,)) as f, \
                BrokerClient(broker.frontend, heartbeat_interval=HB) as c:
            await workers_up(broker, {"f"})
            await c.send(Generate(job="j0", prompt_ids=[1]))
            assert await wait_for(lambda: len(f.held) == 1)

            async def final(job: str) -> list:
                return [m async for m in c.generate(Generate(job=job, prompt_ids=[1], queue_timeout_s=0.5),
                                                    timeout=0.2, queue_timeout=1.0)]

            waited, bounced = await asyncio.gather(final("j1"), final("j2"))
            for msgs in (waited, bounced):
                assert len(msgs) == 1 and isinstance(msgs[0], Error) and msgs[0].code == E.OVERLOADED, msgs
            assert "no fused worker slot within" in waited[0].message
            assert broker.snapshot()["counters"]["busy"] >= 1

    run_async(main())


def test_drafter_overloaded_is_one_clear_error(make_broker, tiny_pair):  # noqa: F811
    """A drafter whose sessions never get a target slot fails each with ``overloaded`` after its queue timeout."""
    from workers.draft_worker import DraftConfig, DraftWorker

    broker = make_broker()

    async def main():
        async with Scripted(broker.backend, "a", capacity=1), BrokerClient(broker.frontend) as hog:
            await workers_up(broker, {"a"})
            await hog.request(SessionOpen(session="hog", prompt_ids=[1]))  # takes the only slot, never closes
            cfg = DraftConfig(broker=broker.frontend, model=tiny_pair.draft, max_new_tokens=4, gamma=2,
                              concurrency=3, queue_timeout=0.5, heartbeat_interval=HB, threads=1)
            results = await DraftWorker(cfg).run(["a b", "c d", "e f"])
            for r in results:
                assert r.error_code == E.OVERLOADED, r.error
                want = r"overloaded: no target slot within 0\.\d+ s; \d+ sessions waiting"
                assert re.fullmatch(want, r.error), r.error

    run_async(main(), timeout=60)


# --------------------------------------------------------------------------- real processes, real models
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "The quick brown fox", "A message queue", "She said hello", "Numbers like 1, 2",
           "Speculative decoding drafts"]
MAX_NEW = 40
PROC_HB = ("--heartbeat-interval", "0.2", "--liveness", "5")


def target_only(model: Path, prompts: list[str], max_new: int) -> list[list[int]]:
    from workers.engine import load_engine
    from workers.sampling import SamplingParams
    from workers.speculation import autoregressive_generate
    from workers.tokenizer_text import encode, load_tokenizer

    tok = load_tokenizer(model)
    engine = load_engine(model, slots=1, max_context=256)
    return [autoregressive_generate(engine, encode(tok, p), max_new, SamplingParams()).tokens for p in prompts]


class Processes:
    """One target process and the broker processes of a test, on fixed loopback ports: a restart is a new broker
    process on the same ports. Everything still running is stopped at the end, failed test or not."""

    def __init__(self, tmp: Path, model: Path, slots: int) -> None:
        import os

        from workers.local_cluster import LocalCluster

        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.cluster = LocalCluster(logdir=tmp, env=env, cwd=ROOT)
        self.brokers = 0
        self.model, self.slots = model, slots

    def start_broker(self, *flags: str) -> str:
        self.brokers += 1
        name = f"broker{self.brokers}"
        c = self.cluster
        c.start(name, "broker", "--frontend", c.frontend, "--backend", c.backend, *PROC_HB, *flags)
        assert wait_until(lambda: request_stats(c.frontend, 0.2) is not None or c.services[name].exited, 30)
        assert not c.services[name].exited, c.services[name].describe_exit()
        return name

    def start_target(self) -> None:
        self.cluster.start_worker("target", "t0", "--model", str(self.model), "--slots", str(self.slots),
                                  *PROC_HB)

    def wait_target(self) -> None:
        self.cluster.wait_registered({"t0"}, timeout_s=120)

    def signal_broker(self, sig: int) -> None:
        proc = self.cluster.services[f"broker{self.brokers}"].proc
        proc.send_signal(sig)
        proc.wait(30)

    def broker_log(self, n: int) -> str:
        return (self.cluster.logdir / f"broker{n}.log").read_text()

    def close(self) -> None:
        self.cluster.stop(grace_s=10.0)


@pytest.fixture
def procs(tmp_path, tiny_pair):  # noqa: F811
    made: list[Processes] = []

    def make(slots: int = 8) -> Processes:
        p = Processes(tmp_path, tiny_pair.target, slots)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture(scope="module")
def expected(tiny_pair):  # noqa: F811
    return target_only(tiny_pair.target, PROMPTS, MAX_NEW)


async def run_with_fault(cfg, prompts: list[str], fault, rounds: int = 2) -> tuple[list, int]:
    """Run a draft worker; once every session has ``rounds`` results, run ``fault()`` in a thread. Returns the
    results and how many rounds had been done when the fault hit."""
    from workers.draft_worker import DraftWorker

    worker = DraftWorker(cfg)
    run = asyncio.create_task(worker.run(prompts))

    def ready() -> bool:
        per = Counter(r.session for r in worker.rows)
        return len(per) >= min(cfg.concurrency, len(prompts)) and min(per.values()) >= rounds

    assert await wait_for(lambda: ready() or run.done(), 90)
    assert not run.done(), "the run finished before the fault"
    done_before = len(worker.rows)
    await asyncio.to_thread(fault)
    return await run, done_before


@pytest.mark.slow
async def holder_is(frontend: str, jobs: int | None, timeout_s: float) -> bool:
    """Is the "holder" worker registered (holding ``jobs`` jobs, when given)? Polls the broker's stats off the event
    loop, which the holder's own link needs to register."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = await asyncio.to_thread(request_stats, frontend, 0.5)
        holder = (snap or {}).get("workers", {}).get("holder")
        if holder is not None and (jobs is None or holder.get("jobs") == jobs):
            return True
        await asyncio.sleep(0.05)
    return False


def test_graceful_broker_restart_loses_no_session(procs, tiny_pair, expected):  # noqa: F811
    """SIGTERM while sessions run; a fused worker holds a job so the broker drains for its whole grace period and
    answers every new chunk ``shutting_down``; a new broker starts on the same ports. Every session completes with
    target-only greedy output; the request timeout (300 s) is never what recovers them."""
    from workers.draft_worker import DraftConfig

    p = procs()
    p.start_broker("--grace-s", "2")
    p.start_target()
    p.wait_target()

    async def main():
        holder = WorkerLink(p.cluster.backend, Ready(kind="fused", model="hold", capacity=1, worker="holder"),
                            heartbeat_interval=0.2, liveness=5, initial_credit=1)
        await holder.start()
        try:
            async with BrokerClient(p.cluster.frontend) as c:
                assert await holder_is(p.cluster.frontend, None, 30.0)  # registered before the job is sent
                await c.send(Generate(job="hold", prompt_ids=[1]))
                assert await holder_is(p.cluster.frontend, 1, 30.0)

                def fault() -> None:
                    p.signal_broker(signal.SIGTERM)  # returns once the drain is over and the broker has exited
                    p.start_broker()

                cfg = DraftConfig(broker=p.cluster.frontend, model=tiny_pair.draft, max_new_tokens=MAX_NEW, gamma=2,
                                  concurrency=len(PROMPTS), timeout=300, queue_timeout=60, heartbeat_interval=0.2,
                                  link_delay_ms=5, threads=1)
                return await run_with_fault(cfg, PROMPTS, fault)
        finally:
            await holder.close()

    results, _ = run_async(main(), timeout=150)
    assert [r.error for r in results] == [None] * len(PROMPTS)
    assert [r.token_ids for r in results] == expected
    assert sum(r.reopens for r in results) >= 1
    assert '"code": "shutting_down"' in p.broker_log(1)  # the drain did refuse chunks


@pytest.mark.slow
def test_killed_broker_is_noticed_by_heartbeat_not_timeout(procs, tiny_pair, expected):  # noqa: F811
    """kill -9 of the broker mid-run, back on the same ports a moment later: the chunks in flight died with it.
    The drafter's request timeout is 300 s, so only the heartbeat / instance-id path can recover the sessions."""
    from workers.draft_worker import DraftConfig

    p = procs()
    p.start_broker()
    p.start_target()
    p.wait_target()

    def fault() -> None:
        p.signal_broker(signal.SIGKILL)
        time.sleep(0.5)  # the outage: the fault's own duration
        p.start_broker()

    cfg = DraftConfig(broker=p.cluster.frontend, model=tiny_pair.draft, max_new_tokens=MAX_NEW, gamma=2,
                      concurrency=len(PROMPTS), timeout=300, queue_timeout=60, heartbeat_interval=0.2,
                      link_delay_ms=5, threads=1)
    results, _ = run_async(run_with_fault(cfg, PROMPTS, fault), timeout=150)
    assert [r.error for r in results] == [None] * len(PROMPTS)
    assert [r.token_ids for r in results] == expected
    assert sum(r.reopens for r in results) >= 1


@pytest.mark.slow
def test_overload_waits_its_turn_and_loses_nothing(procs, tiny_pair):  # noqa: F811
    """Many more sessions than target slots, a tiny admission bound: every session waits (admission queue, then
    Busy retried with back-off) and completes with target-only greedy output; the broker's bound is what trips."""
    from workers.draft_worker import DraftConfig, DraftWorker

    prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS]
    want = target_only(tiny_pair.target, prompts, 24)
    p = procs(slots=2)
    p.start_broker("--max-queue", "2")
    p.start_target()
    p.wait_target()
    cfg = DraftConfig(broker=p.cluster.frontend, model=tiny_pair.draft, max_new_tokens=24, gamma=2,
                      concurrency=len(prompts), queue_timeout=120, heartbeat_interval=0.2, link_delay_ms=5,
                      threads=1)
    results = run_async(DraftWorker(cfg).run(prompts), timeout=150)
    assert [r.error for r in results] == [None] * len(prompts)
    assert [r.token_ids for r in results] == want
    snap = request_stats(p.cluster.frontend, 2.0)
    assert snap["counters"]["admitted"] >= 1 and snap["counters"]["busy"] >= 1  # the broker's own bound
    assert snap["queues"]["admission"]["depth"] == 0


"""The broker over real ZeroMQ sockets: routing, affinity, liveness, re-placement, backpressure, retries,
generate redelivery, bad input and graceful shutdown."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from broker.client import BrokerClient, wait_for
from broker.routing import ROUTERS
from conftest import free_port, run_async
from protocol import errors as E
from protocol.codec import decode, encode
from protocol.messages import (
    Busy,
    Credit,
    Disconnect,
    Done,
    Error,
    Generate,
    Heartbeat,
    Ready,
    Reopen,
    Result,
    SessionClose,
    SessionOpen,
    SessionOpened,
    Tokens,
    Verify,
)
from workers.echo_worker import answer
from workers.link import WorkerLink

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """A scripted worker on WorkerLink: records every request; answers like the echo worker when ``auto``."""

    def __init__(self, backend: str, name: str, kind: str = "target", credit: int = 64, auto: bool = True,
                 vocab_size: int = 1000) -> None:
        ready = Ready(kind=kind, model="echo", capacity=credit or 8, vocab_size=vocab_size, worker=name, max_gamma=8)
        self.name, self.auto = name, auto
        self.hold: tuple[type, ...] = ()  # request types recorded but never answered (a slow target)
        self.link = WorkerLink(backend, ready, heartbeat_interval=0.1, liveness=10, initial_credit=credit)
        self.seen: list = []
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "Worker":
        await self.link.start()
        self.task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _serve(self) -> None:
        while True:
            for msg in await self.link.recv_batch():
                self.seen.append(msg)
                if self.auto and not isinstance(msg, (Disconnect, *self.hold)):
                    for reply in answer(msg, self.name):
                        await self.link.send(reply)
                    self.link.grant(1)

    def of_type(self, cls) -> list:
        return [m for m in self.seen if isinstance(m, cls)]

    async def _cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def stop(self) -> None:
        await self._cancel()
        await self.link.close()

    async def crash(self) -> None:
        await self._cancel()
        self.link.abort()


async def registered(broker, n: int) -> None:
    assert await wait_for(lambda: len(broker.snapshot()["workers"]) == n, 5), broker.snapshot()["workers"]


def test_open_verify_affinity_and_retries(broker):
    async def main():
        async with Worker(broker.backend, "a") as a, Worker(broker.backend, "b") as b, \
                BrokerClient(broker.frontend) as c:
            await registered(broker, 2)
            opened = [await c.request(SessionOpen(session=f"s{i}", prompt_ids=[1, 2])) for i in range(6)]
            assert all(isinstance(o, SessionOpened) for o in opened)
            home = {o.session: o.worker for o in opened}
            assert set(home.values()) == {"a", "b"}  # least_loaded spreads sessions
            for seq in range(3):
                for i in range(6):
                    r = await c.request(Verify(session=f"s{i}", seq=seq, pos=2 + 3 * seq, tokens=[5, 6]))
                    assert isinstance(r, Result) and r.seq == seq and r.tokens == [5, 6, 7]
            for w in (a, b):  # affinity: every chunk of a session went to the target that opened it
                for v in w.of_type(Verify):
                    assert home[v.session.split("/", 1)[1]] == w.name
            # a resend of the last answered chunk gets the cached result; the target never sees it twice
            again = await c.request(Verify(session="s0", seq=2, pos=8, tokens=[5, 6]))
            assert isinstance(again, Result) and again.seq == 2
            assert sum(len(w.of_type(Verify)) for w in (a, b)) == 18
            assert broker.snapshot()["counters"]["duplicates"] == 1
            behind = await c.request(Verify(session="s0", seq=1, pos=5, tokens=[5]))
            assert isinstance(behind, Error) and behind.code == E.BAD_SEQUENCE

    run_async(main())


def test_duplicate_of_inflight_seq_is_dropped(broker):
    async def main():
        async with Worker(broker.backend, "a", credit=1) as a, BrokerClient(broker.frontend) as c:
            await registered(broker, 1)
            a.auto = True
            assert isinstance(await c.request(SessionOpen(session="s", prompt_ids=[1])), SessionOpened)
            a.auto = False  # hold chunks: the open's credit came back, one more verify fits
            await wait_for(lambda: broker.snapshot()["workers"]["a"]["credit"] == 1)
            await c.send(Verify(session="s", seq=0, pos=1, tokens=[3]))
            await c.send(Verify(session="s", seq=0, pos=1, tokens=[3]))  # retried while in flight
            assert await wait_for(lambda: broker.snapshot()["counters"]["duplicates"] == 1)
            assert await wait_for(lambda: len(a.of_type(Verify)) == 1)
            await a.link.send(answer(a.of_type(Verify)[0], "a")[0])
            r = await c.recv(2)
            assert isinstance(r, Result) and r.seq == 0
            assert await c.recv(0.2) is None  # exactly one answer
            assert len(a.of_type(Verify)) == 1

    run_async(main())


@pytest.mark.parametrize("policy", sorted(ROUTERS))
def test_each_routing_policy_places_sessions(make_broker, policy):
    broker = make_broker(router=policy)

    async def main():
        async with Worker(broker.backend, "a", credit=32) as a, Worker(broker.backend, "b", credit=32), \
                BrokerClient(broker.frontend) as c:
            await registered(broker, 2)
            opened = [await c.request(SessionOpen(session=f"s{i}", prompt_ids=[1])) for i in range(8)]
            assert all(isinstance(o, SessionOpened) for o in opened)
            counts = {w: sum(o.worker == w for o in opened) for w in ("a", "b")}
            assert sum(counts.values()) == 8
            if policy in ("rr", "least_loaded"):
                assert counts == {"a": 4, "b": 4}
            snap = broker.snapshot()
            assert snap["counters"]["sessions_placed"] == 8
            assert sum(w["sessions"] for w in snap["workers"].values()) == 8

    run_async(main())


@pytest.mark.parametrize("skew", ["slow", "crowded"])
@pytest.mark.parametrize("policy", ["least_loaded", "jsq2", "random"])
def test_load_aware_policies_steer_new_sessions_off_a_loaded_target(make_broker, policy, skew):
    """Target a joins first and is loaded before b joins: ``slow`` holds 4 sessions whose 16 pipelined chunks it has
    not answered (its credit is generous, so the broker's own verify queue for it stays empty), ``crowded`` holds 16
    answered sessions. Of 12 new sessions, the load-aware policies give a none; seeded random gives it its share."""
    broker = make_broker(router=policy, seed=0)
    held = 4 if skew == "slow" else 16

    async def main():
        async with Worker(broker.backend, "a", credit=64) as a, BrokerClient(broker.frontend) as c:
            await registered(broker, 1)
            for i in range(held):
                assert (await c.request(SessionOpen(session=f"old{i}", prompt_ids=[1]))).worker == "a"
            if skew == "slow":
                a.hold = (Verify,)  # a stops answering chunks (opens still): every chunk stays outstanding
                for i in range(held):
                    for seq in range(4):
                        await c.send(Verify(session=f"old{i}", seq=seq, pos=1 + seq, tokens=[3]))
                assert await wait_for(lambda: len(a.of_type(Verify)) == 16, 5)
                assert broker.snapshot()["queues"]["verify:a"] == {"depth": 0, "inflight": 16}
            async with Worker(broker.backend, "b", credit=64):
                await registered(broker, 2)
                opened = [await c.request(SessionOpen(session=f"new{i}", prompt_ids=[1])) for i in range(12)]
                assert all(isinstance(o, SessionOpened) for o in opened), opened
                on_a = sum(o.worker == "a" for o in opened)
                if policy == "random":
                    assert 3 <= on_a <= 9, on_a
                else:
                    assert on_a == 0

    run_async(main())


def test_heartbeat_expiry_replacement_and_reopen(broker):
    async def main():
        async with BrokerClient(broker.frontend) as c:
            a = Worker(broker.backend, "a")
            await a.__aenter__()
            await registered(broker, 1)
            assert (await c.request(SessionOpen(session="s", prompt_ids=[1, 2]))).worker == "a"
            r = await c.request(Verify(session="s", seq=0, pos=2, tokens=[4]))
            async with Worker(broker.backend, "b") as b:
                await registered(broker, 2)
                await a.crash()  # silent: only missed heartbeats reveal it
                reopen = await c.recv(3)
                assert isinstance(reopen, Reopen) and reopen.session == "s"
                assert broker.snapshot()["counters"]["dead_workers"] == 1
                assert list(broker.snapshot()["workers"]) == ["b"]
                # a chunk before re-opening is answered with Reopen again; then re-open with every committed token
                again = await c.request(Verify(session="s", seq=1, pos=r.pos, tokens=[4]))
                assert isinstance(again, Reopen)
                opened = await c.request(SessionOpen(session="s", prompt_ids=[1, 2] + r.tokens))
                assert opened.worker == "b" and opened.pos == 4
                r2 = await c.request(Verify(session="s", seq=0, pos=4, tokens=[9]))
                assert isinstance(r2, Result) and r2.pos == 6
                assert b.of_type(SessionOpen)[0].prompt_ids == [1, 2, 4, 5]

    run_async(main())


def test_clean_disconnect_replaces_at_once(broker):
    async def main():
        async with BrokerClient(broker.frontend) as c:
            a = Worker(broker.backend, "a")
            await a.__aenter__()
            await registered(broker, 1)
            await c.request(SessionOpen(session="s", prompt_ids=[1]))
            await a.stop()  # sends Disconnect
            reopen = await c.recv(2)
            assert isinstance(reopen, Reopen)
            nobody = await c.request(SessionOpen(session="s", prompt_ids=[1, 2]))
            assert isinstance(nobody, Error) and nobody.code == E.NO_WORKERS

    run_async(main())


def test_busy_when_queue_full_then_drains(make_broker):
    broker = make_broker(max_queue=2)

    async def main():
        async with Worker(broker.backend, "a", credit=0) as a, BrokerClient(broker.frontend) as c:
            await registered(broker, 1)
            await c.send(SessionOpen(session="s", prompt_ids=[1]))
            await c.send(Verify(session="s", seq=0, pos=1, tokens=[2]))
            await wait_for(lambda: broker.snapshot()["queues"]["verify:a"]["depth"] == 2)
            await c.send(Verify(session="s", seq=1, pos=3, tokens=[2]))
            busy = await c.recv(2)
            assert isinstance(busy, Busy) and busy.queue == "verify:a" and busy.seq == 1 and busy.retry_ms > 0
            assert broker.snapshot()["counters"]["busy"] == 1
            a.link.grant(2)  # credit arrives: the queue drains in order
            assert isinstance(await c.recv(2), SessionOpened)
            assert isinstance(await c.recv(2), Result)
            r = await c.request(Verify(session="s", seq=1, pos=3, tokens=[2]))  # the BUSY'd chunk, retried
            assert isinstance(r, Result) and r.seq == 1

    run_async(main())


def test_generate_redelivery_and_poison_cap(make_broker):
    broker = make_broker(max_deliveries=2)

    async def main():
        async with BrokerClient(broker.frontend) as c:
            # redelivery: the first fused worker crashes holding the job, the second finishes it
            dying = Worker(broker.backend, "f1", kind="fused", credit=1, auto=False)
            await dying.__aenter__()
            await registered(broker, 1)
            await c.send(Generate(job="j1", prompt="hi"))
            assert await wait_for(lambda: len(dying.of_type(Generate)) == 1)
            assert dying.of_type(Generate)[0].delivery == 0
            async with Worker(broker.backend, "f2", kind="fused", credit=1) as good:
                await registered(broker, 2)
                await dying.crash()
                msgs = [await c.recv(3) for _ in range(4)]
                assert [type(m) for m in msgs] == [Tokens, Tokens, Tokens, Done]
                assert msgs[-1].job == "j1" and msgs[-1].stats["delivery"] == 1
                assert broker.snapshot()["counters"]["redeliveries"] == 1
                await good.stop()
            # poison: every worker that takes the job dies; after 2 deliveries the client gets Error(poison_job)
            for i in range(2):
                w = Worker(broker.backend, f"p{i}", kind="fused", credit=1, auto=False)
                await w.__aenter__()
                # exactly this worker: a count of 1 can still be the previous one, not yet gone (a loaded box)
                assert await wait_for(lambda: list(broker.snapshot()["workers"]) == [f"p{i}"], 5), \
                    broker.snapshot()["workers"]
                if i == 0:
                    await c.send(Generate(job="j2", prompt="boom"))
                assert await wait_for(lambda: len(w.of_type(Generate)) == 1)
                assert w.of_type(Generate)[0].delivery == i
                await w.stop()  # Disconnect: immediate redelivery
            err = await c.recv(3)
            assert isinstance(err, Error) and err.code == E.POISON_JOB and err.job == "j2"
            assert broker.snapshot()["jobs"] == 0

    run_async(main())


def test_bad_input_gets_errors_and_broker_keeps_serving(broker):
    async def main():
        async with Worker(broker.backend, "a", vocab_size=100) as a, BrokerClient(broker.frontend) as c:
            await registered(broker, 1)
            await c.send_raw(b"\x00not msgpack")
            assert (await c.recv(2)).code == E.BAD_ENCODING
            await c.send_raw([b"one", b"two"])
            assert (await c.recv(2)).code == E.BAD_FRAMES
            await c.send(Ready(kind="target", model="m", capacity=1))  # worker message on the frontend
            assert (await c.recv(2)).code == E.NOT_ALLOWED
            r = await c.request(Verify(session="nope", seq=0, pos=0, tokens=[1]))
            assert r.code == E.UNKNOWN_SESSION
            assert isinstance(await c.request(SessionOpen(session="s", prompt_ids=[1])), SessionOpened)
            r = await c.request(Verify(session="s", seq=0, pos=1, tokens=[5, 100]))
            assert r.code == E.TOKEN_OUT_OF_RANGE
            r = await c.request(Verify(session="s", seq=0, pos=1, tokens=list(range(9))))
            assert r.code == E.GAMMA_TOO_LARGE
            big = encode(SessionOpen(session="x", prompt_ids=[1000] * 400_000))  # 1.2 MB
            await c.send_raw(big)
            assert (await c.recv(2)).code == E.TOO_LARGE
            r = await c.request(Verify(session="s", seq=0, pos=1, tokens=[5]))
            assert isinstance(r, Result)
            errors = broker.snapshot()["counters"]["errors"]
            for code in (E.BAD_ENCODING, E.BAD_FRAMES, E.NOT_ALLOWED, E.UNKNOWN_SESSION, E.TOKEN_OUT_OF_RANGE,
                         E.TOO_LARGE):
                assert errors[code] >= 1

    run_async(main())


def test_unknown_worker_told_to_disconnect(broker):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    try:
        sock.connect(broker.backend)
        sock.send(encode(Credit(n=3)))
        assert isinstance(decode(sock.recv()), Disconnect)
        sock.send(encode(SessionOpen(session="s", prompt_ids=[1])))  # client message on the backend
        reply = decode(sock.recv())
        assert isinstance(reply, Error) and reply.code == E.NOT_ALLOWED
        sock.send(encode(Ready(kind="target", model="m", capacity=1)))
        assert isinstance(decode(sock.recv()), Heartbeat)  # registered: the broker beats to it
    finally:
        sock.close()


def test_shutdown_drains_inflight_and_refuses_new_work(make_broker):
    broker = make_broker(grace_s=5.0)

    async def main():
        async with Worker(broker.backend, "f", kind="fused", credit=2, auto=False) as f, \
                BrokerClient(broker.frontend) as c:
            await registered(broker, 1)
            await c.send(Generate(job="j", prompt="hi"))
            assert await wait_for(lambda: len(f.of_type(Generate)) == 1)
            broker.broker.stop()
            assert await wait_for(lambda: not broker.snapshot()["accepting"])
            refused = await c.request(Generate(job="k", prompt="late"))
            assert isinstance(refused, Error) and refused.code == E.SHUTTING_DOWN
            for reply in answer(f.of_type(Generate)[0], "f"):
                await f.link.send(reply)
            msgs = [await c.recv(2) for _ in range(4)]
            assert isinstance(msgs[-1], Done)  # in-flight work finished within the grace period

    run_async(main())
    broker._thread.join(5)
    assert not broker._thread.is_alive()


@pytest.mark.slow
def test_cli_broker_exits_0_on_sigterm():
    fe, be = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "specmq.cli", "broker", "--frontend", f"tcp://127.0.0.1:{fe}",
                             "--backend", f"tcp://127.0.0.1:{be}", "--config", str(ROOT / "configs/broker.yaml"),
                             "--grace-s", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async def ping():
            async with BrokerClient(f"tcp://127.0.0.1:{fe}", timeout=1.0) as c:
                return await c.stats()

        snap = run_async(ping(), 20)
        assert "queues" in snap and "counters" in snap
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "import torch" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_broker_never_imports_torch():
    code = "import sys, broker.broker, specmq.commands.broker, broker.client, workers.link, workers.echo_worker; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_worker_link_reregisters_after_broker_restart(make_broker):
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    first = make_broker(frontend=fe, backend=be)

    async def main():
        async with Worker(be, "a") as a:
            await registered(first, 1)
            first.stop()
            second = make_broker(frontend=fe, backend=be)  # same addresses, empty state
            await registered(second, 1)
            assert a.link.reconnects >= 1
            assert any(isinstance(m, Disconnect) for m in a.seen)  # the worker was told its sessions are gone
            async with BrokerClient(fe) as c:
                assert isinstance(await c.request(SessionOpen(session="s", prompt_ids=[1])), SessionOpened)

    run_async(main())


def test_close_forgets_inflight_work_and_late_answers(broker):
    async def main():
        async with Worker(broker.backend, "a", credit=4) as a, BrokerClient(broker.frontend) as c:
            await registered(broker, 1)
            assert isinstance(await c.request(SessionOpen(session="s", prompt_ids=[1])), SessionOpened)
            a.auto = False
            await c.send(Verify(session="s", seq=0, pos=1, tokens=[3]))
            assert await wait_for(lambda: len(a.of_type(Verify)) == 1)
            assert broker.snapshot()["queues"]["verify:a"]["inflight"] == 1
            await c.send(SessionClose(session="s"))
            assert await wait_for(lambda: len(a.of_type(SessionClose)) == 1)
            assert broker.broker.state.inflight() == 0 and broker.snapshot()["sessions"] == 0
            await a.link.send(answer(a.of_type(Verify)[0], "a")[0])  # a late answer is dropped and counted
            assert await wait_for(lambda: broker.snapshot()["counters"]["dropped"] == 1)
            assert await c.recv(0.2) is None

    run_async(main())


def test_idle_session_of_a_silent_client_is_closed_on_its_target(make_broker):
    """A drafter that crashes never sends SessionClose: the broker closes its session after session_idle_s."""
    broker = make_broker(session_idle_s=0.3)

    async def main():
        async with Worker(broker.backend, "a") as a, BrokerClient(broker.frontend) as c:
            await registered(broker, 1)
            assert isinstance(await c.request(SessionOpen(session="busy", prompt_ids=[1, 2])), SessionOpened)
            assert isinstance(await c.request(SessionOpen(session="gone", prompt_ids=[1, 2])), SessionOpened)
            pos, seq, deadline = 2, 0, time.monotonic() + 5
            while not broker.snapshot()["counters"]["sessions_expired"]:  # "busy" talks until silent "gone" expires
                assert time.monotonic() < deadline, "the silent session was never expired"
                r = await c.request(Verify(session="busy", seq=seq, pos=pos, tokens=[5]))
                assert isinstance(r, Result)
                pos, seq = r.pos, seq + 1
            assert broker.snapshot()["counters"]["sessions_expired"] == 1
            assert await wait_for(lambda: a.of_type(SessionClose), 5)
            closed = [m.session.split("/", 1)[1] for m in a.of_type(SessionClose)]
            assert closed == ["gone"]  # its target got the close (slot freed); the active session was kept
            late = await c.request(Verify(session="gone", seq=0, pos=2, tokens=[5]))
            assert isinstance(late, Error) and late.code == E.UNKNOWN_SESSION  # the drafter re-opens on this
            r = await c.request(Verify(session="busy", seq=seq, pos=pos, tokens=[5]))
            assert isinstance(r, Result)

    run_async(main())


def test_worker_link_stays_connected_while_its_worker_is_busy(make_broker):
    """A worker whose coroutine is stuck in a long step (a forward in a thread, not reading the link) longer than
    its liveness window must not call a live broker silent: the broker's heartbeats are in its socket."""
    b = make_broker(heartbeat_interval=0.05, liveness=100)
    link = WorkerLink(b.backend, Ready(kind="target", model="echo", capacity=4, vocab_size=1000, worker="busy",
                                       max_gamma=8), heartbeat_interval=0.05, liveness=8, initial_credit=4)

    async def main():
        await link.start()
        try:
            await registered(b, 1)
            await asyncio.to_thread(time.sleep, 0.05 * 8 * 4)  # 4 liveness windows without recv
            assert link.reconnects == 0
            assert list(b.snapshot()["workers"]) == ["busy"]
        finally:
            await link.close()

    run_async(main())

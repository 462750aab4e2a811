"""Fencing: a worker's answers computed for an earlier registration (incarnation) are dropped and counted, never
passed off as answers for the registration that replaced it."""
from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
import zmq

from protocol.codec import decode, encode
from protocol.messages import (Busy, Credit, Disconnect, Done, Error, Generate, Heartbeat, Message, Ready, Reopen,
                               Result, SessionOpen, SessionOpened, Tokens, Verify)
from tests.conftest import run_async, wait_until
from tests.model_fixtures import tiny_pair  # noqa: F401  (fixture)
from workers.echo_worker import answer
from workers.link import WorkerLink

class Peer:
    """A scripted DEALER (a fake worker or a client) with bounded receives; closed by the fixture."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg: Message) -> None:
        self.sock.send(encode(msg))

    def recv(self, timeout: float = 5.0) -> Message:
        """The next message that is not a heartbeat."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise AssertionError(f"nothing within {timeout}s")
            msg = decode(self.sock.recv(), max_frame=1 << 24)
            if not isinstance(msg, Heartbeat):
                return msg

    def silent(self, timeout: float = 0.3) -> bool:
        """Nothing but heartbeats arrives for ``timeout`` seconds."""
        try:
            self.recv(timeout)
        except AssertionError:
            return True
        return False


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(endpoint: str) -> Peer:
        made.append(Peer(endpoint))
        return made[-1]

    yield make
    for p in made:
        p.sock.close(linger=0)


def _register(worker: Peer, broker, kind: str, incarnation: int) -> None:
    worker.send(Ready(kind=kind, model="m", capacity=4, vocab_size=100, worker="w", incarnation=incarnation))
    worker.send(Credit(n=10))
    assert wait_until(lambda: broker.snapshot()["workers"].get("w", {}).get("incarnation") == incarnation)


def test_answers_of_an_earlier_registration_are_dropped_and_counted(make_broker, peers):
    """Register, take an open and a verify, re-register (a stalled worker whose link reconnected), then answer the
    old requests: the stale SessionOpened and Result would otherwise pass for answers to the re-opened session (same
    target, same session, same seq); they are dropped and counted, and the new registration's answers go through."""
    b = make_broker(metrics_port=0, heartbeat_interval=0.2, liveness=50)
    worker, client = peers(b.backend), peers(b.frontend)
    _register(worker, b, "target", incarnation=1)

    client.send(SessionOpen(session="s", prompt_ids=[1, 2]))
    opened = worker.recv()
    assert isinstance(opened, SessionOpen) and opened.incarnation == 1  # the broker stamps forwarded requests
    key = opened.session
    worker.send(SessionOpened(session=key, pos=2, incarnation=1))
    got = client.recv()
    assert isinstance(got, SessionOpened) and got.pos == 2 and got.incarnation == 0  # clients never see it
    client.send(Verify(session="s", seq=0, pos=2, tokens=[3]))
    old_verify = worker.recv()
    assert isinstance(old_verify, Verify) and old_verify.incarnation == 1

    # the worker stalls; its link re-registers meanwhile: the broker re-places the session (here: the same worker)
    _register(worker, b, "target", incarnation=2)
    reopen = client.recv()
    assert isinstance(reopen, Reopen) and reopen.session == "s"
    client.send(SessionOpen(session="s", prompt_ids=[1, 2, 3, 4]))
    reopened = worker.recv()
    assert isinstance(reopened, SessionOpen) and reopened.incarnation == 2 and reopened.session == key

    worker.send(SessionOpened(session=key, pos=2, incarnation=1))  # the old open's answer, finishing late
    worker.send(SessionOpened(session=key, pos=4, incarnation=2))
    got = client.recv()
    assert isinstance(got, SessionOpened) and got.pos == 4
    client.send(Verify(session="s", seq=0, pos=4, tokens=[5]))
    new_verify = worker.recv()
    assert isinstance(new_verify, Verify) and new_verify.incarnation == 2 and new_verify.seq == old_verify.seq
    worker.send(Result(session=key, seq=0, accepted=1, tokens=[3, 9], pos=4, incarnation=1))  # the stalled tick's
    worker.send(Error(code="worker_error", message="late", session=key, seq=0, incarnation=1))
    worker.send(Result(session=key, seq=0, accepted=1, tokens=[5, 6], pos=6, incarnation=2))
    got = client.recv()
    assert isinstance(got, Result) and got.tokens == [5, 6] and got.pos == 6
    assert client.silent()

    snap = b.snapshot()
    assert snap["counters"]["stale_answers"] == 3
    text = urllib.request.urlopen(snap["metrics"], timeout=5).read().decode()
    assert "specmq_stale_answers_total 3.0" in text


def test_a_redelivered_job_ignores_its_earlier_delivery_to_the_same_worker(make_broker, peers):
    b = make_broker(heartbeat_interval=0.2, liveness=50)
    worker, client = peers(b.backend), peers(b.frontend)
    _register(worker, b, "fused", incarnation=5)
    client.send(Generate(job="j", prompt_ids=[1, 2], max_new_tokens=2))
    first = worker.recv()
    assert isinstance(first, Generate) and first.incarnation == 5 and first.delivery == 0

    _register(worker, b, "fused", incarnation=6)  # re-registered: the job is redelivered, here to the same worker
    again = worker.recv()
    assert isinstance(again, Generate) and again.job == first.job and again.delivery == 1 and again.incarnation == 6
    worker.send(Tokens(job=first.job, tokens=[7], index=0, incarnation=5))  # the first delivery, still streaming
    worker.send(Done(job=first.job, token_ids=[7, 8], incarnation=5))
    worker.send(Tokens(job=first.job, tokens=[40], index=0, incarnation=6))
    worker.send(Done(job=first.job, token_ids=[40, 41], incarnation=6))
    got = [client.recv(), client.recv()]
    assert isinstance(got[0], Tokens) and got[0].tokens == [40]
    assert isinstance(got[1], Done) and got[1].token_ids == [40, 41]
    assert client.silent()
    assert b.snapshot()["counters"]["stale_answers"] == 2


def test_the_link_registers_with_a_fresh_incarnation_each_time_and_answers_echo_the_request(peers):
    """A fake broker (ROUTER) tells the link to go away: it re-registers on a new socket with a new incarnation."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def ready(timeout: float = 5.0) -> tuple[bytes, Ready]:
        deadline = time.monotonic() + timeout
        while router.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            ident, body = router.recv_multipart()
            msg = decode(body)
            if isinstance(msg, Ready):
                return ident, msg
        raise AssertionError("no Ready")

    async def main() -> None:
        link = WorkerLink(f"tcp://127.0.0.1:{port}", Ready(kind="target", model="m", capacity=1, worker="l"),
                          heartbeat_interval=0.1, liveness=50)
        await link.start()
        try:
            ident, first = await asyncio.to_thread(ready)
            assert first.incarnation == link.incarnation != 0
            router.send_multipart([ident, encode(Disconnect(reason="unknown worker: send ready"))])
            assert isinstance(await link.recv(timeout=5), Disconnect)  # handed over after re-registering
            ident2, second = await asyncio.to_thread(ready)
            assert ident2 != ident and second.incarnation == link.incarnation not in (0, first.incarnation)
            verify = Verify(session="k", seq=0, pos=1, tokens=[2], incarnation=first.incarnation)
            (res,) = answer(verify)
            assert isinstance(res, Result) and res.incarnation == first.incarnation  # its request's, not the link's
        finally:
            await link.close()

    try:
        run_async(main(), 20)
    finally:
        router.close(linger=0)


def test_the_target_server_answers_with_the_incarnation_of_each_request(tiny_pair, one_torch_thread):
    from protocol import errors as E
    from workers.engine import load_engine
    from workers.target_worker import TargetConfig, TargetServer

    server = TargetServer(load_engine(tiny_pair.target, slots=1, max_context=64), TargetConfig(max_waiting_opens=0))

    def ticks() -> list[Message]:
        out: list[Message] = []
        while server.oldest() is not None:
            tick = server.take_tick()
            out += server.finish(tick, server.compute(tick), 1.0)
        return out

    assert server.handle(SessionOpen(session="a", prompt_ids=[1, 5, 6, 7], max_new_tokens=8, incarnation=3)) == []
    (opened,) = ticks()
    assert isinstance(opened, SessionOpened) and opened.incarnation == 3  # answered a tick later: kept per session
    (busy,) = server.handle(SessionOpen(session="b", prompt_ids=[1, 5], max_new_tokens=8, incarnation=8))  # no slot
    assert isinstance(busy, Busy) and busy.incarnation == 8
    assert server.handle(Verify(session="a", seq=0, pos=4, tokens=[5], incarnation=4)) == []
    (res,) = ticks()
    assert isinstance(res, Result) and res.incarnation == 4
    (again,) = server.handle(Verify(session="a", seq=0, pos=4, tokens=[5], incarnation=9))  # a resend
    assert again.seq == 0 and again.incarnation == 9
    (err,) = server.handle(Verify(session="a", seq=5, pos=4, tokens=[5], incarnation=6))
    assert isinstance(err, Error) and err.code == E.BAD_SEQUENCE and err.incarnation == 6

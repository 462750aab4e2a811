"""Target worker: greedy output through broker + target equals target-only greedy; many sessions share a tick;
bad input is answered with the right code without disturbing other sessions; resends are idempotent."""
from __future__ import annotations

import asyncio

import pytest
import torch

from broker.client import BrokerClient, wait_for
from protocol import errors as E
from protocol.messages import Busy, Error, Result, SessionClose, SessionOpen, SessionOpened, Verify
from tests.conftest import run_async
from tests.model_fixtures import tiny_pair  # noqa: F401  (fixture)
from workers.engine import load_engine
from workers.sampling import SamplingParams
from workers.speculation import DraftChunk, apply_result_to_draft, autoregressive_generate, draft_chunk, prefill
from workers.target_worker import TargetConfig, TargetServer, serve_target
from workers.tokenizer_text import encode, load_tokenizer

GREEDY = SamplingParams()
TEXTS = ["Once upon a time", "The quick brown fox", "A message queue carries", "She said hello"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def broker(patient_broker):
    return patient_broker


@pytest.fixture(scope="module")
def prompts(tiny_pair):
    tok = load_tokenizer(tiny_pair.target)
    return [encode(tok, t) for t in TEXTS]


@pytest.fixture(scope="module")
def reference(tiny_pair, prompts):
    """Target-only greedy continuations (the baseline every speculative path must equal)."""
    eng = load_engine(tiny_pair.target, slots=1, max_context=256)
    return [autoregressive_generate(eng, p, 24, GREEDY).tokens for p in prompts]


class Drafter:
    """A minimal draft client: SessionOpen, then Verify chunks made by a draft engine with ``draft_chunk``."""

    def __init__(self, client: BrokerClient, engine, sid: str, prompt: list[int], gamma: int = 3,
                 max_new: int = 24, tokenizer: str = "") -> None:
        self.client, self.engine, self.sid, self.prompt = client, engine, sid, prompt
        self.gamma, self.max_new, self.tokenizer = gamma, max_new, tokenizer
        self.out: list[int] = []
        self.seq = 0

    async def open(self) -> object:
        return await self.client.request(SessionOpen(session=self.sid, prompt_ids=self.prompt,
                                                     max_new_tokens=self.max_new, tokenizer=self.tokenizer),
                                         timeout=20)

    async def run(self) -> list[int]:
        opened = await self.open()
        assert isinstance(opened, SessionOpened), opened
        slot = self.engine.allocate()
        uncached = [prefill(self.engine, slot, self.prompt)]
        pos = len(self.prompt)
        try:
            while True:
                g = max(1, min(self.gamma, self.max_new - len(self.out) - 1))
                chunk = draft_chunk(self.engine, slot, uncached, g, GREEDY)
                res = await self.client.request(Verify(session=self.sid, seq=self.seq, pos=pos,
                                                       tokens=chunk.tokens), timeout=20)
                assert isinstance(res, Result), res
                self.seq += 1
                self.out += res.tokens
                pos = res.pos
                if res.finished:
                    return self.out
                uncached = apply_result_to_draft(self.engine, slot, chunk, res.accepted, res.tokens)
        finally:
            self.engine.free(slot)
            await self.client.send(SessionClose(session=self.sid))


async def _with_target(broker, tiny_pair, body, config: TargetConfig | None = None, slots: int = 8):
    """Run ``body(client, server)`` against an in-process target worker on the broker."""
    engine = load_engine(tiny_pair.target, slots=slots, max_context=256)
    stop = asyncio.Event()
    holder = []
    task = asyncio.create_task(serve_target(broker.backend, engine, config or TargetConfig(name="t0"), stop=stop,
                                            heartbeat_interval=0.2, liveness=25, on_server=holder.append))
    try:
        assert await wait_for(lambda: len(broker.snapshot()["workers"]) == 1, timeout=10)
        async with BrokerClient(broker.frontend, timeout=20) as client:
            return await body(client, holder[0])
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_greedy_through_target_equals_target_only_and_sessions_share_ticks(broker, tiny_pair, prompts, reference):
    draft = load_engine(tiny_pair.draft, slots=8, max_context=256)

    async def body(client, server):
        drafters = [Drafter(client, draft, f"s{i}", p) for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*(d.run() for d in drafters))
        return outs, server.stats()

    # a long tick so the four drafters' chunks meet in one forward
    outs, stats = run_async(_with_target(broker, tiny_pair, body, TargetConfig(name="t0", tick_ms=50)), 120)
    assert outs == [r[:24] for r in reference]
    assert stats["max_batch_rows"] > 1
    assert stats["drafted"] > 0 and 0 <= stats["accepted"] <= stats["drafted"]
    assert stats["slots_total"] == 8


def test_bad_input_answered_per_session_and_resend_is_idempotent(broker, tiny_pair, prompts, reference):
    draft = load_engine(tiny_pair.draft, slots=8, max_context=256)
    fp = load_engine(tiny_pair.target, slots=1, max_context=16).info.tokenizer_fingerprint

    async def body(client, server):
        good = Drafter(client, draft, "good", prompts[0], tokenizer=fp)
        worker = asyncio.create_task(good.run())
        codes = {}
        r = await client.request(SessionOpen(session="tok", prompt_ids=prompts[1], tokenizer="0" * 16))
        codes["tokenizer"] = (r.code, r.message)
        r = await client.request(SessionOpen(session="long", prompt_ids=prompts[1], max_new_tokens=1000))
        codes["context"] = r.code
        r = await client.request(SessionOpen(session="ok", prompt_ids=prompts[1], max_new_tokens=8))
        assert isinstance(r, SessionOpened) and r.pos == len(prompts[1])
        r = await client.request(Verify(session="ok", seq=0, pos=r.pos + 5, tokens=[5]))
        codes["pos"] = r.code
        r = await client.request(Verify(session="ok", seq=3, pos=len(prompts[1]), tokens=[5]))
        codes["seq"] = r.code
        r = await client.request(Verify(session="ok", seq=0, pos=len(prompts[1]), tokens=[5] * 40))
        codes["gamma"] = r.code
        r = await client.request(Verify(session="ok", seq=0, pos=len(prompts[1]), tokens=[5, 10 ** 6]))
        codes["vocab"] = r.code
        r = await client.request(Verify(session="nope", seq=0, pos=3, tokens=[5]))
        codes["unknown"] = r.code
        first = await client.request(Verify(session="ok", seq=0, pos=len(prompts[1]), tokens=[7, 8]))
        again = await client.request(Verify(session="ok", seq=0, pos=len(prompts[1]), tokens=[7, 8]))
        ticks = server.counters["ticks"]
        out = await asyncio.wait_for(worker, 60)
        return codes, first, again, out, ticks

    codes, first, again, out, _ = run_async(_with_target(broker, tiny_pair, body), 120)
    assert codes["tokenizer"][0] == E.TOKENIZER_MISMATCH
    assert "0" * 16 in codes["tokenizer"][1] and fp in codes["tokenizer"][1]
    assert codes["context"] == E.CONTEXT_TOO_LONG
    assert codes["pos"] == E.BAD_SEQUENCE and codes["seq"] == E.BAD_SEQUENCE
    assert codes["gamma"] == E.GAMMA_TOO_LARGE and codes["vocab"] == E.TOKEN_OUT_OF_RANGE
    assert codes["unknown"] == E.UNKNOWN_SESSION
    assert isinstance(first, Result) and first == again
    assert out == reference[0][:24]  # the well-behaved session never noticed


# ---------------------------------------------------------------------- the state machine alone (no sockets)
def _run_ticks(server: TargetServer) -> list:
    out = []
    while server.oldest() is not None:
        tick = server.take_tick()
        out += server.finish(tick, server.compute(tick), 1.0)
    return out


def test_server_checks_each_request_itself(tiny_pair, prompts):
    engine = load_engine(tiny_pair.target, slots=2, max_context=64)
    server = TargetServer(engine, TargetConfig(max_gamma=4, prefill_chunk=3, max_batch_tokens=8,
                                               max_waiting_opens=1))
    handled = []
    real_handle = server.handle
    server.handle = lambda msg: handled.append(msg) or real_handle(msg)
    p = prompts[0]
    assert server.handle(SessionOpen(session="a", prompt_ids=p, max_new_tokens=8)) == []
    opened = _run_ticks(server)  # prefilled in chunks of 3 over several ticks
    assert [type(m) for m in opened] == [SessionOpened] and opened[0].pos == len(p)
    assert engine.length(server.sessions["a"].slot) == len(p) - 1
    pos = len(p)

    def code(msg):
        (reply,) = server.handle(msg)
        return reply.code

    assert code(Verify(session="zz", seq=0, pos=pos, tokens=[1])) == E.UNKNOWN_SESSION
    assert code(Verify(session="a", seq=0, pos=pos, tokens=[1] * 5)) == E.GAMMA_TOO_LARGE
    assert code(Verify(session="a", seq=0, pos=pos, tokens=[1, 999])) == E.TOKEN_OUT_OF_RANGE
    assert code(Verify(session="a", seq=1, pos=pos, tokens=[1])) == E.BAD_SEQUENCE
    assert code(Verify(session="a", seq=0, pos=pos - 1, tokens=[1])) == E.BAD_SEQUENCE
    assert code(SessionOpen(session="b", prompt_ids=p, tokenizer="feedface")) == E.TOKENIZER_MISMATCH
    assert code(SessionOpen(session="b", prompt_ids=[1] * 60, max_new_tokens=10)) == E.CONTEXT_TOO_LONG
    assert code(SessionOpen(session="b", prompt_ids=[1, 500], max_new_tokens=4)) == E.TOKEN_OUT_OF_RANGE
    assert code(SessionOpen(session="b", prompt_ids=[1], max_new_tokens=4, temperature=-1)) == E.BAD_REQUEST
    assert code(SessionOpen(session="b", prompt_ids=[1], max_new_tokens=4, policy="nonsense")) == E.BAD_REQUEST
    # slots: b takes the last one, c waits for a slot, d is refused with Busy
    assert server.handle(SessionOpen(session="b", prompt_ids=[1], max_new_tokens=4))[0].pos == 1
    assert server.handle(SessionOpen(session="c", prompt_ids=[1, 5], max_new_tokens=4)) == []
    (busy,) = server.handle(SessionOpen(session="d", prompt_ids=[1], max_new_tokens=4))
    assert isinstance(busy, Busy) and busy.session == "d"
    assert server.handle(SessionClose(session="b")) == []  # c is admitted (prefill pending)
    assert "c" in server.sessions and not server.waiting_opens
    # the first session still verifies fine, and a resend of its seq returns the same answer
    assert server.handle(Verify(session="a", seq=0, pos=pos, tokens=[5, 6])) == []
    results = [m for m in _run_ticks(server) if isinstance(m, Result)]
    assert len(results) == 1 and results[0].pos == pos + len(results[0].tokens)
    assert server.handle(Verify(session="a", seq=0, pos=pos, tokens=[5, 6])) == results
    assert engine.length(server.sessions["a"].slot) == results[0].pos - 1
    # a q that does not fit its chunk is refused at once (the codec's verdict), the cache is untouched and the seq
    # can be sent again (a q that fits but cannot have produced its token fails at the tick: test_speculation)
    pos = results[0].pos
    (bad,) = server.handle(Verify(session="a", seq=1, pos=pos, tokens=[5], **DraftChunk(
        [5, 6], [torch.tensor([5]), torch.tensor([6])], [torch.ones(1), torch.ones(1)]).q_wire()))
    assert isinstance(bad, Error) and bad.code == E.BAD_FIELD and "one entry per draft token" in bad.message
    assert bad.seq == 1 and engine.length(server.sessions["a"].slot) == pos - 1
    assert not [m for m in _run_ticks(server) if isinstance(m, (Result, Error))]  # nothing was queued
    server.handle(Verify(session="a", seq=1, pos=pos, tokens=[5]))
    assert any(isinstance(m, Result) and m.seq == 1 for m in _run_ticks(server))
    _run_ticks(server)  # c's prompt
    # every request was answered or finished, so each gave back exactly one credit
    assert server.take_credits() == len(handled)


def test_forward_failure_answers_worker_error_and_keeps_sessions(tiny_pair, prompts):
    engine = load_engine(tiny_pair.target, slots=2, max_context=64)
    server = TargetServer(engine)
    server.handle(SessionOpen(session="a", prompt_ids=prompts[0], max_new_tokens=4))
    _run_ticks(server)
    pos = len(prompts[0])
    server.handle(Verify(session="a", seq=0, pos=pos, tokens=[5]))
    tick = server.take_tick()
    from workers.engine import EngineError
    (err,) = server.finish(tick, EngineError("boom"), 1.0)
    assert isinstance(err, Error) and err.code == E.WORKER_ERROR and err.seq == 0
    server.handle(Verify(session="a", seq=0, pos=pos, tokens=[5]))  # the same chunk again: now it works
    (res,) = _run_ticks(server)
    assert isinstance(res, Result) and res.seq == 0


def test_long_prompt_is_prefilled_in_chunks_beside_decodes(tiny_pair, prompts, reference):
    engine = load_engine(tiny_pair.target, slots=2, max_context=256)
    server = TargetServer(engine, TargetConfig(prefill_chunk=8, max_batch_tokens=12))
    p = prompts[0]
    server.handle(SessionOpen(session="a", prompt_ids=p, max_new_tokens=24))
    _run_ticks(server)
    long_prompt = (prompts[1] * 6)[:45]
    server.handle(SessionOpen(session="b", prompt_ids=long_prompt, max_new_tokens=8))
    server.handle(Verify(session="a", seq=0, pos=len(p), tokens=reference[0][:3]))
    tick = server.take_tick()
    assert tick.plan.verify == ["a"] and tick.plan.prefill == [("b", 8)]  # 4 verify tokens + 8 prompt tokens
    (res,) = server.finish(tick, server.compute(tick), 1.0)
    assert isinstance(res, Result) and res.accepted == 3 and res.tokens == reference[0][:4]
    rest = _run_ticks(server)
    assert [type(m) for m in rest] == [SessionOpened] and rest[0].pos == len(long_prompt)
    assert engine.length(server.sessions["b"].slot) == len(long_prompt) - 1
    assert server.stats()["ticks"] >= 1 + 44 // 8


def test_sampled_chunks_with_q_are_reproducible_and_reset_frees_every_slot(tiny_pair, prompts):
    draft = load_engine(tiny_pair.draft, slots=1, max_context=256)
    params = SamplingParams(temperature=0.8, seed=7)
    slot = draft.allocate()
    chunk = draft_chunk(draft, slot, [prefill(draft, slot, prompts[2])], 4, params,
                        torch.Generator().manual_seed(3))
    results = []
    for _ in range(2):
        engine = load_engine(tiny_pair.target, slots=2, max_context=256)
        server = TargetServer(engine)
        server.handle(SessionOpen(session="s", prompt_ids=prompts[2], max_new_tokens=16, temperature=0.8, seed=7))
        _run_ticks(server)
        server.handle(Verify(session="s", seq=0, pos=len(prompts[2]), tokens=chunk.tokens, **chunk.q_wire()))
        (res,) = _run_ticks(server)
        assert isinstance(res, Result) and len(res.tokens) == res.accepted + 1
        results.append(res)
        from protocol.messages import Disconnect
        server.handle(Disconnect(reason="reconnected"))
        assert not server.sessions and engine.allocate() == 0 and engine.allocate() == 1
    assert [(r.accepted, r.tokens, r.pos) for r in results[:1]] == [(r.accepted, r.tokens, r.pos) for r in results[1:]]


class _QueueLink:
    """Stands in for ``WorkerLink.recv_batch``: hands over what the test puts, one message per call."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.taken = 0

    async def recv_batch(self, max_n: int = 256, timeout: float | None = None) -> list:
        msg = await self.queue.get()
        self.taken += 1
        return [msg]


def test_chunks_arriving_during_a_tick_are_read_then_and_handled_after_it(tiny_pair, prompts):
    """The loop reads the link while the forward runs; those messages keep their arrival time and are handled only
    after ``finish``: a resend of the chunk in flight meets its cached answer, and a chunk that waited out the tick
    is due at once (no second tick_ms wait)."""
    import threading
    import time

    from workers.target_worker import compute_draining

    engine = load_engine(tiny_pair.target, slots=2, max_context=256)
    server = TargetServer(engine, TargetConfig(tick_ms=2.0))
    for key, p in (("a", prompts[0]), ("b", prompts[1])):
        server.handle(SessionOpen(session=key, prompt_ids=p, max_new_tokens=8))
    _run_ticks(server)
    verify_a = Verify(session="a", seq=0, pos=len(prompts[0]), tokens=[5, 6])
    verify_b = Verify(session="b", seq=0, pos=len(prompts[1]), tokens=[7])
    assert server.handle(verify_a) == []
    tick = server.take_tick()
    release, real_compute = threading.Event(), server.compute
    server.compute = lambda t: release.wait(30) and real_compute(t)

    async def scenario():
        link = _QueueLink()
        task = asyncio.create_task(compute_draining(link, server, tick))
        for m in (verify_b, verify_a):  # b's first chunk, then a resend of a's chunk in flight
            link.queue.put_nowait(m)
        assert await wait_for(lambda: link.taken == 2, timeout=10)
        read_by = time.monotonic()
        await asyncio.sleep(2 * server.limits.tick_ms / 1000.0)  # b has now waited longer than tick_ms
        release.set()
        outcomes, arrivals = await asyncio.wait_for(task, 30)
        return outcomes, arrivals, read_by

    outcomes, arrivals, read_by = run_async(scenario(), 60)
    ended = time.monotonic()
    assert [m for m, _ in arrivals] == [verify_b, verify_a]
    assert all(tick.started <= at <= read_by for _, at in arrivals)  # stamped when read, during the forward
    server.count_mid_tick(tick, arrivals)
    assert server.stats()["mid_tick_chunks"] == 2
    (result_a,) = server.finish(tick, outcomes, 1.0, ended)
    assert isinstance(result_a, Result) and result_a.seq == 0
    replies = [r for m, at in arrivals for r in server.handle(m, at)]
    assert replies == [result_a]  # the resend got the cached answer, never a second verify
    assert server.due(time.monotonic())  # b waited out the tick: the next tick starts now
    (result_b,) = _run_ticks(server)
    assert isinstance(result_b, Result) and result_b.session == "b" and result_b.queue_ms > 0
    # b came during a's tick: the wait until that tick ended is busy wait, not gather
    assert 2 * server.limits.tick_ms <= result_b.busy_wait_ms <= result_b.queue_ms


def test_busy_wait_is_the_part_of_the_queue_spent_while_earlier_ticks_ran(tiny_pair, prompts):
    """queue_ms = busy_wait_ms (a tick was running: it arrived during one, or was left out of one for budget) +
    the gather window and the loop's handling (the device idle)."""
    engine = load_engine(tiny_pair.target, slots=3, max_context=256)
    server = TargetServer(engine, TargetConfig(tick_ms=2.0, max_batch_rows=1))
    for key, p in zip("abc", prompts):
        server.handle(SessionOpen(session=key, prompt_ids=p, max_new_tokens=8))
    _run_ticks(server)

    def chunk(key: str, i: int) -> Verify:
        return Verify(session=key, seq=0, pos=len(prompts[i]), tokens=[5])

    t = server.busy_until + 100.0  # virtual time from here: every stamp is given, nothing depends on this machine
    assert server.handle(chunk("a", 0), now=t) == []
    tick_a = server.take_tick(now=t + 0.001)  # a alone: 1 ms of gather
    (res_a,) = server.finish(tick_a, server.compute(tick_a), 30.0, ended=t + 0.031)
    assert res_a.queue_ms == 1.0 and res_a.busy_wait_ms == 0.0
    # b arrived 10 ms into a's tick (read then, handled after it); c before a tick that had no room for it
    assert server.handle(chunk("b", 1), now=t + 0.011) == []
    assert server.handle(chunk("c", 2), now=t + 0.032) == []
    tick_b = server.take_tick(now=t + 0.033)
    assert [k for k, _ in tick_b.verify] == ["b"]  # max_batch_rows=1: c waits out b's tick
    (res_b,) = server.finish(tick_b, server.compute(tick_b), 20.0, ended=t + 0.053)
    assert res_b.queue_ms == 22.0 and res_b.busy_wait_ms == 20.0  # 20 ms on a's tick, 2 ms gather and loop
    tick_c = server.take_tick(now=t + 0.054)
    (res_c,) = server.finish(tick_c, server.compute(tick_c), 20.0, ended=t + 0.074)
    assert res_c.queue_ms == 22.0 and res_c.busy_wait_ms == 20.0  # b's whole tick; 1 ms idle before it, 1 ms after


def test_host_time_between_back_to_back_ticks_reaches_the_controller(broker, tiny_pair, prompts):
    """A decode-mode request keeps the target ticking back to back; the host time between those ticks (answering,
    reading, planning) is what a decoded token costs beyond its forward, and the controller prices decoding with
    it. A tick after an idle wait measures nothing."""
    async def body(client, server):
        opened = await client.request(SessionOpen(session="d", prompt_ids=prompts[0], max_new_tokens=16))
        assert isinstance(opened, SessionOpened)
        assert server.controller.host_ms == 0.0  # only idle waits so far: nothing measured
        res = await client.request(Verify(session="d", seq=0, pos=opened.pos, tokens=[], decode=8), timeout=20)
        assert isinstance(res, Result) and len(res.tokens) == 8
        return server.controller.host_ms, server.stats()

    host_ms, stats = run_async(_with_target(broker, tiny_pair, body, TargetConfig(name="t0")), 60)
    assert 0.0 < host_ms < 1000.0
    assert stats["host_ms"] == pytest.approx(host_ms, abs=1e-3)

"""The draft worker's batcher drafts off the event loop, and each round's time is split honestly (``RoundRow``).

A fake draft engine (slot bookkeeping of the real engines, logits it makes up, a forward that can be held or
slowed) and a fake broker client (answers after a delay measured on a timer thread, as a socket would) stand in for
the model and the broker: what is tested is the loop, not the model.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from broker.client import wait_for
from protocol.messages import Result, SessionOpen, SessionOpened, Verify
from tests.conftest import run_async
from workers.draft_worker import DraftBatcher, DraftConfig, DraftWorker, PromptResult
from workers.engine.base import EngineInfo
from workers.engine.slots import SlotTable, SlotTableEngine
from workers.sampling import SamplingParams
from workers.speculation import DraftRequest

VOCAB = 16


class FakeDraftEngine(SlotTableEngine):
    """Greedy logits that always pick token 3; ``hold(slot)`` makes a forward holding that slot run ``hold_s`` long
    (a draft device busy with that session's batch)."""

    def __init__(self, slots: int = 4, hold_s: float = 0.0, held_slots: frozenset[int] = frozenset()) -> None:
        self.info = EngineInfo("fake-draft", VOCAB, 256, slots, None, "float32", "cpu")
        self.table = SlotTable(slots, 256, VOCAB)
        self.hold_s, self.held_slots = hold_s, held_slots
        self.gate: threading.Event | None = None  # set: forwards wait for it (a step held until the test lets go)
        self.entered = threading.Event()
        self.steps: list[tuple[tuple[int, ...], float, float]] = []  # (slots, start, end) per forward
        self.threads: list[tuple[tuple[int, ...], int]] = []  # (slots, thread id) per forward

    def forward(self, rows, last_only=None) -> list[torch.Tensor]:
        slots, tokens, _ = self.table.check_rows(rows, last_only)
        start = time.perf_counter()
        self.threads.append((tuple(slots), threading.get_ident()))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never released the step"
        if self.held_slots & set(slots):
            time.sleep(self.hold_s)  # blocking, as a forward on the draft device is
        for s, t in zip(slots, tokens):
            self.table.lengths[s] += len(t)
        self.steps.append((tuple(slots), start, time.perf_counter()))
        row = torch.zeros(1, VOCAB)
        row[0, 3] = 1.0
        return [row.clone() for _ in slots]


class FakeClient:
    """Answers SessionOpen at once and each Verify (accepting every draft token) ``delay_s[session]`` after it was
    sent; the answer is released by a timer thread, so a blocked event loop would read it late."""

    def __init__(self, delay_s: dict[str, float], busy_wait_ms: float = 0.0, queue_ms: float = 0.0) -> None:
        self.delay_s, self.busy_wait_ms, self.queue_ms = delay_s, busy_wait_ms, queue_ms
        self.broker_id, self.broker_silent = "fake", False

    async def request(self, msg, timeout=None, retries=None, deadline=None):
        if isinstance(msg, SessionOpen):
            return SessionOpened(session=msg.session, pos=len(msg.prompt_ids))
        assert isinstance(msg, Verify)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        reply = Result(session=msg.session, seq=msg.seq, accepted=len(msg.tokens), tokens=list(msg.tokens) + [5],
                       pos=msg.pos + len(msg.tokens) + 1, verify_ms=1.0, queue_ms=self.queue_ms,
                       busy_wait_ms=self.busy_wait_ms)
        timer = threading.Timer(self.delay_s.get(msg.session, 0.0),
                                lambda: loop.call_soon_threadsafe(fut.set_result, reply))
        timer.start()
        return await fut

    async def send(self, msg) -> None:
        pass


class _Codec:
    def decode(self, ids) -> str:
        return ""


def _worker(engine, gamma: int = 1, max_new: int = 4) -> DraftWorker:
    cfg = DraftConfig(gamma=gamma, max_new_tokens=max_new, gather_ms=1.0)
    return DraftWorker(cfg, engine=engine, codec=_Codec())


async def _run_prompt(worker: DraftWorker, client, prompt: list[int]) -> PromptResult:
    """One session of a ``prompt`` (token ids)."""
    batcher = DraftBatcher(worker.engine, worker.config.gather_ms / 1000.0)
    task = asyncio.create_task(batcher.run())
    res = PromptResult(0, "", prompt)
    try:
        await worker._session(client, batcher, res, "a")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return res


async def _run_sessions(worker: DraftWorker, client, names: list[str]) -> list[PromptResult]:
    batcher = DraftBatcher(worker.engine, worker.config.gather_ms / 1000.0)
    task = asyncio.create_task(batcher.run())
    results = [PromptResult(i, "", [1, 2, 4]) for i in range(len(names))]
    try:
        await asyncio.gather(*(worker._session(client, batcher, r, name) for r, name in zip(results, names)))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return results


def test_a_reply_is_read_while_a_draft_step_runs():
    """The step runs in a thread: with it held, the loop still delivers the reply of a session outside it."""
    engine = FakeDraftEngine()
    engine.gate = threading.Event()
    slot = engine.allocate()

    async def scenario():
        batcher = DraftBatcher(engine, gather_s=0.001)
        batcher.active = 2  # the step's session, and one waiting for its reply
        runner = asyncio.create_task(batcher.run())
        try:
            drafting = asyncio.create_task(batcher.draft(DraftRequest(slot, [1, 2], 1, SamplingParams())))
            assert await wait_for(engine.entered.is_set, timeout=10)  # the step is in the engine, held there
            loop = asyncio.get_running_loop()
            reply = loop.create_future()
            threading.Timer(0.01, lambda: loop.call_soon_threadsafe(reply.set_result, "result")).start()
            got = await asyncio.wait_for(reply, 5)  # read while the step is still held
            assert not drafting.done()
            engine.gate.set()
            return got, await asyncio.wait_for(drafting, 10)
        finally:
            engine.gate.set()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    got, drafted = run_async(scenario(), 30)
    assert got == "result"
    assert drafted.chunk.tokens == [3] and drafted.batch == 1
    assert drafted.draft_ms > 0 and drafted.wait_ms >= 0


def test_a_slow_step_does_not_inflate_the_round_trip_of_a_session_outside_it():
    """Session a's steps hold the draft device for 0.5 s; b's replies come 50 ms after its sends, mostly while one of
    a's steps runs. b's round trips stay near 50 ms (on the loop they would last until a's step ended) and the time
    b waits for the busy device is booked as its draft_wait, not as network or path."""
    engine = FakeDraftEngine(hold_s=0.5)
    worker = _worker(engine, gamma=1, max_new=6)
    engine.held_slots = frozenset({0})  # session "a" takes slot 0 (allocated first)
    client = FakeClient({"a": 0.0, "b": 0.05})
    results = run_async(_run_sessions(worker, client, ["a", "b"]), 60)
    assert all(r.finished and r.error is None for r in results), [r.error for r in results]
    rows_b = [r for r in worker.rows if r.session == 1]
    assert rows_b
    assert max(r.network_ms for r in rows_b) < 300.0  # not the 450+ ms a step on the loop would add
    assert max(r.path_ms for r in rows_b) < 300.0
    assert max(r.draft_wait_ms for r in rows_b) > 100.0  # it waited for a's step to finish before its own
    loop_thread = threading.get_ident()
    both = [t for slots, t in engine.threads if len(slots) == 2]
    alone = [t for slots, t in engine.threads if len(slots) == 1]
    assert both and all(t == loop_thread for t in both)  # a step of every live session stays on the loop
    assert any(t != loop_thread for t in alone)  # a's step while b waited for its reply went to a thread


def test_round_parts_add_up_and_carry_the_target_split():
    """draft_wait + draft + path + busy_wait + verify covers the round; busy_wait comes from the Result; the
    controller's Verify.path_ms keeps every wait (the draft wait, and the target's in network_ms)."""
    engine = FakeDraftEngine()
    worker = _worker(engine, gamma=2, max_new=12)
    client = FakeClient({"a": 0.03}, busy_wait_ms=4.0, queue_ms=6.0)
    sent: list[Verify] = []
    request = client.request

    async def spy(msg, **kw):
        if isinstance(msg, Verify):
            sent.append(msg)
        return await request(msg, **kw)

    client.request = spy
    (res,) = run_async(_run_sessions(worker, client, ["a"]), 30)
    assert res.finished and res.error is None
    rows = worker.rows
    assert len(rows) == res.rounds >= 3
    for r in rows:
        assert r.busy_wait_ms == 4.0 and r.queue_ms == 6.0 and r.verify_ms == 1.0
        assert r.draft_wait_ms >= 0 and r.draft_ms > 0 and r.batch == 1
        trip = r.path_ms + r.busy_wait_ms + r.verify_ms  # the chunk's trip, from its step's end to its reply
        assert trip >= 30.0  # the answer's delay is inside it
        assert r.network_ms >= r.path_ms + r.busy_wait_ms - 5.0  # same trip, counted from the send instead
    # the controller's input: what the previous round cost beyond drafting and verifying, every wait included
    # (none before the first answer, and none from the first round: it waits behind every new prompt)
    assert sent[0].path_ms == sent[1].path_ms == 0.0 and len(sent) >= 3
    assert [m.path_ms for m in sent[2:]] == [pytest.approx(r.draft_wait_ms + r.network_ms, abs=0.01)
                                             for r in rows[1:-1]]


def test_a_slot_released_during_its_step_is_freed_after_the_step():
    """A session cancelled while its batch drafts must not free its slot under the running step (a new session
    could take it and the step would then write into it): the free waits for the step's end."""
    engine = FakeDraftEngine(slots=2)
    engine.gate = threading.Event()
    slot = engine.allocate()

    async def scenario():
        batcher = DraftBatcher(engine, gather_s=0.001)
        batcher.active = 2  # another live session: the step goes to a thread
        runner = asyncio.create_task(batcher.run())
        try:
            asyncio.create_task(batcher.draft(DraftRequest(slot, [1, 2], 1, SamplingParams())))
            assert await wait_for(engine.entered.is_set, timeout=10)
            batcher.release(slot)  # its session gave up while the step holds the slot
            still_taken = engine.table.taken[slot]
            engine.gate.set()
            assert await wait_for(lambda: not engine.table.taken[slot], timeout=10)
            return still_taken
        finally:
            engine.gate.set()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    assert run_async(scenario(), 30) is True
    assert engine.table.lengths[slot] == 0 and engine.allocate() == slot


def test_the_gather_keeps_a_burst_together_and_ends_when_the_requests_stop():
    """Three live sessions, two of which ask 20 ms apart; the third never does (its chunk is still at the target):
    the two share one step, which starts once no request came for quiet_s, long before gather_s."""
    engine = FakeDraftEngine(slots=3)
    slots = [engine.allocate() for _ in range(2)]

    async def scenario():
        batcher = DraftBatcher(engine, gather_s=60.0, quiet_s=0.3)
        batcher.active = 3
        runner = asyncio.create_task(batcher.run())
        try:
            started = time.perf_counter()
            first = asyncio.create_task(batcher.draft(DraftRequest(slots[0], [1, 2], 1, SamplingParams())))
            await asyncio.sleep(0.02)
            second = asyncio.create_task(batcher.draft(DraftRequest(slots[1], [1, 2], 1, SamplingParams())))
            done = await asyncio.wait_for(asyncio.gather(first, second), 30)
            return done, time.perf_counter() - started
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    (a, b), took = run_async(scenario(), 60)
    assert a.batch == b.batch == 2 and len(engine.steps) == 1  # one step for the burst
    assert took < 30.0  # ended by the quiet rule, not by gather_s
    assert a.wait_ms >= 300.0  # the first waited out the quiet window after the second asked (20 ms + 300 ms)


class RecordingClient(FakeClient):
    """Keeps every Verify it was sent."""

    def __init__(self) -> None:
        super().__init__({})
        self.sent: list[Verify] = []

    async def request(self, msg, timeout=None, retries=None, deadline=None):
        if isinstance(msg, Verify):
            self.sent.append(msg)
        return await super().request(msg, timeout, retries, deadline)


class DecodingFleetClient(RecordingClient):
    """A target whose controller says "decode" from the open on, and answers decode requests with their tokens."""

    async def request(self, msg, timeout=None, retries=None, deadline=None):
        if isinstance(msg, SessionOpen):
            return SessionOpened(session=msg.session, pos=len(msg.prompt_ids), next_gamma=0)
        self.sent.append(msg)
        return Result(session=msg.session, seq=msg.seq, accepted=0, tokens=[5] * msg.decode,
                      pos=msg.pos + msg.decode, verify_ms=1.0, next_gamma=0)


def test_an_auto_session_told_to_decode_at_its_open_never_drafts():
    """The open's advice steers the first chunk: no drafted round, and no draft prefill of the prompt."""
    engine = FakeDraftEngine()
    worker = DraftWorker(DraftConfig(gamma="auto", max_new_tokens=12, decode_tokens=4, gather_ms=1.0),
                         engine=engine, codec=_Codec())
    client = DecodingFleetClient()
    (res,) = run_async(_run_sessions(worker, client, ["a"]), 30)
    assert res.error is None and res.token_ids == [5] * 12
    assert [m.decode for m in client.sent] == [4, 4, 4] and not any(m.tokens for m in client.sent)
    assert engine.steps == []  # the draft model never ran


def test_more_prompts_than_a_preloaded_engines_slots_take_turns(monkeypatch):
    """A drafter given an engine of 2 slots and 5 prompts runs at most 2 sessions at once; every prompt finishes."""
    import workers.draft_worker as dw

    class Client(FakeClient):
        async def start(self) -> None:
            pass

        async def close(self) -> None:
            pass

    async def probe(client, address, timeout):
        return {}

    monkeypatch.setattr(dw, "make_client", lambda *a, **k: Client({}))
    monkeypatch.setattr(dw, "probe_broker", probe)
    monkeypatch.setattr(dw, "tokenizer_fingerprint", lambda model: "", raising=False)
    engine = FakeDraftEngine(slots=2)
    worker = DraftWorker(DraftConfig(gamma=1, max_new_tokens=4, gather_ms=1.0, concurrency=8), engine=engine,
                         codec=_Codec())
    monkeypatch.setattr(worker, "_load", lambda prompts: None)
    results = run_async(worker.run_ids([[1, 2, 4]] * 5), 30)
    assert [r.error for r in results] == [None] * 5 and all(len(r.token_ids) == 4 for r in results)
    assert max(len(slots) for slots, _, _ in engine.steps) <= 2


class CatchUpEngine(FakeDraftEngine):
    """A forward that feeds unseen tokens (the prompt: more than the two a round leaves uncached) takes 60 ms; a
    decode step 2 ms."""

    def forward(self, rows, last_only=None):
        time.sleep(0.06 if any(len(toks) > 2 for _, toks in rows) else 0.002)
        return super().forward(rows, last_only)


@pytest.mark.parametrize("gamma", [1, 3])
def test_a_catch_up_round_reports_its_later_steps_not_the_catch_up(gamma):
    """The first round's draft step prefills the prompt: its cost is catch-up. With γ ≥ 2 the drafter reports
    γ × its later steps (what drafting costs), with γ = 1 nothing; later rounds report their whole step."""
    client = RecordingClient()
    worker = _worker(CatchUpEngine(), gamma=gamma, max_new=3 * (gamma + 1))
    results = asyncio.run(asyncio.wait_for(_run_prompt(worker, client, [1, 2, 4, 8, 9, 10, 11, 12]), 30))
    assert results.error is None and len(client.sent) >= 2
    first, later = client.sent[0].draft_ms, [m.draft_ms for m in client.sent[1:]]
    if gamma == 1:
        assert first == 0.0
    else:
        assert 0 < first < 30.0 and first == pytest.approx(gamma * 2.0, abs=gamma * 8.0)
    assert all(0 < ms < 30.0 for ms in later)
    # the catch-up itself goes with the chunk: the first step beyond a steady one, over the 7 unseen prompt tokens
    # (the eighth is a round's normal feed); a lone step cannot tell it apart, and later rounds have none
    head = client.sent[0]
    if gamma == 1:
        assert (head.catchup_ms, head.catchup_tokens) == (0.0, 0)
    else:
        assert head.catchup_tokens == 7 and 40.0 < head.catchup_ms < 200.0
    assert all((m.catchup_ms, m.catchup_tokens) == (0.0, 0) for m in client.sent[1:])

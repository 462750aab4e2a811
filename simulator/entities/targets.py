"""A target worker: session slots, a verify queue, and ticks batched by the real policy (``workers.batching``).

Per tick (one SimPy timeout): ``tick_due`` decides when, ``plan_tick`` decides what (verify chunks first, then
chunked prefills in the leftover token budget), the cost model prices the mixed batch
``(rows, new tokens, mean context)`` (× ``cost_scale``), the host's work adds ``tick_overhead_ms`` per tick and
``tick_row_overhead_ms`` per row (the real tick's Python time grows with its rows: ``specmq bench tick``), and at
the end each chunk's accepted count is drawn from the pair's acceptance model. Answers reach the drafter after its
link's downlink delay (one scheduled event, no extra process). Sessions beyond the slot count wait for a slot
(admission queue), as the real target queues them.

Decode mode and the goodput controller, as in ``workers.target_worker``: a chunk of γ = 0 asking for ``decode`` k
tokens is a 1-token row in each of the next k ticks and is answered after the k-th (or when the output is complete).
A target with a ``workers.goodput.GoodputController`` feeds it what the real target feeds it (each measured tick,
each speculative round's acceptance and the drafter's reported draft and path costs) and answers every chunk with
the controller's ``next_gamma`` for that session. An answer is ``Answer(tokens, next_gamma, verify_s)``.
"""
from __future__ import annotations

import random
from collections import deque
from itertools import islice
from typing import Any, Callable, NamedTuple

import simpy

from simulator.costs import CostModel
from simulator.metrics import Metrics
from workers.batching import BatchLimits, plan_tick, tick_due
from workers.goodput import GoodputController

IDLE, WAITING, BUSY = 0, 1, 2
RESULT_BYTES = 64
EPS = 1e-9


def deliver(env: simpy.Environment, event: simpy.Event, value: Any, delay: float) -> None:
    """Trigger ``event`` with ``value`` after ``delay`` seconds: a message arriving over a link, as one event."""
    event._ok = True
    event._value = value
    env.schedule(event, delay=delay)


class Session:
    """A speculative session as the target sees it (its KV cache lives here)."""

    __slots__ = ("req", "link", "rng", "context", "prefill_left", "committed", "enqueued", "opened", "acceptance",
                 "delay_s", "decode_ended")

    def __init__(self, req, link, rng: random.Random, acceptance, delay_s: float = 0.0) -> None:
        self.req = req
        self.link = link  # the drafter's link: answers travel back over it
        self.rng = rng
        self.acceptance = acceptance
        self.context = 0
        self.prefill_left = req.prompt_tokens
        self.committed = 0
        self.enqueued = 0.0
        self.opened: simpy.Event | None = None
        self.delay_s = delay_s  # fixed extra per answer (broker overhead)
        self.decode_ended: float | None = None  # the forward that finished its last decode request ended then


class Answer(NamedTuple):
    """A chunk's answer: tokens committed, the controller's γ for the next round (-1: no advice), and the service
    time of the tick that answered it (what the drafter subtracts from its round trip to get the path)."""

    tokens: int
    next_gamma: int
    verify_s: float


class Chunk:
    __slots__ = ("session", "gamma", "enqueued", "event", "decode_left", "decoded", "draft_ms", "path_ms")

    def __init__(self, session: Session, gamma: int, enqueued: float, event: simpy.Event, decode: int = 0,
                 draft_ms: float = 0.0, path_ms: float = 0.0) -> None:
        self.session, self.gamma, self.enqueued, self.event = session, gamma, enqueued, event
        self.decode_left = decode if gamma == 0 else 0  # decode mode: ticks (tokens) still to go
        self.decoded = 0
        self.draft_ms, self.path_ms = draft_ms, path_ms  # the drafter's reported costs (Verify.draft_ms, path_ms)


class Target:
    def __init__(self, env: simpy.Environment, name: str, limits: BatchLimits, slots: int, cost: CostModel,
                 rng: random.Random, metrics: Metrics, group: str = "", queue_max: int = 1 << 30,
                 on_tick: Callable[[float, list, float], None] | None = None, cost_scale: float = 1.0,
                 controller: GoodputController | None = None, tick_overhead_ms: float = 0.0,
                 tick_row_overhead_ms: float = 0.0) -> None:
        if tick_overhead_ms < 0:
            raise ValueError(f"target {name}: tick_overhead_ms must be >= 0, got {tick_overhead_ms}")
        if tick_row_overhead_ms < 0:
            raise ValueError(f"target {name}: tick_row_overhead_ms must be >= 0, got {tick_row_overhead_ms}")
        self.tick_overhead_s = tick_overhead_ms / 1000.0  # host time per tick outside the forward
        self.tick_row_overhead_s = tick_row_overhead_ms / 1000.0  # and per row (file, accept, answer, encode)
        self.env, self.name, self.group = env, name, group or name
        self.controller = controller  # the goodput controller (None: chunks get no γ advice)
        self.cost_scale = cost_scale  # > 1: the device is shared (a 2-core CPU running the drafter too)
        self.limits, self.slots, self.cost, self.rng = limits, slots, cost, rng
        self.metrics = metrics
        self.stats = metrics.worker(name, limits.max_batch_rows, limits.max_batch_tokens)
        self.queue_max = queue_max
        self.sessions = 0  # placed on it by the broker and not finished
        self.outstanding = 0  # opens and chunks accepted and not answered: the broker's view (broker.routing)
        self.verify_q: deque[Chunk] = deque()
        self.verify_tokens = 0
        self.prefill_q: list[Session] = []
        self.admit_q: deque[Session] = deque()
        self.active = 0
        self.state = BUSY
        self.wake: simpy.Event | None = None
        self.on_tick = on_tick  # test hook: (start, waits_s, service_s) per tick
        self.proc = env.process(self.run())

    # ------------------------------------------------------------------ requests from the broker
    def open_session(self, sess: Session, opened: simpy.Event) -> None:
        """SESSION_OPEN: take a slot (or wait for one), then prefill; ``opened`` fires with the first token, its
        value the controller's γ for the first chunk (-1: no advice)."""
        sess.opened = opened
        self.outstanding += 1
        if self.active < self.slots:
            self._admit(sess)
        else:
            self.admit_q.append(sess)

    def verify(self, sess: Session, gamma: int, done: simpy.Event, decode: int = 0, draft_ms: float = 0.0,
               path_ms: float = 0.0) -> bool:
        """VERIFY: queue a chunk of ``gamma`` draft tokens (γ = 0 with ``decode`` k: decode mode, k ticks); False
        means BUSY (queue full, nothing enqueued)."""
        if gamma == 0 and decode < 1:
            raise ValueError(f"a chunk with no draft tokens must ask to decode >= 1 tokens, got decode={decode}")
        if len(self.verify_q) >= self.queue_max:
            self.metrics.busy_refusals += 1
            return False
        self.verify_q.append(Chunk(sess, gamma, self.env.now, done, decode, draft_ms, path_ms))
        self.verify_tokens += gamma + 1
        self.outstanding += 1
        self._poke()
        return True

    def _admit(self, sess: Session) -> None:
        self.active += 1
        self.stats.sessions += 1
        sess.enqueued = self.env.now
        self.prefill_q.append(sess)
        self._poke()

    def _release(self, sess: Session) -> None:
        if self.controller is not None:
            self.controller.forget(str(sess.req.id))
        self.active -= 1
        self.sessions -= 1
        if self.admit_q:
            self._admit(self.admit_q.popleft())

    def _poke(self) -> None:
        if self.state == IDLE:
            self.state = BUSY
            self.wake.succeed()
        elif self.state == WAITING and (self.verify_tokens >= self.limits.max_batch_tokens
                                        or len(self.verify_q) + len(self.prefill_q) >= self.limits.max_batch_rows):
            self.state = BUSY
            self.proc.interrupt()

    # ------------------------------------------------------------------ the tick loop
    def _oldest(self) -> float | None:
        a = self.verify_q[0].enqueued if self.verify_q else None
        b = self.prefill_q[0].enqueued if self.prefill_q else None
        if a is None:
            return b
        return a if b is None or a < b else b

    def run(self):
        env, limits = self.env, self.limits
        chunk = limits.prefill_chunk
        while True:
            if not self.verify_q and not self.prefill_q:
                self.state = IDLE
                self.wake = env.event()
                yield self.wake
            oldest = self._oldest()
            pending = self.verify_tokens + sum(min(s.prefill_left, chunk) for s in self.prefill_q)
            if not tick_due(env.now + EPS, oldest, pending, len(self.verify_q) + len(self.prefill_q), limits,
                            active_rows=self.active):
                self.state = WAITING
                try:
                    yield env.timeout(oldest + limits.tick_ms / 1000.0 - env.now)
                except simpy.Interrupt:
                    pass
                self.state = BUSY
                continue
            self.state = BUSY
            yield from self._tick()

    def _tick(self):
        env, limits = self.env, self.limits
        n = limits.max_batch_rows
        plan = plan_tick([(c, c.gamma + 1) for c in islice(self.verify_q, n)],
                         [(s, s.prefill_left) for s in islice(self.prefill_q, n)], limits)
        chunks = [self.verify_q.popleft() for _ in plan.verify]
        tokens = ctx = 0
        for c in chunks:
            tokens += c.gamma + 1
            ctx += c.session.context
        self.verify_tokens -= tokens
        for s, take in plan.prefill:
            tokens += take
            ctx += s.context
        rows = plan.rows
        start = env.now
        service = self.cost.verify_ms(rows, tokens, ctx / rows) * self.cost_scale / 1000.0
        st = self.stats
        if self.metrics.start <= start <= self.metrics.end:
            st.ticks += 1
            st.rows += rows
            st.tokens += tokens
            st.busy_s += service
            st.verified_chunks += len(chunks)
        if self.on_tick is not None:
            self.on_tick(start, [start - c.enqueued for c in chunks], service)
        if self.controller is not None:  # a decode request's first tick: the gap since its last one's forward
            for c in chunks:
                s = c.session
                if c.decode_left > 0 and c.decoded == 0 and s.decode_ended is not None:
                    self.controller.observe_decode_gap(str(s.req.id), (start - s.decode_ended) * 1000.0)
        yield env.timeout(service + self.tick_overhead_s + rows * self.tick_row_overhead_s)
        now = env.now
        m = self.metrics
        ctl = self.controller
        if ctl is not None and chunks:
            ctl.observe_tick(rows, tokens, ctx / rows, service * 1000.0)
            ctl.observe_host((self.tick_overhead_s + rows * self.tick_row_overhead_s) * 1000.0)
        if ctl is not None:  # prompts still waiting after this tick, as the real target reports them
            taken = {id(s): take for s, take in plan.prefill}
            left = [s.prefill_left - taken.get(id(s), 0) for s in self.prefill_q]
            ctl.observe_prefill(sum(x for x in left if x > 0), sum(1 for x in left if x > 0),
                                sum(s.req.prompt_tokens for s, x in zip(self.prefill_q, left) if x > 0))
        for c in chunks:
            s = c.session
            n_left = s.req.output_tokens - s.committed
            if c.decode_left > 0:  # decode mode: one token per tick; stays queued until k ticks are done
                n_commit = min(1, n_left)
                s.committed += n_commit
                s.context += n_commit
                c.decoded += n_commit
                c.decode_left -= 1
                if c.decode_left > 0 and s.committed < s.req.output_tokens:
                    self.verify_q.append(c)  # a 1-token row in the next tick too
                    self.verify_tokens += 1
                    continue
                n_commit = c.decoded
                m.decode_rounds += 1
                s.decode_ended = start + service
                if ctl is not None:
                    ctl.observe_decode(str(s.req.id), n_commit, n_commit)
            else:
                s.decode_ended = None
                k = s.acceptance.draw(c.gamma, s.rng)
                m.rounds += 1
                m.accepted += k
                m.drafted += c.gamma
                n_commit = min(k + 1, n_left)
                s.committed += n_commit
                s.context += n_commit
                if ctl is not None:
                    ctl.observe_round(str(s.req.id), k, c.gamma, c.draft_ms, c.path_ms, s.context)
            self.outstanding -= 1
            finished = s.committed >= s.req.output_tokens
            advice = -1
            if ctl is not None and not finished:
                key = str(s.req.id)
                ctl.track(key, s.context, s.req.output_tokens - s.committed)
                advice = ctl.next_gamma(key)
            deliver(env, c.event, Answer(n_commit, advice, service), s.link.delay(RESULT_BYTES, s.rng) + s.delay_s)
            if finished:
                self._release(s)
        if plan.prefill:
            for s, take in plan.prefill:
                s.prefill_left -= take
                s.context += take
                s.enqueued = now
                if s.prefill_left <= 0:  # prompt done: the target's first token goes back with SESSION_OPENED,
                    s.committed = 1  # and the controller's γ for the session's first chunk
                    self.outstanding -= 1
                    advice = -1
                    if ctl is not None:
                        ctl.track(str(s.req.id), s.context, s.req.output_tokens - s.committed)
                        advice = ctl.next_gamma(str(s.req.id))
                    deliver(env, s.opened, advice, s.link.delay(RESULT_BYTES, s.rng) + s.delay_s)
                    if s.req.output_tokens <= 1:
                        self._release(s)
            self.prefill_q = [s for s in self.prefill_q if s.prefill_left > 0]

"""The target (verifier) worker: many drafters' chunks, one forward pass per tick.

``TargetServer`` is the worker's whole state machine, free of sockets so tests can drive it directly:

- ``handle(msg)`` files a ``SessionOpen`` / ``Verify`` / ``SessionClose`` into per-session state and returns the
  replies it can give at once (errors, cached results, Busy).
- ``due(now)`` is ``workers.batching.tick_due`` over what waits; ``take_tick`` plans with ``plan_tick`` (verifies
  first, chunked prefills in the leftover token budget) and ``compute`` runs ONE ``engine.forward`` for the whole
  tick through ``speculation.verify_batch`` (verify rows and prefill rows mixed, prefill rows ``last_only``);
  ``finish`` accepts per session, answers (``Result``, ``SessionOpened`` once a prompt is fully cached) and counts
  the credits to give back.

``serve_target`` puts it on a ``WorkerLink``; ``compute`` runs in a thread and the loop keeps reading the link
meanwhile (``compute_draining``): messages that arrive during a tick are stamped when they arrive and handled right
after ``finish`` (never during the tick: a resend of a chunk in flight must meet its cached answer), so chunks that
waited out a whole tick start the next one at once instead of waiting another ``tick_ms`` for company. A chunk's
``Result`` splits its wait (``queue_ms``) into ``busy_wait_ms``, the part spent while earlier ticks ran (it arrived
during one, or was left out of one for budget), and the rest: the gather window and the loop's own handling.
Token positions follow protocol/FLOW.md: a slot caches every committed token but the pending one.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from protocol import errors as E
from protocol.errors import ProtocolError
from protocol.messages import (HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, Busy, Disconnect, Error, Message, Ready,
                               Result, SessionClose, SessionOpen, SessionOpened, Verify)
from workers.acceptance import AcceptanceError, Policy, make_policy
from workers.batching import BatchLimits, TickPlan, plan_tick, tick_due
from workers.engine.base import Engine, EngineError, NoFreeSlot
from workers.goodput import ControllerConfig, GoodputController, load_cost
from workers.link import WorkerLink, echo_incarnation
from workers.sampling import SamplingError, SamplingParams
from workers.speculation import TargetSession, VerifyOutcome, eos_ids, q_from_wire, verify_batch

log = structlog.get_logger("target")

IDLE_WAIT_S = 0.1  # longest the loop sleeps with nothing queued (how fast it notices a stop request)
EWMA = 0.2  # weight of the newest tick in the tick_ms average
NEAR_MISS_MS = 5.0  # a chunk arriving this soon after a tick started just missed it (stats: near_miss_chunks)


@dataclass
class TargetConfig:
    tick_ms: float = 2.0
    max_batch_tokens: int = 512
    max_batch_rows: int = 64
    prefill_chunk: int = 256
    max_gamma: int = 16
    max_waiting_opens: int | None = None  # opens queued for a free slot (default: one per slot), then Busy
    credit: int | None = None  # requests the broker may forward ahead (default: 2 x slots + max_batch_rows)
    retry_ms: int = 50  # Busy hint when every slot is taken and the open queue is full
    name: str = "target"
    max_decode: int = 64  # most tokens one decode-mode request (a chunk with no draft tokens) may ask for
    controller: bool = True  # choose each session's next γ (Result.next_gamma) with the goodput controller
    auto_max_gamma: int = 8  # the largest γ the controller proposes
    tpot_slo_ms: float | None = None  # the controller keeps predicted TPOT under this
    cost_table: str | None = None  # profile table for the controller's step-cost model (None: fitted online)

    @property
    def limits(self) -> BatchLimits:
        return BatchLimits(max_batch_tokens=self.max_batch_tokens, max_batch_rows=self.max_batch_rows,
                           prefill_chunk=self.prefill_chunk, tick_ms=self.tick_ms)


@dataclass
class Chunk:
    msg: Verify
    arrived: float
    decode_left: int = 0  # decode mode: tokens still to decode (one per tick)
    decoded: list[int] = field(default_factory=list)  # decode mode: tokens committed so far
    q: tuple = (None, None)  # the draft q as acceptance rows (q_ids, q_probs), unpacked from the wire
    busy_s: float = 0.0  # of its wait so far, the time an earlier tick was running (Result.busy_wait_ms)

    @property
    def decoding(self) -> bool:
        return not self.msg.tokens and self.msg.decode > 0


@dataclass
class Served:
    """A session on this worker: prefilling (``target is None``) or open."""

    key: str
    slot: int
    prompt: list[int]
    params: SamplingParams
    policy: Policy
    max_new_tokens: int
    arrived: float
    incarnation: int = 0  # of the SessionOpen it came from: SessionOpened echoes it (fencing)
    prefilled: int = 0  # prompt tokens cached so far (of prompt[:-1])
    target: TargetSession | None = None
    chunk: Chunk | None = None  # the verify waiting for the next tick
    decode_ended: float | None = None  # when the tick that finished its last decode request ended (monotonic)

    @property
    def to_prefill(self) -> int:
        return len(self.prompt) - 1 - self.prefilled


@dataclass
class Tick:
    plan: TickPlan
    started: float
    verify: list[tuple[str, Chunk]] = field(default_factory=list)
    prefill: list[tuple[str, int]] = field(default_factory=list)  # (session, tokens this tick)
    items: list = field(default_factory=list)
    prefill_rows: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(c.msg.tokens) + 1 for _, c in self.verify) + sum(n for _, n in self.prefill)


class TargetServer:
    def __init__(self, engine: Engine, config: TargetConfig | None = None) -> None:
        self.engine = engine
        self.config = config or TargetConfig()
        self.limits = self.config.limits
        self.info = engine.info
        self.eos = eos_ids(engine.info)
        self.max_waiting = (self.config.max_waiting_opens if self.config.max_waiting_opens is not None
                            else engine.info.num_slots)
        self.sessions: dict[str, Served] = {}
        self.verify_order: deque[str] = deque()  # sessions with a chunk waiting, FIFO
        self.prefill_order: deque[str] = deque()  # sessions still prefilling, FIFO
        self.waiting_opens: deque[tuple[SessionOpen, float]] = deque()  # no free slot yet
        self.credits = 0  # requests finished since the last grant
        self.counters = {"ticks": 0, "drafted": 0, "accepted": 0, "rows": 0, "tokens": 0, "errors": 0,
                         "max_rows": 0, "mid_tick_chunks": 0, "near_miss_chunks": 0, "busy_ms": 0.0}
        self.tick_ms = 0.0
        self.busy_until = -float("inf")  # when the last tick's forward ended (a chunk that arrived before waited on it)
        self.last_rows = 0
        self.last_tokens = 0
        self.controller = make_controller(self.config) if self.config.controller else None

    @property
    def initial_credit(self) -> int:
        c = self.config.credit
        return c if c is not None else 2 * self.info.num_slots + self.limits.max_batch_rows

    # ------------------------------------------------------------------ requests
    def handle(self, msg: Message, now: float | None = None) -> list[Message]:
        now = time.monotonic() if now is None else now
        if isinstance(msg, Verify):  # every answer echoes its request's incarnation (the broker fences on it)
            return echo_incarnation(msg, self.on_verify(msg, now))
        if isinstance(msg, SessionOpen):
            return echo_incarnation(msg, self.on_open(msg, now)) + self.admit_waiting(now)
        if isinstance(msg, SessionClose):
            self.drop_session(msg.session)
            self.credits += 1
            return self.admit_waiting(now)
        if isinstance(msg, Disconnect):  # the link re-registered: every session is gone
            self.reset()
            return []
        log.warning("request.ignored", type=msg.TYPE)
        return []

    def _error(self, code: str, message: str, session: str = "", seq: int = -1) -> Error:
        self.credits += 1
        self.counters["errors"] += 1
        return Error(code=code, message=message, session=session, seq=seq)

    def check_open(self, msg: SessionOpen) -> Error | tuple[SamplingParams, Policy]:
        key, mine = msg.session, self.info.tokenizer_fingerprint
        if msg.tokenizer and mine and msg.tokenizer != mine:
            return self._error(E.TOKENIZER_MISMATCH, f"drafter tokenizer {msg.tokenizer} != target tokenizer "
                               f"{mine} ({self.info.model_id})", key)
        if not msg.prompt_ids:
            return self._error(E.BAD_REQUEST, "prompt_ids is empty", key)
        bad = next((t for t in msg.prompt_ids if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            return self._error(E.TOKEN_OUT_OF_RANGE, f"prompt_ids holds {bad}, outside [0, {self.info.vocab_size})",
                               key)
        if msg.max_new_tokens < 0:
            return self._error(E.BAD_REQUEST, f"max_new_tokens must be >= 0, got {msg.max_new_tokens}", key)
        need = len(msg.prompt_ids) + msg.max_new_tokens
        if need > self.info.max_context:
            return self._error(E.CONTEXT_TOO_LONG, f"prompt {len(msg.prompt_ids)} + max_new_tokens "
                               f"{msg.max_new_tokens} = {need} > max_context {self.info.max_context}", key)
        try:
            params = SamplingParams(temperature=msg.temperature, top_p=msg.top_p, seed=msg.seed)
            policy = make_policy(msg.policy, msg.policy_args)
        except (SamplingError, AcceptanceError, TypeError) as exc:
            return self._error(E.BAD_REQUEST, str(exc), key)
        return params, policy

    def on_open(self, msg: SessionOpen, now: float) -> list[Message]:
        if msg.session in self.sessions:  # re-open: start over from the committed tokens it carries
            self.drop_session(msg.session)
        for i, (old, _) in enumerate(self.waiting_opens):
            if old.session == msg.session:
                del self.waiting_opens[i]
                self.credits += 1
                break
        checked = self.check_open(msg)
        if isinstance(checked, Error):
            return [checked]
        try:
            slot = self.engine.allocate()
        except NoFreeSlot:
            if len(self.waiting_opens) < self.max_waiting:
                self.waiting_opens.append((msg, now))
                return []
            self.credits += 1
            return [Busy(retry_ms=self.config.retry_ms, queue="target_slots", session=msg.session)]
        params, policy = checked
        s = Served(msg.session, slot, list(msg.prompt_ids), params, policy, msg.max_new_tokens, now,
                   incarnation=msg.incarnation)
        self.sessions[s.key] = s
        if s.to_prefill > 0:
            self.prefill_order.append(s.key)
            return []
        return [self.opened(s)]

    def opened(self, s: Served) -> SessionOpened:
        """The prompt is cached: the session takes chunks from now on."""
        s.target = TargetSession(s.key, s.slot, s.prompt[-1], len(s.prompt), s.params, s.policy, s.max_new_tokens)
        s.target.finished = s.max_new_tokens <= 0
        self.credits += 1
        return SessionOpened(session=s.key, pos=len(s.prompt), worker=self.config.name, incarnation=s.incarnation,
                             next_gamma=self.next_gamma(s.key, len(s.prompt)))

    def admit_waiting(self, now: float) -> list[Message]:
        out: list[Message] = []
        while self.waiting_opens and len(self.sessions) < self.info.num_slots:
            msg, _ = self.waiting_opens.popleft()
            out += echo_incarnation(msg, self.on_open(msg, now))
        return out

    def on_verify(self, msg: Verify, now: float) -> list[Message]:
        key, seq = msg.session, msg.seq
        s = self.sessions.get(key)
        if s is None:
            return [self._error(E.UNKNOWN_SESSION, f"session {key!r} is not open on this target", key, seq)]
        t = s.target
        if t is None:
            return [self._error(E.BAD_SEQUENCE, "session is still prefilling (wait for session_opened)", key, seq)]
        if seq == t.last_seq and t.last_result is not None:  # a resend: the same answer, never a second apply
            self.credits += 1
            return [t.last_result]
        if s.chunk is not None:
            if s.chunk.msg.seq == seq:  # duplicate of the queued chunk: its answer is coming
                self.credits += 1
                return []
            return [self._error(E.BAD_SEQUENCE, f"seq {seq} while seq {s.chunk.msg.seq} is still queued", key, seq)]
        if seq != t.last_seq + 1:
            return [self._error(E.BAD_SEQUENCE, f"seq {seq} does not follow {t.last_seq}", key, seq)]
        if msg.pos != t.pos:
            return [self._error(E.BAD_SEQUENCE, f"pos {msg.pos} != committed length {t.pos}", key, seq)]
        if msg.decode and msg.tokens:
            return [self._error(E.BAD_REQUEST, f"decode {msg.decode} with {len(msg.tokens)} draft tokens: a "
                                "decode-mode chunk carries no draft tokens", key, seq)]
        if not 0 <= msg.decode <= self.config.max_decode:
            return [self._error(E.BAD_REQUEST, f"decode must be in [0, {self.config.max_decode}], got "
                                f"{msg.decode}", key, seq)]
        if len(msg.tokens) > self.config.max_gamma:
            return [self._error(E.GAMMA_TOO_LARGE, f"chunk of {len(msg.tokens)} tokens > max_gamma "
                                f"{self.config.max_gamma}", key, seq)]
        bad = next((x for x in msg.tokens if not 0 <= x < self.info.vocab_size), None)
        if bad is not None:
            return [self._error(E.TOKEN_OUT_OF_RANGE, f"tokens holds {bad}, outside [0, {self.info.vocab_size})",
                                key, seq)]
        if self.engine.length(s.slot) + max(len(msg.tokens) + 1, msg.decode) > self.info.max_context:
            return [self._error(E.CONTEXT_TOO_LONG, f"chunk of {len(msg.tokens)} at pos {t.pos} overflows "
                                f"max_context {self.info.max_context}", key, seq)]
        try:  # the packed q, unpacked once here: a malformed one is answered at once
            q = q_from_wire(len(msg.tokens), msg.q_ids, msg.q_probs, msg.q_lens)
        except ProtocolError as exc:
            return [self._error(exc.code, exc.message, key, seq)]
        if t.finished:
            self.credits += 1
            t.last_seq = seq
            t.last_result = Result(session=key, seq=seq, accepted=0, tokens=[], pos=t.pos, finished=True,
                                   sent_at=msg.sent_at)
            return [t.last_result]
        s.chunk = Chunk(msg, now, decode_left=msg.decode if not msg.tokens else 0, q=q,
                        busy_s=max(0.0, self.busy_until - now))  # read during a tick: waited on it until it ended
        self.verify_order.append(key)
        return []

    def drop_session(self, key: str) -> None:
        s = self.sessions.pop(key, None)
        if s is None:
            return
        if self.controller is not None:
            self.controller.forget(key)
        if s.chunk is not None:  # its answer would go nowhere; the broker forgot it
            self.credits += 1
            self.verify_order.remove(key)
        if s.target is None:
            self.credits += 1  # the open it came from is over too
            self.prefill_order.remove(key)
        self.engine.free(s.slot)

    def reset(self) -> None:
        for key in list(self.sessions):
            self.engine.free(self.sessions.pop(key).slot)
            if self.controller is not None:
                self.controller.forget(key)
        self.verify_order.clear()
        self.prefill_order.clear()
        self.waiting_opens.clear()
        self.credits = 0  # the link grants its initial credit again after re-registering

    def take_credits(self) -> int:
        n, self.credits = self.credits, 0
        return n

    # ------------------------------------------------------------------ ticks
    def _pending(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        verifies = [(k, len(self.sessions[k].chunk.msg.tokens) + 1) for k in self.verify_order]
        prefills = [(k, self.sessions[k].to_prefill) for k in self.prefill_order]
        return verifies, prefills

    def oldest(self) -> float | None:
        times = [self.sessions[k].chunk.arrived for k in self.verify_order]
        times += [self.sessions[k].arrived for k in self.prefill_order]
        return min(times) if times else None

    def due(self, now: float) -> bool:
        verifies, prefills = self._pending()
        return tick_due(now, self.oldest(), sum(n for _, n in verifies) + sum(n for _, n in prefills),
                        len(verifies) + len(prefills), self.limits, active_rows=self.active_rows())

    def active_rows(self) -> int:
        """Sessions that may still send work (prefilling, or open and unfinished)."""
        return sum(1 for s in self.sessions.values() if s.target is None or not s.target.finished)

    def wait_s(self, now: float) -> float:
        """How long the loop may wait for messages before a tick is due."""
        oldest = self.oldest()
        if oldest is None:
            return IDLE_WAIT_S
        if self.due(now):
            return 0.0
        return max(0.0, oldest + self.limits.tick_ms / 1000.0 - now)

    def take_tick(self, now: float | None = None) -> Tick | None:
        """Plan this tick and take its work off the queues (the verify items are built here, on the loop)."""
        now = time.monotonic() if now is None else now
        plan = plan_tick(*self._pending(), self.limits)
        if not plan:
            return None
        tick = Tick(plan, now)
        for key in plan.verify:
            s = self.sessions[key]
            chunk, s.chunk = s.chunk, None
            self.verify_order.remove(key)
            tick.verify.append((key, chunk))
            tick.items.append(s.target.verify_item(chunk.msg.tokens, *chunk.q))
        for key, take in plan.prefill:
            s = self.sessions[key]
            tick.prefill.append((key, take))
            tick.prefill_rows.append((s.slot, s.prompt[s.prefilled:s.prefilled + take]))
        return tick

    def compute(self, tick: Tick) -> list[VerifyOutcome] | Exception:
        """The tick's one forward (verify + prefill rows) and per-row acceptance. Runs in a worker thread."""
        try:
            return verify_batch(self.engine, tick.items, tick.prefill_rows)
        except Exception as exc:  # answered per request by finish(); the loop never dies of it
            return exc

    def finish(self, tick: Tick, outcomes: list[VerifyOutcome] | Exception, verify_ms: float,
               ended: float | None = None) -> list[Message]:
        """Answer the tick's work. ``ended``: when its forward ended (``time.monotonic``; default ``tick.started`` +
        ``verify_ms``): chunks that arrived meanwhile, or waited out the tick without a place in it, count the time
        until then as ``busy_wait_ms`` (the device was busy), not as gather time."""
        ended = tick.started + verify_ms / 1000.0 if ended is None else ended
        self.busy_until = ended
        for key in self.verify_order:  # queued before the tick but left out of it (budget): waited on it whole
            c = self.sessions[key].chunk
            c.busy_s += max(0.0, ended - max(tick.started, c.arrived))
        self.counters["ticks"] += 1
        self.counters["rows"] += tick.plan.rows
        self.counters["max_rows"] = max(self.counters["max_rows"], tick.plan.rows)
        self.counters["tokens"] += tick.tokens
        self.counters["busy_ms"] += verify_ms  # time in forwards: the device's busy fraction over a window
        self.last_rows, self.last_tokens = tick.plan.rows, tick.tokens
        self.tick_ms = verify_ms if self.counters["ticks"] == 1 else (1 - EWMA) * self.tick_ms + EWMA * verify_ms
        if isinstance(outcomes, Exception):
            return self.fail_tick(tick, outcomes)
        out: list[Message] = []
        if self.controller is not None and tick.verify:
            ctx = sum(self.sessions[k].target.pos for k, _ in tick.verify) / len(tick.verify)
            self.controller.observe_tick(tick.plan.rows, tick.tokens, ctx, verify_ms)
        for (key, chunk), o in zip(tick.verify, outcomes):
            s = self.sessions[key]
            m = chunk.msg
            if o.error:
                out += echo_incarnation(m, [self._error(E.BAD_REQUEST, f"chunk rejected: {o.error}", key, m.seq)])
                continue
            t = s.target
            tokens = t.apply(o, self.eos)
            self.counters["drafted"] += len(m.tokens)
            self.counters["accepted"] += o.accepted
            if chunk.decoding:
                first = not chunk.decoded and chunk.decode_left == m.decode
                if first and s.decode_ended is not None and self.controller is not None:
                    # its last decode answer's tick to this request's first: the gap a decode request pays
                    self.controller.observe_decode_gap(key, (tick.started - s.decode_ended) * 1000.0)
                chunk.decoded += tokens
                chunk.decode_left -= 1
                if chunk.decode_left > 0 and not t.finished:  # stays queued: a 1-token row in the next tick too
                    chunk.busy_s += max(0.0, ended - max(tick.started, chunk.arrived))
                    s.chunk = chunk
                    self.verify_order.append(key)
                    continue
                tokens = chunk.decoded
                s.decode_ended = ended
                if self.controller is not None:
                    self.controller.observe_decode(key, len(tokens), m.decode)
            else:
                s.decode_ended = None  # a drafted round between two decode requests: no gap to measure
                if self.controller is not None:
                    self.controller.observe_round(key, o.accepted, len(m.tokens), m.draft_ms, m.path_ms, t.pos,
                                                  m.catchup_ms, m.catchup_tokens)
            t.last_seq = m.seq
            queue_ms = max(0.0, (tick.started - chunk.arrived) * 1000.0)
            busy_ms = min(chunk.busy_s * 1000.0, queue_ms)
            t.last_result = Result(session=key, seq=m.seq, accepted=min(o.accepted, len(tokens)), tokens=tokens,
                                   pos=t.pos, finished=t.finished, sent_at=m.sent_at, verify_ms=round(verify_ms, 3),
                                   queue_ms=round(queue_ms, 3), busy_wait_ms=round(busy_ms, 3),
                                   next_gamma=self.next_gamma(key, t.pos), incarnation=m.incarnation)
            self.credits += 1
            out.append(t.last_result)
        cached: list[Served] = []
        for key, take in tick.prefill:
            s = self.sessions[key]
            s.prefilled += take
            if s.to_prefill == 0:
                self.prefill_order.remove(key)
                cached.append(s)
        if self.controller is not None:  # prompts still waiting: the chunks later ticks carry whatever the plan
            waiting = [self.sessions[k] for k in self.prefill_order]
            self.controller.observe_prefill(sum(s.to_prefill for s in waiting), len(waiting),
                                            sum(len(s.prompt) for s in waiting))
        out += [self.opened(s) for s in cached]
        return out

    def observe_host(self, ms: float) -> None:
        """Host time between two back-to-back ticks (the controller prices decode rows with it)."""
        if self.controller is not None:
            self.controller.observe_host(ms)

    def next_gamma(self, key: str, pos: int) -> int:
        """The controller's γ for this session's next chunk (-1 without a controller)."""
        if self.controller is None:
            return -1
        t = self.sessions[key].target
        self.controller.track(key, pos, t.max_new_tokens - t.generated if t is not None else None)
        return self.controller.next_gamma(key)

    def fail_tick(self, tick: Tick, exc: Exception) -> list[Message]:
        """The forward failed. EngineError is raised before any cache is touched: the sessions stay as they
        were and the chunks can be resent. Anything else may have left caches half-written: drop those sessions."""
        log.error("tick.failed", error=repr(exc), rows=tick.plan.rows)
        intact = isinstance(exc, EngineError)
        out: list[Message] = []
        for key, chunk in tick.verify:
            failed = self._error(E.WORKER_ERROR, f"verify failed: {exc}", key, chunk.msg.seq)
            out += echo_incarnation(chunk.msg, [failed])
            if not intact:
                self.drop_session(key)
        for key, _ in tick.prefill:
            inc = self.sessions[key].incarnation
            self.drop_session(key)  # gives back the open's credit
            out.append(Error(code=E.WORKER_ERROR, message=f"prefill failed: {exc}", session=key, incarnation=inc))
        return out + self.admit_waiting(time.monotonic())

    def count_mid_tick(self, tick: Tick, arrivals: list[tuple[Message, float]]) -> None:
        """Count the chunks that arrived while ``tick`` ran; a near miss came within ``NEAR_MISS_MS`` of its start
        (a drafter batch whose chunks reached the target spread over more than tick_ms: the batch was split)."""
        for m, at in arrivals:
            if isinstance(m, Verify):
                self.counters["mid_tick_chunks"] += 1
                if (at - tick.started) * 1000.0 < NEAR_MISS_MS:
                    self.counters["near_miss_chunks"] += 1

    # ------------------------------------------------------------------ observability
    def stats(self) -> dict:
        c = self.counters
        return {"tick_ms": round(self.tick_ms, 3), "batch_rows": self.last_rows, "batch_tokens": self.last_tokens,
                "slots_used": len(self.sessions), "slots_total": self.info.num_slots, "ticks": c["ticks"],
                "drafted": c["drafted"], "accepted": c["accepted"],
                "mean_batch": round(c["rows"] / c["ticks"], 3) if c["ticks"] else 0.0,
                "max_batch_rows": c["max_rows"], "waiting_opens": len(self.waiting_opens), "errors": c["errors"],
                "rows": c["rows"], "busy_ms": round(c["busy_ms"], 3), "mid_tick_chunks": c["mid_tick_chunks"], "near_miss_chunks": c["near_miss_chunks"],
                **(self.controller.stats() if self.controller is not None else {})}


def make_controller(config: TargetConfig) -> GoodputController:
    """The goodput controller over the configured profile table, or over a cost line fitted from measured ticks."""
    return GoodputController(load_cost(config.cost_table),
                             ControllerConfig(max_gamma=min(config.auto_max_gamma, config.max_gamma),
                                              tpot_slo_ms=config.tpot_slo_ms, max_batch_tokens=config.max_batch_tokens,
                                              prefill_chunk=config.prefill_chunk))


# ---------------------------------------------------------------------- the loop on a WorkerLink
def ready_message(engine: Engine, config: TargetConfig) -> Ready:
    info = engine.info
    return Ready(kind="target", model=info.model_id, capacity=info.num_slots, vocab_size=info.vocab_size,
                 tokenizer=info.tokenizer_fingerprint, max_gamma=config.max_gamma, max_context=info.max_context,
                 worker=config.name)


async def _send_all(link: WorkerLink, replies: list[Message]) -> None:
    for r in replies:
        if not link.send_nowait(r):
            await link.send(r)


async def compute_draining(link: WorkerLink, server: TargetServer, tick: Tick
                           ) -> tuple[list[VerifyOutcome] | Exception, list[tuple[Message, float]]]:
    """Run the tick's forward in a thread and read the link meanwhile: (outcomes, [(message, arrival time)])."""
    work = asyncio.ensure_future(asyncio.to_thread(server.compute, tick))
    arrivals: list[tuple[Message, float]] = []
    while True:
        recv = asyncio.ensure_future(link.recv_batch())
        done, _ = await asyncio.wait({work, recv}, return_when=asyncio.FIRST_COMPLETED)
        if recv in done:
            now = time.monotonic()
            arrivals += [(m, now) for m in recv.result()]
        else:
            recv.cancel()  # only ever cancelled while waiting for the socket: nothing read is lost
            with contextlib.suppress(asyncio.CancelledError):
                await recv
        if work in done:
            return work.result(), arrivals


async def serve_target(broker: str, engine: Engine, config: TargetConfig | None = None, *,
                       stop: asyncio.Event | None = None, heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
                       liveness: int = HEARTBEAT_LIVENESS, on_server=None) -> None:
    """Serve until ``stop`` is set; Disconnect on the way out. ``on_server(server)`` sees the state (tests)."""
    config = config or TargetConfig()
    server = TargetServer(engine, config)
    if on_server is not None:
        on_server(server)
    stop = stop or asyncio.Event()
    link = WorkerLink(broker, ready_message(engine, config), heartbeat_interval=heartbeat_interval,
                      liveness=liveness, stats=server.stats, initial_credit=server.initial_credit)
    info = engine.info
    log.info("target.serving", broker=broker, model=info.model_id, slots=info.num_slots, device=info.device,
             dtype=info.dtype, max_context=info.max_context, tick_ms=config.tick_ms)
    async with link:
        early: list[tuple[Message, float]] = []  # read during the last tick, stamped when they arrived
        last_ended: float | None = None  # when the last tick's forward ended, while no wait has come since
        while not stop.is_set():
            # after a tick, take what came meanwhile and whatever is waiting now, without blocking: if the early
            # chunks have waited tick_ms already, the next tick starts at once
            timeout = 0.0 if early else server.wait_s(time.monotonic())
            if timeout > 0:
                last_ended = None  # the loop may wait for work: the gap to the next tick is not host time
            msgs = await link.recv_batch(timeout=timeout)
            now = time.monotonic()
            arrivals, early = early + [(m, now) for m in msgs], []
            replies: list[Message] = []
            for m, at in arrivals:
                replies += server.handle(m, at)
            await _send_all(link, replies)
            if server.due(time.monotonic()):
                tick = server.take_tick()
                if tick is not None:
                    if last_ended is not None:  # back to back: what answering, reading and planning cost
                        server.observe_host((time.monotonic() - last_ended) * 1000.0)
                    t0 = time.perf_counter()
                    outcomes, early = await compute_draining(link, server, tick)
                    ended = last_ended = time.monotonic()
                    server.count_mid_tick(tick, early)
                    await _send_all(link, server.finish(tick, outcomes, (time.perf_counter() - t0) * 1000.0, ended))
            link.grant(server.take_credits())
    log.info("target.stopped", **server.stats())

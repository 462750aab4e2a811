"""Draft devices (phones, laptops, servers) and the speculative session each one drives.

A device belongs to a speed class: its draft decode step costs the profile's draft table at its current batch
(sessions it is drafting for) times the class ``slowdown``, or a fixed ``step_ms`` (a number, or a mapping
``{batch: ms}`` interpolated linearly over the batch size). It reaches the broker over its class's link. A session
is one SimPy process; a round (draft γ tokens, send the chunk) is ONE timeout and the answer is ONE event, so the
cost of a round does not grow with γ.

``batched: true`` models the real drafter (``workers.draft_worker.DraftBatcher``): the device runs ONE
``draft_batch`` at a time over every session ready to draft, after waiting up to ``gather_ms`` for all its active
sessions to be ready; step j of the batch costs the step time at the rows still drafting. A session whose answer
arrives while a batch runs waits for the next one (sessions are not drafted in parallel). ``send_ms``: the batch's
chunks leave one after another, ``send_ms`` apart (the real drafter's event loop sends them one by one and the
broker forwards them one by one); when a batch's chunks spread over more than the target's ``tick_ms`` the target
starts a tick with the first ones and the batch splits, as the real sessions drift apart.

Requests wait in one pool queue until a device has a free session slot (``drafts.sessions`` per device).

γ per class (or the config's ``gamma``): an int (0 = decode mode: each round asks the target to decode
``decode_tokens`` tokens and drafts nothing) or ``"auto"``: every round follows the target's advice (the open's
answer for the first, then ``Answer.next_gamma``), ``INITIAL_GAMMA`` while there is none, as ``workers.draft_worker``
does. Each round
reports its draft cost and the previous round's path (round trip less the answering tick) with the chunk, for the
target's goodput controller. ``path_ms``: a fixed software cost per round (drafter loop, broker hops, framing)
on top of the link.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import simpy

from simulator.entities.links import Link
from simulator.entities.targets import Answer, Session

OPEN_BYTES = 128  # SESSION_OPEN framing; prompt ids add 4 bytes each
CHUNK_BYTES = 96  # VERIFY framing; draft ids add 4 bytes each
AUTO = "auto"
INITIAL_GAMMA = 4  # an auto session's first γ, before the target has advised (workers.draft_worker's default)


def parse_gamma(value, where: str) -> int | str:
    """A draft's γ setting: ``"auto"`` or an int >= 0 (0 = decode mode); anything else is a clear error."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: gamma must be 'auto' or an integer >= 0, got {value!r}")
    try:
        g = int(value)
    except ValueError:
        raise ValueError(f"{where}: gamma must be 'auto' or an integer >= 0, got {value!r}") from None
    if g < 0 or g != float(value):
        raise ValueError(f"{where}: gamma must be 'auto' or an integer >= 0, got {value!r}")
    return g


@dataclass
class DraftClass:
    name: str
    link: Link
    slowdown: float = 1.0
    step_ms: float | dict | None = None  # fixed step time (or {batch: ms}), overrides the table
    batched: bool = False  # one draft_batch at a time over every ready session (the real drafter)
    gather_ms: float = 0.0  # batched: longest wait for the device's other sessions to be ready
    send_ms: float = 0.0  # batched: gap between two chunks of one batch leaving the device
    path_ms: float = 0.0  # fixed software cost of each round (drafter loop, broker hops) on top of the link
    open_ms: float = 0.0  # drafter-side cost of starting a session, before its open leaves (tokenizing, setup)
    gamma: int | str | None = None  # "auto", or an int (0 = decode mode); None: the config's gamma

    def __post_init__(self) -> None:
        if min(self.gather_ms, self.send_ms, self.path_ms, self.open_ms) < 0:
            raise ValueError(f"draft class {self.name}: gather_ms, send_ms, path_ms and open_ms must be >= 0")
        if self.gamma is not None:
            self.gamma = parse_gamma(self.gamma, f"draft class {self.name}")
        self._points: list[tuple[float, float]] | None = None
        if isinstance(self.step_ms, dict):
            pts = sorted((float(b), float(v)) for b, v in self.step_ms.items())
            if not pts or pts[0][0] < 1 or any(v < 0 for _, v in pts):
                raise ValueError(f"draft class {self.name}: step_ms mapping needs batch >= 1 keys and ms >= 0")
            self._points = pts

    def fixed_step_ms(self, batch: int) -> float | None:
        """The class's own step time at ``batch`` rows; None when the cost table decides."""
        if self._points is None:
            return None if self.step_ms is None else float(self.step_ms)
        pts = self._points
        if batch <= pts[0][0] or len(pts) == 1:
            return pts[0][1]  # clamped below the first point; one point = constant
        for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
            if batch <= b1:
                return v0 + (v1 - v0) * (batch - b0) / (b1 - b0)
        (b0, v0), (b1, v1) = pts[-2], pts[-1]
        return max(0.0, v1 + (v1 - v0) * (batch - b1) / (b1 - b0))  # linear above the last point


class DraftDevice:
    __slots__ = ("name", "cls", "cost", "rng", "active", "free_slots", "batcher")

    def __init__(self, name: str, cls: DraftClass, cost, rng: random.Random, sessions: int) -> None:
        self.name, self.cls, self.cost, self.rng = name, cls, cost, rng
        self.active = 0
        self.free_slots = sessions
        self.batcher: DraftBatcher | None = None

    def step_s(self, context: int, batch: int | None = None) -> float:
        b = max(1, self.active if batch is None else batch)
        ms = self.cls.fixed_step_ms(b)
        if ms is not None:
            return ms / 1000.0
        return self.cost.draft_step_ms(b, context) * self.cls.slowdown / 1000.0


class DraftBatcher:
    """A batched draft device: one draft_batch at a time over every queued session (``DraftClass.batched``)."""

    def __init__(self, env: simpy.Environment, device: DraftDevice) -> None:
        self.env, self.device = env, device
        self.queue: list[tuple[int, int, simpy.Event]] = []  # (gamma, context, done)
        self.wake: simpy.Event | None = None
        self.batches = self.rows = 0
        env.process(self.run())

    def draft(self, gamma: int, context: int) -> simpy.Event:
        done = self.env.event()
        self.queue.append((gamma, context, done))
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()
        return done

    def run(self):
        env, dev = self.env, self.device
        gather_s = dev.cls.gather_ms / 1000.0
        while True:
            if not self.queue:
                self.wake = env.event()
                yield self.wake
            if len(self.queue) < dev.active and gather_s > 0:  # wait (at most gather_s) for the others
                expired = env.timeout(gather_s)
                while len(self.queue) < dev.active and not expired.processed:
                    self.wake = env.event()
                    yield self.wake | expired
            batch, self.queue = self.queue, []
            ctx = max(c for _, c, _ in batch)
            t = 0.0
            for j in range(max(g for g, _, _ in batch)):  # step j over the rows still drafting
                t += dev.step_s(ctx, sum(1 for g, _, _ in batch if g > j))
            self.batches += 1
            self.rows += len(batch)
            yield env.timeout(t)
            for i, (_, _, done) in enumerate(batch):
                done.succeed(i)  # its place in the send order


class DraftPool:
    """Hands arriving requests to draft devices with a free session slot; the rest wait in FIFO order."""

    def __init__(self, env: simpy.Environment, devices: list[DraftDevice], rng: random.Random, start_session) -> None:
        self.env, self.devices, self.rng = env, devices, rng
        self.free: list[DraftDevice] = [d for d in devices for _ in range(d.free_slots)]
        self.waiting: deque = deque()
        self.start_session = start_session

    def submit(self, req) -> None:
        if self.free:
            i = self.rng.randrange(len(self.free))
            self.free[i], self.free[-1] = self.free[-1], self.free[i]
            self.start_session(req, self.free.pop())
        else:
            self.waiting.append(req)

    def release(self, device: DraftDevice) -> None:
        if self.waiting:
            self.start_session(self.waiting.popleft(), device)
        else:
            self.free.append(device)


def run_session(env: simpy.Environment, sim, req, device: DraftDevice):
    """One speculative session from the drafter's side: open, then rounds until the output is complete."""
    link, rng, broker, metrics = device.cls.link, device.rng, sim.broker, sim.metrics
    device.active += 1
    overhead = broker.overhead_s
    yield env.timeout(device.cls.open_ms / 1000.0 + link.delay(OPEN_BYTES + 4 * req.prompt_tokens, rng) + overhead)
    target = broker.place_session()
    req.target = target.name
    sess = Session(req, link, rng, sim.acceptance_for(device.cls.name, target.group), overhead)
    opened = env.event()
    target.open_session(sess, opened)
    first_advice = yield opened
    now = env.now
    req.first_token = now
    req.committed = 1
    metrics.tokens(now, 1)
    setting = device.cls.gamma if device.cls.gamma is not None else sim.gamma
    auto = setting == AUTO
    advised = INITIAL_GAMMA if auto else int(setting)
    if auto and first_advice >= 0:  # the open's answer carries the target's γ for the first chunk
        advised = first_advice
    decode_tokens = sim.decode_tokens
    retry_s = sim.retry_s
    out = req.output_tokens
    batched = device.cls.batched
    send_s = device.cls.send_ms / 1000.0
    fixed_s = overhead + device.cls.path_ms / 1000.0
    path_ms = 0.0  # the last round's round trip less its answering tick (reported with the next chunk)
    catch_up = True  # the first round and those after a decode round feed unseen tokens (see ``reported``)
    if batched and device.batcher is None:
        device.batcher = DraftBatcher(env, device)
    while req.committed < out:
        left = out - req.committed
        g = min(advised, left) if advised > 0 else 0
        decode = min(decode_tokens, left) if g == 0 else 0
        draft_s = 0.0
        if g > 0 and batched:
            t0 = env.now
            place = yield device.batcher.draft(g, req.prompt_tokens + req.committed)
            draft_s = env.now - t0
            out_s = link.delay(CHUNK_BYTES + 4 * g, rng) + fixed_s + place * send_s
            yield env.timeout(out_s)
        else:
            if g > 0:
                draft_s = g * device.step_s(req.prompt_tokens + req.committed)
            out_s = link.delay(CHUNK_BYTES + 4 * g, rng) + fixed_s
            yield env.timeout(draft_s + out_s)
        sent = env.now
        done = env.event()
        reported = 0.0 if catch_up and g < 2 else draft_s * 1000.0  # catch-up: its later steps' cost (none: 1)
        while not target.verify(sess, g, done, decode, reported, path_ms):  # BUSY: wait the retry hint, resend
            yield env.timeout(retry_s + link.delay(CHUNK_BYTES + 4 * g, rng))
        ans: Answer = yield done
        # a decode request spans its k ticks, and the first round waits behind every session's prompt: neither
        # round trip measures a round's path
        if g > 0 and req.rounds > 0:
            path_ms = max(0.0, (out_s + env.now - sent - ans.verify_s) * 1000.0)
        catch_up = g == 0
        if auto and ans.next_gamma >= 0:
            advised = ans.next_gamma
        n = ans.tokens
        if req.rounds == 0:
            req.first_result, req.first_result_tokens = env.now, n
        req.committed += n
        req.rounds += 1
        metrics.tokens(env.now, n)
    req.finished = env.now
    device.active -= 1
    if not sim.closed:
        sim.pool.release(device)

"""Draft devices (phones, laptops, servers) and the speculative session each one drives.

A device belongs to a speed class: its draft decode step costs the profile's draft table at its current batch
(sessions it is drafting for) times the class ``slowdown``, or a fixed ``step_ms``. It reaches the broker over its
class's link. A session is one SimPy process; a round (draft γ tokens, send the chunk) is ONE timeout and the
answer is ONE event, so the cost of a round does not grow with γ.

Requests wait in one pool queue until a device has a free session slot (``drafts.sessions`` per device).
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import simpy

from simulator.entities.links import Link
from simulator.entities.targets import Session

OPEN_BYTES = 128  # SESSION_OPEN framing; prompt ids add 4 bytes each
CHUNK_BYTES = 96  # VERIFY framing; draft ids add 4 bytes each


@dataclass
class DraftClass:
    name: str
    link: Link
    slowdown: float = 1.0
    step_ms: float | None = None  # fixed step time, overrides the table


class DraftDevice:
    __slots__ = ("name", "cls", "cost", "rng", "active", "free_slots")

    def __init__(self, name: str, cls: DraftClass, cost, rng: random.Random, sessions: int) -> None:
        self.name, self.cls, self.cost, self.rng = name, cls, cost, rng
        self.active = 0
        self.free_slots = sessions

    def step_s(self, context: int) -> float:
        if self.cls.step_ms is not None:
            return self.cls.step_ms / 1000.0
        return self.cost.draft_step_ms(max(1, self.active), context) * self.cls.slowdown / 1000.0


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
    yield env.timeout(link.delay(OPEN_BYTES + 4 * req.prompt_tokens, rng) + overhead)
    target = broker.place_session()
    req.target = target.name
    sess = Session(req, link, rng, sim.acceptance_for(device.cls.name, target.group), overhead)
    opened = env.event()
    target.open_session(sess, opened)
    yield opened
    now = env.now
    req.first_token = now
    req.committed = 1
    metrics.tokens(now, 1)
    gamma = sim.gamma
    retry_s = sim.retry_s
    out = req.output_tokens
    while req.committed < out:
        g = min(gamma, out - req.committed)
        t = g * device.step_s(req.prompt_tokens + req.committed) + link.delay(CHUNK_BYTES + 4 * g, rng) + overhead
        yield env.timeout(t)
        done = env.event()
        while not target.verify(sess, g, done):  # BUSY: wait the retry hint, resend
            yield env.timeout(retry_s + link.delay(CHUNK_BYTES + 4 * g, rng))
        n = yield done
        req.committed += n
        req.rounds += 1
        metrics.tokens(env.now, n)
    req.finished = env.now
    device.active -= 1
    if not sim.closed:
        sim.pool.release(device)

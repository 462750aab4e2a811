"""Session placement policies: which target worker gets a new session.

Pure functions of a load view, shared by the broker and the simulator (one source of truth). A policy sees only
``WorkerLoad`` rows and a ``random.Random``; it returns the chosen row or ``None`` when nothing can take the session.
Adding a policy is adding a class and a line in ``ROUTERS``.

The load signal is defined once, here, from two counts the broker keeps and the simulator keeps alike (both build
their rows with ``worker_load``): ``sessions`` placed on a target, and ``outstanding`` requests (session opens and
draft chunks) accepted for it and not answered yet, whether they still wait in the broker's verify queue or sit at
the target. A drafter has one request in flight per session, so a target's load is its sessions plus its
*backlog*, the requests beyond one per session; raw outstanding counts only break ties. The raw count swings from
zero to every session within one batched tick (a tick answers all its chunks at once): added to the load whole, it
made jsq2 and least_loaded no better than random in the simulator's closed loop. The backlog stays zero until work
truly piles up (pipelined chunks, a burst of opens).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class WorkerLoad:
    """What a policy may know of a worker."""

    id: str
    capacity: int  # session slots
    sessions: int = 0  # sessions placed on it
    outstanding: int = 0  # opens and chunks accepted for it and not answered yet

    @property
    def backlog(self) -> int:
        """Requests beyond one in flight per placed session: work piling up, not the tick's own batch."""
        return max(0, self.outstanding - self.sessions)

    @property
    def load(self) -> int:
        return self.sessions + self.backlog

    @property
    def utilisation(self) -> float:
        return self.load / max(1, self.capacity)

    @property
    def has_room(self) -> bool:
        return self.sessions < self.capacity


def worker_load(id: str, capacity: int, sessions: int, outstanding: int) -> WorkerLoad:
    """The one load row every placement sees, from counts the broker keeps (broker and simulator alike).

    ``sessions``: sessions placed on the target and not closed; ``outstanding``: session opens and draft chunks
    accepted for it and not answered yet, queued in the broker or forwarded. Negative counts are bookkeeping bugs.
    """
    if sessions < 0 or outstanding < 0:
        raise ValueError(f"worker {id}: sessions ({sessions}) and outstanding ({outstanding}) must be >= 0")
    return WorkerLoad(id=id, capacity=capacity, sessions=sessions, outstanding=outstanding)


class RoutingPolicy:
    name = "base"

    def place(self, workers: Sequence[WorkerLoad], rng: random.Random) -> WorkerLoad | None:
        raise NotImplementedError


def _candidates(workers: Sequence[WorkerLoad]) -> list[WorkerLoad]:
    """Workers with a free slot; if every one is full, all of them (the target queues the session)."""
    roomy = [w for w in workers if w.has_room]
    return roomy or list(workers)


class RoundRobin(RoutingPolicy):
    name = "rr"

    def __init__(self) -> None:
        self._next = 0

    def place(self, workers: Sequence[WorkerLoad], rng: random.Random) -> WorkerLoad | None:
        cands = _candidates(workers)
        if not cands:
            return None
        w = cands[self._next % len(cands)]
        self._next += 1
        return w


class RandomChoice(RoutingPolicy):
    name = "random"

    def place(self, workers: Sequence[WorkerLoad], rng: random.Random) -> WorkerLoad | None:
        cands = _candidates(workers)
        return rng.choice(cands) if cands else None


class LeastLoaded(RoutingPolicy):
    """Full scan for the lowest utilisation (load / capacity); ties broken by outstanding requests, then id."""

    name = "least_loaded"

    def place(self, workers: Sequence[WorkerLoad], rng: random.Random) -> WorkerLoad | None:
        cands = _candidates(workers)
        return min(cands, key=lambda w: (w.utilisation, w.load, w.outstanding, w.id)) if cands else None


class JSQ2(RoutingPolicy):
    """Power of two choices: sample two workers uniformly, take the less loaded (Mitzenmacher); ties as above."""

    name = "jsq2"

    def place(self, workers: Sequence[WorkerLoad], rng: random.Random) -> WorkerLoad | None:
        cands = _candidates(workers)
        if len(cands) <= 1:
            return cands[0] if cands else None
        a, b = rng.sample(cands, 2)
        return a if (a.load, a.outstanding, a.id) <= (b.load, b.outstanding, b.id) else b


class WeightedJSQ2(RoutingPolicy):
    """Two choices sampled with probability proportional to capacity, compared by utilisation.

    For heterogeneous pools: a worker with twice the slots is sampled twice as often and judged relative to size.
    """

    name = "wjsq2"

    def place(self, workers: Sequence[WorkerLoad], rng: random.Random) -> WorkerLoad | None:
        cands = _candidates(workers)
        if len(cands) <= 1:
            return cands[0] if cands else None
        weights = [max(1, w.capacity) for w in cands]
        a = rng.choices(cands, weights=weights)[0]
        b = rng.choices(cands, weights=weights)[0]
        return a if (a.utilisation, a.outstanding, a.id) <= (b.utilisation, b.outstanding, b.id) else b


ROUTERS: dict[str, Callable[[], RoutingPolicy]] = {
    RoundRobin.name: RoundRobin,
    RandomChoice.name: RandomChoice,
    LeastLoaded.name: LeastLoaded,
    JSQ2.name: JSQ2,
    WeightedJSQ2.name: WeightedJSQ2,
}


def make_router(name: str) -> RoutingPolicy:
    """Build a policy by name; a clear error lists the known names."""
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(sorted(ROUTERS))}") from None

"""Session placement policies: which target worker gets a new session.

Pure functions of a load view, shared by the broker and the simulator (one source of truth). A policy sees only
``WorkerLoad`` rows and a ``random.Random``; it returns the chosen row or ``None`` when nothing can take the session.
Adding a policy is adding a class and a line in ``ROUTERS``.
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
    queued: int = 0  # chunks waiting in its verify queue

    @property
    def load(self) -> int:
        return self.sessions + self.queued

    @property
    def utilisation(self) -> float:
        return self.load / max(1, self.capacity)

    @property
    def has_room(self) -> bool:
        return self.sessions < self.capacity


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
    """Full scan for the lowest utilisation (load / capacity); ties broken by id for determinism."""

    name = "least_loaded"

    def place(self, workers: Sequence[WorkerLoad], rng: random.Random) -> WorkerLoad | None:
        cands = _candidates(workers)
        return min(cands, key=lambda w: (w.utilisation, w.load, w.id)) if cands else None


class JSQ2(RoutingPolicy):
    """Power of two choices: sample two workers uniformly, take the less loaded (Mitzenmacher)."""

    name = "jsq2"

    def place(self, workers: Sequence[WorkerLoad], rng: random.Random) -> WorkerLoad | None:
        cands = _candidates(workers)
        if len(cands) <= 1:
            return cands[0] if cands else None
        a, b = rng.sample(cands, 2)
        return a if (a.load, a.id) <= (b.load, b.id) else b


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
        return a if (a.utilisation, a.id) <= (b.utilisation, b.id) else b


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

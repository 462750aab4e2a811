"""The broker: places sessions on targets with the real routing policy (``broker.routing``), nothing else.

Its per-message processing cost is a fixed ``overhead_ms`` added to each hop; the broker is not a bottleneck in
the model (``benchmarks/broker.py`` measures the real one).
"""
from __future__ import annotations

import random
from typing import Sequence

from broker.routing import WorkerLoad, make_router


class Broker:
    def __init__(self, targets: Sequence, router: str, rng: random.Random, overhead_ms: float = 0.05) -> None:
        self.targets = list(targets)
        self.router = make_router(router)
        self.rng = rng
        self.overhead_s = overhead_ms / 1000.0
        self.loads: list[WorkerLoad] = [t.load for t in self.targets]
        self._by_id = {t.load.id: t for t in self.targets}
        self.placed = 0

    def place_session(self):
        """Choose a target for a new session (routing policy) and count the session against it."""
        row = self.router.place(self.loads, self.rng)
        if row is None:
            return None
        row.sessions += 1
        self.placed += 1
        return self._by_id[row.id]

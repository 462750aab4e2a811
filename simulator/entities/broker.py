"""The broker: places sessions on targets with the real routing policy (``broker.routing``), nothing else.

Its per-message processing cost is a fixed ``overhead_ms`` added to each hop; the broker is not a bottleneck in
the model (``benchmarks/broker.py`` measures the real one). Placement sees the same load rows as the real broker
(``broker.routing.worker_load``: sessions placed plus opens and chunks not answered yet).
"""
from __future__ import annotations

import random
from typing import Sequence

from broker.routing import make_router, worker_load


class Broker:
    def __init__(self, targets: Sequence, router: str, rng: random.Random, overhead_ms: float = 0.05) -> None:
        self.targets = list(targets)
        self.router = make_router(router)
        self.rng = rng
        self.overhead_s = overhead_ms / 1000.0
        self.placed = 0

    def place_session(self):
        """Choose a target for a new session (routing policy) and count the session against it."""
        targets = self.targets
        loads = [worker_load(t.name, t.slots, t.sessions, t.outstanding) for t in targets]
        row = self.router.place(loads, self.rng)
        if row is None:
            return None
        target = targets[loads.index(row)]
        target.sessions += 1
        self.placed += 1
        return target

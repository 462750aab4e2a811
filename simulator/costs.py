"""Step-latency cost models: measured lookup tables, interpolated (Vidur's execution-time predictor, as a table).

A cost table (``workers.cost_table``: the file format that ``specmq profile`` writes) gives the latency of one
target forward pass against ``(batch, tokens, context)`` and of one draft decode step against ``(batch, context)``;
``load_table`` reads one into a ``CostTable`` that answers lookups.

Lookups are multilinear inside the grid; below the first grid point an axis is clamped, above the last it is
extrapolated linearly from the last segment (a bigger batch costs more, it does not plateau). Results are never
negative. Cost models for tests (``ConstantCost``, ``ExponentialCost``) draw service times instead.
"""
from __future__ import annotations

import random

from workers.cost_table import CostModel, CostTable, Grid, load_table  # noqa: F401  (the simulator's cost API)


class ConstantCost(CostModel):
    """Every forward pass takes ``ms`` (M/D/1 checks)."""

    def __init__(self, ms: float, draft_ms: float = 0.0) -> None:
        self.ms, self.draft_ms = ms, draft_ms

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        return self.ms

    def draft_step_ms(self, batch: int, context: float) -> float:
        return self.draft_ms


class ExponentialCost(CostModel):
    """Service times drawn from an exponential distribution of mean ``mean_ms`` (M/M/1 checks)."""

    def __init__(self, mean_ms: float, seed: int = 0, draft_ms: float = 0.0) -> None:
        self.mean_ms, self.draft_ms = mean_ms, draft_ms
        self.rng = random.Random(seed)

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        return self.rng.expovariate(1.0 / self.mean_ms)

    def draft_step_ms(self, batch: int, context: float) -> float:
        return self.draft_ms

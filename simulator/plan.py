"""Capacity planning: the fewest targets that serve N concurrent sessions within a TPOT p90 SLO.

N sessions are N closed-loop users (``workload.arrival: closed``, one draft slot each, the config's draft classes
and think time); each candidate target count is one simulation. TPOT p90 falls as targets are added (fewer
sessions per target, smaller ticks), so the search doubles the count until the SLO is met and then bisects between
the last miss and the first hit: O(log K) simulations for an answer of K targets.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from simulator.config import ConfigError, set_key


@dataclass
class PlanPoint:
    targets: int
    tpot_p90_ms: float
    tpot_p50_ms: float
    ttft_p90_ms: float
    throughput_tok_s: float
    finished: int

    def meets(self, slo_tpot_ms: float) -> bool:
        return self.finished > 0 and not math.isnan(self.tpot_p90_ms) and self.tpot_p90_ms <= slo_tpot_ms


@dataclass
class Plan:
    sessions: int
    slo_tpot_ms: float
    max_targets: int
    targets: int | None  # the answer; None when even max_targets misses the SLO
    tried: list[PlanPoint] = field(default_factory=list)
    synthetic: bool = True
    cost_tables: list[str] = field(default_factory=list)

    def point(self, targets: int | None) -> PlanPoint | None:
        return next((p for p in self.tried if p.targets == targets), None)

    def to_json(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "slo_tpot_ms": self.slo_tpot_ms, "max_targets": self.max_targets,
                "targets": self.targets, "met": self.targets is not None,
                "tried": [vars(p) for p in sorted(self.tried, key=lambda p: p.targets)],
                "synthetic": self.synthetic, "cost_tables": self.cost_tables}


def fleet_config(cfg: dict[str, Any], sessions: int, targets: int) -> dict[str, Any]:
    """``cfg`` with ``sessions`` closed-loop users (one draft slot each) and ``targets`` targets in group 0."""
    c = copy.deepcopy(cfg)
    if c.get("architecture") != "distributed":
        raise ConfigError(f"simulate plan needs architecture 'distributed', got {c.get('architecture')!r}")
    set_key(c, "workload.arrival", "closed")
    set_key(c, "drafts.count", sessions)
    set_key(c, "drafts.sessions", 1)
    set_key(c, "targets.0.count", targets)
    return c


def plan_targets(cfg: dict[str, Any], sessions: int, slo_tpot_ms: float, simulate: Callable[[dict], dict],
                 max_targets: int = 64, progress: bool = False) -> Plan:
    """The fewest targets (1..max_targets) whose simulated TPOT p90 meets ``slo_tpot_ms`` for ``sessions``."""
    if sessions < 1:
        raise ConfigError(f"--sessions must be >= 1, got {sessions}")
    if not slo_tpot_ms > 0:
        raise ConfigError(f"--slo-tpot-ms must be > 0, got {slo_tpot_ms}")
    if max_targets < 1:
        raise ConfigError(f"--max-targets must be >= 1, got {max_targets}")
    plan = Plan(sessions, slo_tpot_ms, max_targets, None, synthetic=False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * max(1, math.ceil(math.log2(max_targets))) + 1, desc="simulate plan", unit="run")
    seen: dict[int, PlanPoint] = {}

    def run(k: int) -> PlanPoint:
        if k not in seen:
            res = simulate(fleet_config(cfg, sessions, k))
            seen[k] = PlanPoint(k, res["tpot_p90_ms"], res["tpot_p50_ms"], res["ttft_p90_ms"],
                                res["throughput_tok_s"], res["finished"])
            plan.tried.append(seen[k])
            plan.synthetic = plan.synthetic or bool(res.get("synthetic", True))  # any synthetic table taints it
            plan.cost_tables = sorted(set(plan.cost_tables) | set(res.get("cost_tables", [])))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(targets=k, tpot_p90_ms=round(res["tpot_p90_ms"], 2))
        return seen[k]

    try:
        miss, hit = 0, None
        k = 1
        while True:  # doubling: the first count that meets the SLO
            if run(k).meets(slo_tpot_ms):
                hit = k
                break
            miss = k
            if k >= max_targets:
                break
            k = min(2 * k, max_targets)
        if hit is not None:
            while hit - miss > 1:  # bisect (miss, hit]
                mid = (miss + hit) // 2
                if run(mid).meets(slo_tpot_ms):
                    hit = mid
                else:
                    miss = mid
        plan.targets = hit
    finally:
        if bar is not None:
            bar.close()
    return plan

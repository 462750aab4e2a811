"""``specmq bench simulator``: how fast the simulator runs, in events per wall second and wall time per scenario.

Scenarios: the small default config and ``configs/sim/scale-1000.yaml`` (1,000 drafts, 16 targets, 60 s virtual;
goal: under 60 s of wall time on one core). The simulator is single-threaded, so one run uses one core.
``--profile`` prints the top functions by cumulative time (cProfile) for the scale scenario. Each scenario says whether
its cost tables were synthetic (``synthetic``, ``cost_tables``): speed does not depend on it, its figures do.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

from benchmarks import BenchmarkError, print_json

HELP = "simulator speed: events/s and wall time of the 1,000-draft scenario"
EXAMPLE = "specmq bench simulator --json"
SCENARIOS = {"default": "configs/sim/default.yaml", "scale-1000": "configs/sim/scale-1000.yaml"}
GOAL_S = 60.0


def bench_scenario(path: str, repeat: int = 1) -> dict[str, Any]:
    """Run one config ``repeat`` times; report the best wall time (least disturbed by other load)."""
    from simulator.config import load_config
    from simulator.simulation import simulate

    best: dict[str, Any] | None = None
    walls = []
    for _ in range(repeat):
        cfg = load_config(path)
        t0 = time.perf_counter()
        res = simulate(cfg)
        wall = time.perf_counter() - t0  # includes building the world and the workload
        walls.append(wall)
        if best is None or wall < best["wall_total_s"]:
            best = {"wall_total_s": wall, "wall_run_s": res["wall_s"], "events": res["events"],
                    "events_per_s": res["events"] / wall, "virtual_s": res["virtual_s"],
                    "drafts": res["drafts"], "targets": res["targets"], "requests": res["requests"],
                    "throughput_tok_s": res["throughput_tok_s"], "synthetic": res["synthetic"],
                    "cost_tables": res["cost_tables"]}
    assert best is not None
    best["walls_s"] = [round(w, 3) for w in walls]
    return best


def _profile(path: str, top: int = 20) -> None:
    import cProfile
    import pstats

    from simulator.config import load_config
    from simulator.simulation import simulate

    cfg = load_config(path)
    prof = cProfile.Profile()
    prof.enable()
    simulate(cfg)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def run(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for n in names:
        if n not in SCENARIOS and not Path(n).exists():
            raise BenchmarkError(f"unknown scenario {n!r}: use {', '.join(SCENARIOS)} or a config path")
    if args.profile:
        _profile(SCENARIOS.get(names[-1], names[-1]))
        return 0
    results = {}
    for n in names:
        results[n] = bench_scenario(SCENARIOS.get(n, n), args.repeat)
    host = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    if "scale-1000" in results:
        results["scale-1000"]["goal_s"] = GOAL_S
        results["scale-1000"]["meets_goal"] = results["scale-1000"]["wall_total_s"] < GOAL_S
    if args.json:
        print_json({"benchmark": "simulator", "host": host, "scenarios": results})
        return 0
    print(f"simulator benchmark on {host['cpu']} ({host['cpus']} CPUs visible; the simulator uses one), "
          f"Python {host['python']}")
    print(f"{'scenario':<12} {'events':>10} {'events/s':>10} {'wall s':>8} {'virtual s':>9} {'drafts':>7} "
          f"{'targets':>7}  costs")
    for n, r in results.items():
        costs = ("SYNTHETIC " if r["synthetic"] else "measured ") + ", ".join(r["cost_tables"])
        print(f"{n:<12} {r['events']:>10,} {r['events_per_s']:>10,.0f} {r['wall_total_s']:>8.2f} "
              f"{r['virtual_s']:>9.1f} {r['drafts']:>7} {r['targets']:>7}  {costs}")
    if "scale-1000" in results:
        r = results["scale-1000"]
        print(f"scale-1000: {r['wall_total_s']:.2f} s wall (goal < {GOAL_S:.0f} s): "
              f"{'met' if r['meets_goal'] else 'NOT met'}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenarios", default="default,scale-1000",
                   help=f"comma list of {', '.join(SCENARIOS)} or config paths (default: default,scale-1000)")
    p.add_argument("--repeat", type=int, default=1, help="runs per scenario; the best wall time is reported")
    p.add_argument("--profile", action="store_true", help="cProfile the last scenario instead of timing")


"""Simulator vs a real run (SKELETON): does the simulator, calibrated from measured rounds, predict the real run?

Half of it works today: ``compare(rounds)`` takes the per-round rows a real drafter measured (``specmq draft
--profile`` writes ``round, gamma, accepted, draft_ms, network_ms, verify_ms``), builds a one-draft, one-target
simulation from them (draft step = draft_ms / gamma, link = network_ms split in two directions, target forward =
verify_ms, acceptance = the measured histogram) and reports the simulated per-round time, tokens per round and
tokens/s next to the measured ones. A large gap means the simulator misses something (queueing, batching, the
broker), or the calibration split is wrong.

Missing (needs the real workers): ``run_real`` should start ``specmq up`` on loopback, run ``specmq draft
--profile`` for a few prompts and return the rounds file; then the same comparison at 1, 8 and 64 drafts with a
cost table from ``specmq profile`` instead of the single-session calibration.

    python -m benchmarks.sim_vs_real ROUNDS.csv [--output-tokens 256] [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from simulator.acceptance import EmpiricalAcceptance, load_rounds


def _read_rows(path: str | Path) -> list[dict[str, float]]:
    import csv

    text = Path(path).read_text()
    if str(path).endswith(".json"):
        data = json.loads(text)
        rows = data.get("rounds", data) if isinstance(data, dict) else data
    else:
        rows = list(csv.DictReader(text.splitlines()))
    need = ("gamma", "accepted", "draft_ms", "network_ms", "verify_ms")
    out = []
    for i, r in enumerate(rows):
        missing = [c for c in need if r.get(c) in (None, "")]
        if missing:
            raise ValueError(f"{path}: round {i}: missing column {missing[0]!r}")
        out.append({c: float(r[c]) for c in need})
    if not out:
        raise ValueError(f"{path}: no rounds")
    return out


def measured(rows: list[dict[str, float]]) -> dict[str, float]:
    round_ms = [r["draft_ms"] + r["network_ms"] + r["verify_ms"] for r in rows]
    tokens = [r["accepted"] + 1 for r in rows]
    return {"round_ms": statistics.fmean(round_ms), "tokens_per_round": statistics.fmean(tokens),
            "tok_s": sum(tokens) / (sum(round_ms) / 1000.0)}


def calibrated_config(rows: list[dict[str, float]], output_tokens: int, duration_s: float) -> dict[str, Any]:
    """A one-draft, one-target closed-loop config whose parts cost what the measured rounds say."""
    from simulator.config import load_config

    gamma = round(statistics.fmean(r["gamma"] for r in rows))
    step_ms = statistics.fmean(r["draft_ms"] / max(1.0, r["gamma"]) for r in rows)
    net = [r["network_ms"] / 2 for r in rows]  # one way; round trip = up + down
    cfg = load_config(None)
    cfg.update(duration_s=duration_s, burn_in_s=0.0, drain_s=duration_s, gamma=gamma, router="rr")
    cfg["broker"] = dict(cfg["broker"], overhead_ms=0.0)
    cfg["links"] = {"measured": {"latency_ms": statistics.fmean(net), "jitter_ms": statistics.pstdev(net),
                                 "bandwidth_mbps": 1e6, "availability": 1.0, "dist": "normal"}}
    cfg["draft_classes"] = {"measured": {"step_ms": step_ms, "link": "measured"}}
    cfg["drafts"] = {"count": 1, "sessions": 1, "mix": {"measured": 1.0}}
    cfg["targets"] = [dict(cfg["targets"][0], count=1, slots=1, tick_ms=0.0)]
    cfg["workload"] = dict(cfg["workload"], arrival="closed", think_s=0.0,
                           prompt_tokens={"dist": "constant", "value": 1},
                           output_tokens={"dist": "constant", "value": output_tokens})
    return cfg


def compare(rounds_path: str | Path, output_tokens: int = 256, duration_s: float = 60.0) -> dict[str, Any]:
    from simulator.costs import ConstantCost
    from simulator.simulation import Simulation

    rows = _read_rows(rounds_path)
    cfg = calibrated_config(rows, output_tokens, duration_s)
    sim = Simulation(cfg, costs=ConstantCost(statistics.fmean(r["verify_ms"] for r in rows)))
    sim.default_acceptance = EmpiricalAcceptance(load_rounds(rounds_path), source=str(rounds_path))
    res = sim.run()
    done = [r for r in sim.requests if r.rounds > 0 and not math.isnan(r.finished)]
    sim_round_ms = statistics.fmean((r.finished - r.first_token) * 1000 / r.rounds for r in done)
    real = measured(rows)
    simulated = {"round_ms": sim_round_ms, "tokens_per_round": res["tokens_per_round"],
                 "tok_s": res["tokens_per_round"] / (sim_round_ms / 1000.0)}
    return {"real": real, "sim": simulated,
            "ratio": {k: simulated[k] / real[k] for k in real if real[k]}, "rounds": len(rows)}


def run_real(*args: Any, **kwargs: Any) -> Path:
    """Start a loopback deployment and record rounds: left for when the real workers exist."""
    raise NotImplementedError("needs the real target and draft workers (specmq up, specmq draft --profile)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim_vs_real", description=__doc__.split("\n\n")[0])
    p.add_argument("rounds", help="rounds CSV/JSON from specmq draft --profile")
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        out = compare(args.rounds, args.output_tokens)
    except (OSError, ValueError) as exc:
        print(f"sim_vs_real: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
    else:
        for k in out["real"]:
            print(f"{k:<18} real {out['real'][k]:10.2f}   sim {out['sim'][k]:10.2f}   sim/real {out['ratio'][k]:.3f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

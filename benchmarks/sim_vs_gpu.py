"""Out-of-sample check of the simulator against a GPU capacity run: predict points it was not calibrated on.

``specmq bench sim_vs_gpu`` reads a ``specmq bench capacity`` rows file (its ``setup`` row names the cost table,
draft processes, tick, output length and the command) and simulates every measured point of the distributed
modes (``target-only`` = decode mode γ=0, ``g2``, ``g4``, ``auto`` = the goodput controller) as that run had it:
N sessions opening together, prompt = context − output tokens, one target with the run's limits (slots and rows =
the largest N, tokens = 9 × slots, prefill chunk 256, ``tick_ms`` from the setup) and the run's draft processes,
each a batched draft device on a zero-latency link.

What comes from where (nothing is fitted to a predicted point):
- target forward: the profile table (``--table``; default the setup's ``cost_table``), as is;
- calibration, per context, from the N = 1 and N = 8 rows only (their first occurrence):
  draft cost per token = ``round_draft_ms / mean_gamma`` of g2 and g4 (median): a batch-1 step with one process
  (N = 1) and with eight sharing the host (N = 8), linear in processes between; a process drafting b sessions
  pays that × a draft step's cost at b over batch 1 from ``--draft-table`` (a ``specmq profile`` of the draft on a
  CPU, a separate measurement); without one (the default), the line through the two points in N, never falling
  (more sessions on the same CPU never make a draft step cheaper); path per round = the N = 1 rows'
  ``round_network_ms`` (median over g2, g4, auto: round trip less the target's forward, with nobody to wait for);
  host time per tick outside the forward = target-only N = 1 ``tpot_p50 × (1 − busy)`` less the path's share of
  a decode request (path / decode tokens): the host time of a one-row tick; the served forward's cost over the
  table's (``targets[].cost_scale``) = target-only N = 8's ``cost_correction`` (the target's running ratio of each
  tick's measured forward to the table's price of its shape): the serving loop's forward (per-row inputs,
  acceptance, the hand-off to the compute thread, sync) costs more than the profiled step. Rows without it fall back
  to ``tpot_p50 × busy`` over the table at the mean batch, which also counts prefill ticks' busy time (21% too high
  at context 2048 against an emulated run, whose true ratio is known);
- the drafter's session start (``open_ms``: tokenizing, its own prompt prefill, the open's trip), linear in N
  through N = 1 and N = 8: measured TTFT p50 less the simulated TTFT without it (median over the modes);
- host time per row of a tick (``targets[].tick_row_overhead_ms``): the slope b of a least-squares line
  ``host_ms = a + b × batch`` through a ``specmq bench tick`` file (``--tick-rows``; default
  ``benchmarks/results/tick_h200.jsonl`` when present, ``none``: 0), over every γ at the file's context nearest
  the simulated one. A separate benchmark of the target's tick, not a capacity point, so nothing predicted feeds it.
  Only the slope is taken: the one-row tick's host time above stays the intercept, so the per-tick constant becomes
  that less b (a one-row tick still costs what N = 1 measured);
- auto points start warm, as in the run (its modes ran target-only, g2, g4, then auto on one target): the
  controller knows per-load-level drafting and path costs (the calibrated draft cost at 2^(level-1) sessions, the
  N = 1 path) and a pooled acceptance (the N = 8 rows' α); ``--cold-auto``: it knows nothing;
- workload: each (context, N)'s acceptance α is the mean of the g2 and g4 rows' measured α (the prompts' acceptance
  under plain speculation, an input like the context length), drawn iid per token.

Predicted: aggregate tok/s (N × output tokens over first open to last token), TPOT p50 and p90 over sessions
(mean of ``--seeds`` runs). Points at N = 1 and 8 are marked ``calib``; the rest are predictions. The table gives
signed errors (sim / measured − 1) and the worst points; ``--out FILE`` writes it as markdown.

    specmq bench sim_vs_gpu --rows benchmarks/results/capacity_h200.jsonl --out benchmarks/results/sim_vs_gpu.md

``--map`` predicts with the same calibration where the run did not go: draft devices (a second GPU; laptop- and
phone-class 1B drafts at published tokens/s, one device per session) over links of RTT 1 / 10 / 40 ms, contexts 512 /
2048 / 8192 (8192: calibration of 2048, the table measured at 8192 for batches up to 64 and extrapolated past them,
sessions capped by the KV cache
that fits on one H200), and the H200s that 1,000 and 10,000 laptops need at TPOT p90 ≤ 30 ms:

    specmq bench sim_vs_gpu --map --out benchmarks/results/capacity_map_predicted.md --plot docs/capacity_predicted.png
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from benchmarks import BenchmarkError, print_json

HELP = "predict a GPU capacity run's points with the simulator (calibrated on N=1 and N=8 only) and compare"
DESCRIPTION = __doc__.split("\n\n")[0]
EXAMPLE = ("specmq bench sim_vs_gpu --rows benchmarks/results/capacity_h200.jsonl "
           "--out benchmarks/results/sim_vs_gpu.md")
MODES = ("target-only", "g2", "g4", "auto")
CALIB_N = (1, 8)
GOALS = {"tok_s": 0.10, "tpot_p50_ms": 0.10, "tpot_p90_ms": 0.20}
DECODE_TOKENS = 8
ROOT = Path(__file__).resolve().parents[1]
TICK_ROWS = "benchmarks/results/tick_h200.jsonl"  # the default --tick-rows, when present


# --------------------------------------------------------------------------- reading the run
def json_lines(path: str | Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file; a missing file or a line that is not a
    JSON object is a ``BenchmarkError`` naming the file and the line."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise BenchmarkError(f"{what} {path} not found") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}: line {i} is not JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{path}: line {i} is not an object")
        yield i, rec


def read_rows(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(setup, measured rows of the distributed modes: the first occurrence of each (context, mode, N))."""
    setup: dict[str, Any] = {}
    rows: dict[tuple, dict[str, Any]] = {}
    for i, rec in json_lines(path, "rows file"):
        if "setup" in rec:
            setup = rec["setup"]
            continue
        if rec.get("mode") not in MODES or rec.get("temperature", 0.0):
            continue
        missing = [k for k in ("context", "sessions", "tok_s", "tpot_p50_ms", "tpot_p90_ms") if rec.get(k) is None]
        if missing:
            raise BenchmarkError(f"{path}: line {i} ({rec.get('mode')}) lacks {', '.join(missing)}")
        rows.setdefault((int(rec["context"]), rec["mode"], int(rec["sessions"])), rec)
    if not rows:
        raise BenchmarkError(f"{path}: no rows of modes {', '.join(MODES)}")
    return setup, [rows[k] for k in sorted(rows, key=lambda k: (k[0], MODES.index(k[1]), k[2]))]


def read_tick_rows(path: str | Path) -> list[dict[str, float]]:
    """A ``specmq bench tick`` file's measured ticks as ``{batch, gamma, context, host_ms}`` (header lines skipped)."""
    out = []
    for i, rec in json_lines(path, "tick rows file"):
        if "batch" not in rec:  # a header line
            continue
        try:
            pt = {k: float(rec[k]) for k in ("batch", "context", "host_ms")}
        except KeyError as exc:
            raise BenchmarkError(f"{path}: line {i} lacks {exc.args[0]}") from None
        except (TypeError, ValueError):
            raise BenchmarkError(f"{path}: line {i}: batch, context and host_ms must be numbers") from None
        if pt["batch"] < 1 or pt["host_ms"] < 0:
            raise BenchmarkError(f"{path}: line {i}: batch must be >= 1 and host_ms >= 0")
        pt["gamma"] = float(rec.get("gamma") or 0)
        out.append(pt)
    if not out:
        raise BenchmarkError(f"{path}: no tick rows (lines with batch, context, host_ms)")
    return out


def fit_tick_rows(points: list[dict[str, float]], context: float) -> dict[str, float]:
    """Least squares ``host_ms = a + b × batch`` over every γ at the measured context nearest ``context``: the
    host time a tick's rows add (b, ms per row; never below 0) and its intercept a, with the context used and the
    number of points."""
    near = min({p["context"] for p in points}, key=lambda c: (abs(c - context), c))
    at = [p for p in points if p["context"] == near]
    xs, ys = [p["batch"] for p in at], [p["host_ms"] for p in at]
    if len(set(xs)) < 2:
        raise BenchmarkError(f"tick rows at context {near:g}: need at least two batch sizes to fit a line")
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"tick_row_overhead_ms": max(0.0, b), "tick_rows_a_ms": my - b * mx, "tick_rows_context": near,
            "tick_rows_points": float(len(at))}


def _median(xs: list[float], what: str) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        raise BenchmarkError(f"cannot calibrate {what}: no N=1/N=8 rows carry it")
    return statistics.median(xs)


def calibrate(rows: list[dict[str, Any]], context: int, table, output: int = 64,
              tick_rows: list[dict[str, float]] | None = None, draft_table=None) -> dict[str, Any]:
    """Per context, from the N = 1 and N = 8 rows only, the host time per row from ``tick_rows`` (a
    ``read_tick_rows`` list; None: 0) and the draft's cost by batch from ``draft_table`` (a profile of the draft
    on a CPU; None: the N = 1 / N = 8 line) (see the module docstring)."""
    at = {(r["mode"], r["sessions"]): r for r in rows if r["context"] == context and r["sessions"] in CALIB_N}

    def per_token(n: int) -> float:
        return _median([at[(m, n)]["round_draft_ms"] / at[(m, n)]["mean_gamma"] for m in ("g2", "g4")
                        if (m, n) in at and at[(m, n)].get("round_draft_ms") and at[(m, n)].get("mean_gamma")],
                       f"the draft cost at context {context}, N={n}")

    path = _median([at[(m, 1)].get("round_network_ms") for m in ("g2", "g4", "auto") if (m, 1) in at],
                   f"the path at context {context}")
    one = at.get(("target-only", 1))
    overhead = 0.0
    if one and one.get("busy") is not None:
        overhead = max(0.0, one["tpot_p50_ms"] * (1.0 - one["busy"]) - path / DECODE_TOKENS)
    scale = 1.0
    eight = at.get(("target-only", CALIB_N[1]))
    if eight and eight.get("cost_correction"):  # the target's own measured forward over the table's price, per tick
        scale = float(eight["cost_correction"])
    elif eight and eight.get("busy") and eight.get("target_batch"):  # rows without it: busy time per token, which
        rows_ = max(1, round(eight["target_batch"]))  # also counts the prefill ticks (an overestimate at long prompts)
        scale = eight["tpot_p50_ms"] * eight["busy"] / table.verify_ms(rows_, rows_, context - output / 2)
    cal = {"draft_ms_1": per_token(1), "draft_ms_8": per_token(8), "path_ms": path, "tick_overhead_ms": overhead,
           "cost_scale": scale, "host_one_row_ms": overhead, "tick_row_overhead_ms": 0.0}
    if draft_table is not None:
        cal["draft_scale"] = draft_scale(draft_table, context)
    if tick_rows:
        cal.update(fit_tick_rows(tick_rows, context))
        # the one-row tick's measured host time is the intercept: the per-tick constant is that less one row's share
        cal["tick_overhead_ms"] = max(0.0, overhead - cal["tick_row_overhead_ms"])
    return cal


def acceptance(rows: list[dict[str, Any]], context: int, n: int) -> float:
    alphas = [r["alpha"] for r in rows if r["context"] == context and r["sessions"] == n
              and r["mode"] in ("g2", "g4") and r.get("alpha") is not None]
    if not alphas:
        alphas = [r["alpha"] for r in rows if r["context"] == context and r.get("alpha") is not None]
    return min(0.99, statistics.mean(alphas)) if alphas else 0.7


# --------------------------------------------------------------------------- one simulated point
def draft_line(cal: dict[str, float], sessions: int) -> float:
    """Draft ms per token at N sessions: the line through N = 1 and N = 8, never falling with N (more sessions on
    the same CPU never make a draft step cheaper; a lower N = 8 figure is noise)."""
    d1, d8 = cal["draft_ms_1"], cal["draft_ms_8"]
    return d1 + max(0.0, d8 - d1) * (sessions - 1) / (CALIB_N[1] - CALIB_N[0])


def draft_steps(cal: dict[str, Any], sessions: int, procs: int) -> float | dict[int, float]:
    """One draft step's ms at N sessions over ``procs`` draft processes: with a draft scaling profile
    (``cal["draft_scale"]``: a step's cost at each batch over batch 1), ``{batch: ms}`` = the batch-1 step of
    ``min(procs, N)`` processes sharing the host (from the N = 1 point to the N = 8 point's, linear in processes)
    × the profile's ratio; without one, the N = 1 / N = 8 line (``draft_line``)."""
    scale = cal.get("draft_scale")
    if not scale:
        return draft_line(cal, sessions)
    d1, d8 = cal["draft_ms_1"], cal["draft_ms_8"]
    p8 = min(procs, CALIB_N[1])
    b8 = -(-CALIB_N[1] // p8)  # each process's batch at N = 8
    shared = d8 / _ratio(scale, b8)  # a batch-1 step with p8 processes on the host
    p = min(procs, sessions)
    base = d1 + max(0.0, shared - d1) * (p - 1) / (p8 - 1) if p8 > 1 else d1
    return {b: base * r for b, r in scale.items()}


def _ratio(scale: dict[int, float], batch: int) -> float:
    """The profile's step cost at ``batch`` over batch 1 (linear between its points, flat outside them)."""
    pts = sorted(scale.items())
    if batch <= pts[0][0]:
        return pts[0][1]
    for (b0, r0), (b1, r1) in zip(pts, pts[1:]):
        if batch <= b1:
            return r0 + (r1 - r0) * (batch - b0) / (b1 - b0)
    return pts[-1][1] * batch / pts[-1][0]  # past the profile: a step costs in proportion to its rows


def draft_at(cal: dict[str, Any], sessions: int, procs: int) -> float:
    """The modelled step ms a process drafts at with N sessions (its batch: N over the processes)."""
    steps = draft_steps(cal, sessions, procs)
    if not isinstance(steps, dict):
        return steps
    base = steps[min(steps)] / _ratio(cal["draft_scale"], min(steps))
    return base * _ratio(cal["draft_scale"], -(-sessions // min(procs, sessions)))


def draft_scale(table, context: int, batches=(1, 2, 4, 8, 16, 32, 64)) -> dict[int, float]:
    """A draft profile's step cost at each batch over batch 1, at ``context`` (``--draft-table``)."""
    one = table.draft_step_ms(1, context)
    if not one > 0:
        raise BenchmarkError("the draft table's batch-1 step costs nothing: not a usable draft profile")
    return {b: table.draft_step_ms(b, context) / one for b in batches}


def sim_config(*, mode: str, sessions: int, context: int, output: int, alpha: float, cal: dict[str, float],
               slots: int, draft_procs: int, tick_ms: float, seed: int, draft_step_ms: float | None | str = "line",
               link: str = "local") -> dict[str, Any]:
    """One capacity-run point as a simulation config. ``draft_step_ms``: "line" (the calibrated line at N), a
    fixed ms per step, or None (the cost table's draft grid); ``link``: the drafts' link (a name in the defaults,
    or "local": zero latency)."""
    from simulator.config import load_config

    step = draft_steps(cal, sessions, draft_procs) if draft_step_ms == "line" else draft_step_ms
    cfg = load_config(None, {
        "seed": seed, "duration_s": 600.0, "burn_in_s": 0.0, "drain_s": 600.0, "sample_ms": 1000.0,
        "gamma": {"target-only": 0, "g2": 2, "g4": 4, "auto": "auto"}[mode], "decode_tokens": DECODE_TOKENS,
        "drafts.count": min(draft_procs, sessions), "broker.overhead_ms": 0.0,
        "workload.arrival": "closed", "workload.requests_per_user": 1, "workload.think_s": 0.0,
        "workload.prompt_tokens": max(1, context - output), "workload.output_tokens": output + 1,
    })
    cfg["drafts"]["sessions"] = -(-sessions // min(draft_procs, sessions))
    cfg["targets"] = [{**cfg["targets"][0], "name": "t", "count": 1, "slots": slots, "max_batch_rows": max(64, slots),
                       "max_batch_tokens": max(512, slots * 9), "prefill_chunk": 256, "tick_ms": tick_ms,
                       "tick_overhead_ms": cal["tick_overhead_ms"], "cost_scale": cal.get("cost_scale", 1.0),
                       "tick_row_overhead_ms": cal.get("tick_row_overhead_ms", 0.0)}]
    cfg["links"]["local"] = {"latency_ms": 0.0, "jitter_ms": 0.0, "bandwidth_mbps": 1e6, "availability": 1.0}
    opening = max(0.0, cal.get("open_ms_1", 0.0) + (cal.get("open_ms_8", 0.0) - cal.get("open_ms_1", 0.0))
                  * (sessions - 1) / (CALIB_N[1] - CALIB_N[0]))
    cfg["draft_classes"] = {"proc": {"link": link, "step_ms": step, "path_ms": cal["path_ms"], "batched": True,
                                     "open_ms": opening}}
    cfg["drafts"]["mix"] = {"proc": 1.0}
    cfg["acceptance"] = {"alpha": alpha, "rounds": None, "pairs": {}}
    return cfg


def simulate_point(cfg: dict[str, Any], sessions: int, table, warm: tuple[dict, float] | None = None
                   ) -> dict[str, float]:
    """Run one point and measure it as ``bench capacity`` does: the target's first token (with the open) is not
    delivered; TTFT is the first round's answer; TPOT is the time from it to the last token over the tokens after
    it; tok/s is every delivered token over first start to last token. ``warm``: (per-level fleet costs, pooled α)
    to start the target's controller from (``warm_state``)."""
    from simulator.metrics import percentile
    from simulator.simulation import Simulation

    sim = Simulation(cfg, costs=table)
    ctl = sim.targets[0].controller
    if warm is not None and ctl is not None:
        ctl.warm(*warm)
    sim.run()
    reqs = [r for r in sim.requests if not math.isnan(r.finished)][:sessions]
    if len(reqs) < sessions:
        raise BenchmarkError(f"simulated point did not finish ({len(reqs)} of {sessions} sessions)")
    delivered = sum(r.output_tokens - 1 for r in reqs)
    wall = max(r.finished for r in reqs) - min(r.arrival for r in reqs)
    tpots = [(r.finished - r.first_result) * 1000.0 / (r.output_tokens - 1 - r.first_result_tokens) for r in reqs
             if r.output_tokens - 1 > r.first_result_tokens]
    m = sim.metrics
    return {"tok_s": delivered / wall, "tpot_p50_ms": percentile(tpots, 50), "tpot_p90_ms": percentile(tpots, 90),
            "ttft_p50_s": percentile([r.first_result - r.arrival for r in reqs], 50),
            "mean_gamma": m.drafted / (m.rounds + m.decode_rounds) if m.rounds + m.decode_rounds else 0.0}


def warm_state(cal: dict[str, Any], alpha: float, procs: int, levels: int = 9) -> tuple[dict, float]:
    """What the run's target knew when an auto point began: the modes before it (fixed γ at every N) had reported
    drafting and path costs at each load level and pooled their acceptance. Modelled from the calibration only:
    the draft cost at 2^(level-1) sessions, the N = 1 path, and ``alpha`` (the N = 8 rows' acceptance, standing
    for the pool of many sessions' rounds)."""
    return {lv: (draft_at(cal, 2 ** (lv - 1), procs), cal["path_ms"]) for lv in range(1, levels + 1)}, alpha


def calibrate_opening(rows: list[dict[str, Any]], cal: dict[str, float], context: int, setup: dict[str, Any],
                      table) -> None:
    """The drafter's session start (``open_ms``): measured TTFT p50 less the simulated one without it, median over
    the modes, at N = 1 and at N = 8 (linear in N between and beyond)."""
    output, procs, tick = int(setup.get("max_new_tokens", 64)), int(setup.get("draft_procs", 8)), \
        float(setup.get("tick_ms", 2.0))
    slots = max(int(s) for s in setup.get("sessions") or [r["sessions"] for r in rows])
    for n in CALIB_N:
        gaps = []
        for r in rows:
            if r["context"] != context or r["sessions"] != n or r.get("ttft_p50_s") is None:
                continue
            cfg = sim_config(mode=r["mode"], sessions=n, context=context, output=output,
                             alpha=acceptance(rows, context, n), cal={**cal, "open_ms_1": 0.0, "open_ms_8": 0.0},
                             slots=slots, draft_procs=procs, tick_ms=tick, seed=0)
            gaps.append((r["ttft_p50_s"] - simulate_point(cfg, n, table)["ttft_p50_s"]) * 1000.0)
        cal[f"open_ms_{n}"] = max(0.0, statistics.median(gaps)) if gaps else 0.0


def predict(rows: list[dict[str, Any]], setup: dict[str, Any], table, seeds: int = 3, progress=None,
            tick_rows: list[dict[str, float]] | None = None, draft_table=None, warm_auto: bool = True
            ) -> tuple[list[dict[str, Any]], dict[int, dict[str, float]]]:
    """Every row simulated (mean of ``seeds`` runs) next to its measurement, and the per-context calibration."""
    output = int(setup.get("max_new_tokens", 64))
    slots = max(int(s) for s in setup.get("sessions") or [r["sessions"] for r in rows])
    procs = int(setup.get("draft_procs", 8))
    tick = float(setup.get("tick_ms", 2.0))
    cals = {c: calibrate(rows, c, table, output, tick_rows, draft_table) for c in sorted({r["context"] for r in rows})}
    for c, cal in cals.items():
        calibrate_opening(rows, cal, c, setup, table)
    out = []
    for r in rows:
        c, n, mode = r["context"], r["sessions"], r["mode"]
        alpha = acceptance(rows, c, n)
        warm = warm_state(cals[c], acceptance(rows, c, CALIB_N[1]), procs) if mode == "auto" and warm_auto else None
        runs = [simulate_point(sim_config(mode=mode, sessions=n, context=c, output=output, alpha=alpha, cal=cals[c],
                                          slots=slots, draft_procs=procs, tick_ms=tick, seed=s), n, table, warm)
                for s in range(seeds)]
        pred = {k: statistics.mean(x[k] for x in runs) for k in runs[0]}
        rec = {"context": c, "mode": mode, "sessions": n, "role": "calib" if n in CALIB_N else "predicted",
               "alpha_in": round(alpha, 3)}
        for k in GOALS:
            rec[f"{k}_meas"] = r[k]
            rec[f"{k}_sim"] = round(pred[k], 3)
            rec[f"{k}_err"] = round(pred[k] / r[k] - 1.0, 4) if r[k] else None
        rec["gamma_meas"], rec["gamma_sim"] = r.get("mean_gamma"), round(pred["mean_gamma"], 2)
        rec["busy_meas"], rec["batch_meas"] = r.get("busy"), r.get("target_batch")
        if mode != "target-only":
            cal = cals[c]
            rec["draft_ms_line"] = round(draft_at(cals[c], n, procs), 3)
            if r.get("round_draft_ms") and (r.get("mean_gamma") or 0) >= 1.0:  # mostly drafted rounds: the
                rec["draft_ms_meas"] = round(r["round_draft_ms"] / r["mean_gamma"], 3)  # mean is per drafted token
        out.append(rec)
        if progress is not None:
            progress(rec)
    return out, cals


def reason(rec: dict[str, Any]) -> str:
    """A likely cause of a large error, from what the row and the calibration show (explanation only: nothing
    here feeds the prediction)."""
    why = []
    line, meas = rec.get("draft_ms_line"), rec.get("draft_ms_meas")
    if line and meas and meas > 1.3 * line:
        what = "incl. catch-up after decode rounds" if rec["mode"] == "auto" else "the draft processes saturate " \
            "the shared CPU"
        why.append(f"drafting: {meas:.1f} ms/token measured vs {line:.1f} modelled ({what})")
    if rec["mode"] == "auto":
        g_m, g_s = rec.get("gamma_meas"), rec.get("gamma_sim")
        if g_m is not None and g_s is not None and abs(g_m - g_s) > 0.3:
            why.append(f"the controller chose differently (mean γ {g_m} measured, {g_s} simulated): the sim draws "
                       "one iid α for every session, the real sessions' acceptance spreads, and the controller's "
                       "warm start is modelled from the calibration, not from what the runs before it measured")
    if rec["context"] >= 2048 and rec["sessions"] >= 32 and not why:
        why.append("long prefills (N × 1984 tokens) in ticks mixed with decode rows: the table times uniform rows, "
                   "and a 256-token prefill row beside short ones is priced by interpolation over total tokens")
    return "; ".join(why)


# --------------------------------------------------------------------------- predicted capacity
DRAFT_KINDS = {
    # name: (draft devices for N sessions, ms per draft step (None: the table's draft grid), link)
    "target-only": (lambda n: min(8, n), 0.0, "local"),
    "laptop": (lambda n: n, "n1", "wifi"),  # one device per session at the N=1 CPU draft cost, over wifi
    "gpu2": (lambda n: 1, None, "local"),  # one second GPU drafting every session: the table's draft grid
}


def capacity_grid(rows: list[dict[str, Any]], setup: dict[str, Any], table, alphas=(0.6, 0.75, 0.9),
                  slos=(15.0, 30.0, 60.0), grid=(1, 8, 16, 32, 48, 64, 96, 128, 192, 256), seeds: int = 2,
                  progress=None, tick_rows: list[dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Predicted sessions per target at each TPOT p90 SLO: the largest N of ``grid`` whose simulated TPOT p90
    (mean of ``seeds`` runs) meets the SLO, for target-only and for auto with laptop-class and second-GPU drafts,
    at each α and context of the run (the calibration of ``predict``: N = 1 and N = 8 rows only)."""
    output = int(setup.get("max_new_tokens", 64))
    tick = float(setup.get("tick_ms", 2.0))
    slots = max(grid)
    out = []
    for c in sorted({r["context"] for r in rows}):
        cal = calibrate(rows, c, table, output, tick_rows)
        calibrate_opening(rows, cal, c, setup, table)
        for kind, (devices, step, link) in DRAFT_KINDS.items():
            for alpha in (alphas[:1] if kind == "target-only" else alphas):
                p90 = {}
                for n in grid:
                    cfg_step = cal["draft_ms_1"] if step == "n1" else step
                    runs = [simulate_point(sim_config(mode="target-only" if kind == "target-only" else "auto",
                                                      sessions=n, context=c, output=output, alpha=alpha, cal=cal,
                                                      slots=slots, draft_procs=devices(n), tick_ms=tick, seed=s,
                                                      draft_step_ms=cfg_step, link=link), n, table)
                            for s in range(seeds)]
                    p90[n] = statistics.mean(r["tpot_p90_ms"] for r in runs)
                    if progress is not None:
                        progress(c, kind, alpha, n, p90[n])
                rec = {"context": c, "kind": kind, "alpha": None if kind == "target-only" else alpha,
                       "tpot_p90_ms": {n: round(v, 2) for n, v in p90.items()}}
                for slo in slos:
                    ok = [n for n, v in p90.items() if v <= slo]
                    rec[f"sessions_at_{slo:g}ms"] = max(ok) if ok else 0
                out.append(rec)
    return out


def capacity_markdown(cap: list[dict[str, Any]], slos=(15.0, 30.0, 60.0)) -> str:
    lines = ["| context | drafts | α | " + " | ".join(f"sessions at TPOT p90 ≤ {s:g} ms" for s in slos) + " |",
             "|---|---|---|" + "---|" * len(slos)]
    for r in cap:
        a = "—" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(f"| {r['context']} | {r['kind']} | {a} | "
                     + " | ".join(str(r[f"sessions_at_{s:g}ms"]) for s in slos) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- predicted capacity map
@dataclass(frozen=True)
class DraftDevice:
    """A draft device class of the map. ``step_ms``: one draft step of a 1B draft at short context (None: the
    profile table's draft grid, one device drafting every session batched); otherwise one device per session."""
    name: str
    label: str
    step_ms: float | None
    source: str


DRAFT_DEVICES = (
    DraftDevice("gpu2", "second GPU", None,
                "the profile table's draft grid: the grown 1B, bf16, on an H200 (measured)"),
    DraftDevice("laptop", "laptop-class", 10.0,
                "100 tok/s: a 1B model at 4 bits with llama.cpp on Metal, base-to-Pro Apple M-series laptop"),
    DraftDevice("phone", "phone-class", 20.0,
                "50 tok/s: Llama 3.2 1B SpinQuant (4-bit) with ExecuTorch on a OnePlus 12 (Snapdragon 8 Gen 3)"),
)
MAP_RTTS_MS = (1.0, 10.0, 40.0)
MAP_CONTEXTS = (512, 2048, 8192)
MAP_SLOS_MS = (15.0, 30.0, 60.0)
MAP_GRID = (1, 8, 16, 24, 32, 48, 64, 96, 128)
MAP_SLOTS = 256  # the measured run's KV slots (its largest N), fewer where the KV cache does not fit
MAP_ALPHA = 0.75
MAP_SIDE_ALPHAS = (0.6, 0.9)  # at the middle RTT only
TRUSTED_N = 64  # the out-of-sample check holds up to here; past it the simulator is optimistic
DRAFT_WEIGHT_BYTES = 1.0e9  # Llama-3.2-1B at 4 bits (8-bit embedding)
DRAFT_KV_BYTES = 16 * 8 * 64 * 2 * 2  # per token: 16 layers x 8 KV heads x 64 dims x (K, V) x fp16
TARGET_KV_BYTES = 32 * 8 * 128 * 2 * 2  # Llama-3.1-8B, bf16
TARGET_KV_BUDGET_BYTES = (139 - 16 - 8) * 2**30  # H200 HBM less the bf16 weights and 8 GiB of workspace


def device_step_ms(dev: DraftDevice, context: int) -> float | None:
    """A one-session device's draft step at ``context``: the published short-context figure scaled by the bytes a
    step reads (weights + the draft's KV cache): decoding on these devices is bandwidth-bound."""
    if dev.step_ms is None:
        return None
    return dev.step_ms * (DRAFT_WEIGHT_BYTES + context * DRAFT_KV_BYTES) / DRAFT_WEIGHT_BYTES


def kv_session_cap(context: int) -> int:
    """Sessions whose KV cache fits next to the 8B target on one H200 at ``context``."""
    return int(TARGET_KV_BUDGET_BYTES // (context * TARGET_KV_BYTES))


def rtt_link(rtt_ms: float) -> dict[str, float]:
    """A link of round trip ``rtt_ms``: half each way, lognormal with a quarter of that as jitter."""
    return {"latency_ms": rtt_ms / 2, "jitter_ms": rtt_ms / 8, "bandwidth_mbps": 1000.0, "availability": 1.0}


def _map_point(*, kind: str, n: int, context: int, rtt_ms: float | None, alpha: float, cal: dict[str, float],
               output: int, tick: float, slots: int, seeds: int, table) -> float:
    """Mean TPOT p90 (ms) over ``seeds`` runs of one map point."""
    dev = next((d for d in DRAFT_DEVICES if d.name == kind), None)
    link = "local" if rtt_ms is None else f"rtt{rtt_ms:g}"
    p90 = []
    for s in range(seeds):
        cfg = sim_config(mode="target-only" if dev is None else "auto", sessions=n, context=context, output=output,
                         alpha=alpha, cal=cal, slots=slots, tick_ms=tick, seed=s, link=link,
                         draft_procs=min(8, n) if dev is None else (1 if dev.step_ms is None else n),
                         draft_step_ms=0.0 if dev is None else device_step_ms(dev, context))
        if rtt_ms is not None:
            cfg["links"][link] = rtt_link(rtt_ms)
        p90.append(simulate_point(cfg, n, table)["tpot_p90_ms"])
    return statistics.mean(p90)


def capacity_map(rows: list[dict[str, Any]], setup: dict[str, Any], table, *, contexts=MAP_CONTEXTS,
                 rtts=MAP_RTTS_MS, slos=MAP_SLOS_MS, grid=MAP_GRID, alpha: float = MAP_ALPHA,
                 side_alphas=MAP_SIDE_ALPHAS, plan_context: int = 2048, plan_slo_ms: float = 30.0,
                 fleets=(1000, 10000), seeds: int = 2, progress=None,
                 tick_rows: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Predicted sessions per target for every (context, draft device, RTT) at ``alpha`` (and ``side_alphas`` at the
    middle RTT): the largest N of ``grid`` (up to the KV cap) whose TPOT p90 meets each SLO, scanning N upwards until
    the loosest SLO is missed. A context the run did not measure takes the calibration of the nearest measured one
    and the table's linear extrapolation in context. Then the targets for each fleet of laptops at ``plan_slo_ms``:
    the exact sessions per target (bisected between grid points) and ceil(fleet / sessions)."""
    output = int(setup.get("max_new_tokens", 64))
    tick = float(setup.get("tick_ms", 2.0))
    measured = sorted({r["context"] for r in rows})
    cals: dict[int, dict[str, float]] = {}
    for c in measured:
        cals[c] = calibrate(rows, c, table, output, tick_rows)
        calibrate_opening(rows, cals[c], c, setup, table)
    series = [("target-only", None, alpha)]
    series += [(d.name, r, alpha) for d in DRAFT_DEVICES for r in rtts]
    series += [(d.name, rtts[len(rtts) // 2], a) for d in DRAFT_DEVICES for a in side_alphas]
    out: dict[str, Any] = {"contexts": {}, "rows": [], "plan": [], "alpha": alpha, "slos_ms": list(slos),
                           "rtts_ms": list(rtts), "grid": list(grid), "seeds": seeds,
                           "devices": [vars(d) for d in DRAFT_DEVICES]}
    for c in contexts:
        near = min(measured, key=lambda m: abs(m - c))
        cal, cap = cals[near], kv_session_cap(c)
        pts = [n for n in grid if n <= cap]
        slots = min(MAP_SLOTS, cap)
        out["contexts"][str(c)] = {"calibrated_at": near, "measured": c in measured, "kv_cap": cap}
        for kind, rtt, a in series:
            p90: dict[int, float] = {}
            for n in pts:
                p90[n] = _map_point(kind=kind, n=n, context=c, rtt_ms=rtt, alpha=a, cal=cal, output=output,
                                    tick=tick, slots=slots, seeds=seeds, table=table)
                if progress is not None:
                    progress(c, kind, rtt, a, n, p90[n])
                if p90[n] > max(slos):
                    break
            rec = {"context": c, "kind": kind, "rtt_ms": rtt, "alpha": a, "extrapolated": c not in measured,
                   "tpot_p90_ms": {n: round(v, 2) for n, v in p90.items()}}
            for slo in slos:
                ok = [n for n, v in p90.items() if v <= slo]
                rec[f"sessions_at_{slo:g}ms"] = max(ok) if ok else 0
            if a == alpha:  # the exact N at plan_slo_ms: bisect (hit, miss) between grid points
                hit = max([n for n, v in p90.items() if v <= plan_slo_ms], default=0)
                miss = min([n for n in p90 if n > hit], default=hit)
                while miss - hit > 1:
                    mid = (hit + miss) // 2
                    v = _map_point(kind=kind, n=mid, context=c, rtt_ms=rtt, alpha=a, cal=cal, output=output,
                                   tick=tick, slots=slots, seeds=seeds, table=table)
                    hit, miss = (mid, miss) if v <= plan_slo_ms else (hit, mid)
                rec["sessions_exact"], rec["exact_slo_ms"] = hit, plan_slo_ms
            out["rows"].append(rec)
    for kind, rtt, a in series:
        if a != alpha or kind not in ("target-only", "laptop") or plan_context not in contexts:
            continue
        rec = next(r for r in out["rows"] if (r["context"], r["kind"], r["rtt_ms"], r["alpha"])
                   == (plan_context, kind, rtt, a))
        hit = rec["sessions_exact"]
        out["plan"].append({"kind": kind, "rtt_ms": rtt, "context": plan_context, "alpha": a, "slo_ms": plan_slo_ms,
                            "sessions_per_target": hit,
                            "targets": {str(f): (math.ceil(f / hit) if hit else None) for f in fleets}})
    return out


def _cell(rec: dict[str, Any], slos) -> str:
    vals = []
    for s in slos:
        n = rec[f"sessions_at_{s:g}ms"]
        vals.append(f"{n}*" if n > TRUSTED_N else str(n))
    return " / ".join(vals) + ("†" if rec["extrapolated"] else "")


def capacity_map_markdown(m: dict[str, Any]) -> str:
    """The map's tables: sessions per target (``a / b / c`` = TPOT p90 ≤ each SLO) by context, drafts and RTT; the
    side α at the middle RTT; the fleet plan."""
    slos, rtts, alpha = m["slos_ms"], m["rtts_ms"], m["alpha"]
    rows = m["rows"]
    slo_txt = " / ".join(f"{s:g}" for s in slos)
    lines = [f"Sessions per H200 at TPOT p90 ≤ {slo_txt} ms, α = {alpha:g}; TPOT p90 at one session in brackets.",
             "", "| context | drafts | " + " | ".join(f"RTT {r:g} ms" for r in rtts) + " |",
             "|---|---|" + "---|" * len(rtts)]

    def one(r: dict[str, Any]) -> str:
        first = r["tpot_p90_ms"].get(1)
        return _cell(r, slos) + (f" ({first:.1f} ms)" if first is not None else "")

    for c in sorted({r["context"] for r in rows}):
        base = next(r for r in rows if r["context"] == c and r["kind"] == "target-only")
        lines.append(f"| {c} | target-only (decode mode, RTT-independent) | " + " | ".join(one(base) for _ in rtts)
                     + " |")
        for d in m["devices"]:
            cells = [next(r for r in rows if (r["context"], r["kind"], r["rtt_ms"], r["alpha"])
                          == (c, d["name"], t, alpha)) for t in rtts]
            lines.append(f"| {c} | auto, {d['label']} | " + " | ".join(one(x) for x in cells) + " |")
    exact = [r for r in rows if r.get("exact_slo_ms") is not None]
    if exact:
        lines += ["", (f"Sessions per H200 at TPOT p90 ≤ {exact[0]['exact_slo_ms']:g} ms, α = {alpha:g}, to the "
                       "session (bisected between the points above; the plot):"), "",
                  "| context | drafts | " + " | ".join(f"RTT {r:g} ms" for r in rtts) + " |",
                  "|---|---|" + "---|" * len(rtts)]
        for c in sorted({r["context"] for r in exact}):
            base = next(r for r in exact if r["context"] == c and r["kind"] == "target-only")
            lines.append(f"| {c} | target-only | " + " | ".join(str(base["sessions_exact"]) for _ in rtts) + " |")
            for d in m["devices"]:
                cells = [next(r for r in exact if (r["context"], r["kind"], r["rtt_ms"]) == (c, d["name"], t))
                         for t in rtts]
                lines.append(f"| {c} | auto, {d['label']} | " + " | ".join(str(x["sessions_exact"]) for x in cells)
                             + " |")
    side = [r for r in rows if r["alpha"] != alpha]
    if side:
        mid = side[0]["rtt_ms"]
        alphas = sorted({r["alpha"] for r in side} | {alpha})
        lines += ["", f"Other acceptance at RTT {mid:g} ms (sessions at TPOT p90 ≤ {slo_txt} ms):", "",
                  "| context | drafts | " + " | ".join(f"α = {a:g}" for a in alphas) + " |",
                  "|---|---|" + "---|" * len(alphas)]
        for c in sorted({r["context"] for r in rows}):
            for d in m["devices"]:
                cells = [next(r for r in rows if (r["context"], r["kind"], r["rtt_ms"], r["alpha"])
                              == (c, d["name"], mid, a)) for a in alphas]
                lines.append(f"| {c} | auto, {d['label']} | " + " | ".join(_cell(x, slos) for x in cells) + " |")
    if m["plan"]:
        p0 = m["plan"][0]
        fleets = list(p0["targets"])
        lines += ["", (f"H200 targets for a fleet of laptops at TPOT p90 ≤ {p0['slo_ms']:g} ms (context "
                       f"{p0['context']}, α = {p0['alpha']:g}): ceil(sessions / sessions per target):"), "",
                  "| serving | RTT | sessions per target | " + " | ".join(f"{int(f):,} laptops" for f in fleets) + " |",
                  "|---|---|---|" + "---|" * len(fleets)]
        for p in m["plan"]:
            what = ("target-only (laptops are clients)" if p["kind"] == "target-only"
                    else "distributed, auto, laptop drafts")
            rtt = "any" if p["rtt_ms"] is None else f"{p['rtt_ms']:g} ms"
            lines.append(f"| {what} | {rtt} | {p['sessions_per_target']} | "
                         + " | ".join("—" if v is None else f"{v:,}" for v in p["targets"].values()) + " |")
    lines += ["", (f"\\* more than {TRUSTED_N} sessions per target: the simulator is optimistic there. "
                   "† context 8192: the table is measured there for batches up to 64 only, extrapolated past them; "
                   "drafting and path calibrated at 2048.")]
    return "\n".join(lines) + "\n"


def capacity_map_plot(m: dict[str, Any], path: str | Path, slo_ms: float = 30.0) -> None:
    """Sessions per H200 at ``slo_ms`` against RTT, one panel per context, one line per draft device and
    target-only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, rtts, alpha = m["rows"], m["rtts_ms"], m["alpha"]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts), 3.8), squeeze=False)
    styles = {"target-only": ("black", "--", "s", 1.0, "target-only"),
              "gpu2": ("tab:blue", "-", "o", 0.94, "second GPU"),
              "laptop": ("tab:green", "-", "^", 1.0, "laptop-class"),
              "phone": ("tab:orange", "-", "v", 1.06, "phone-class")}

    def sessions(r: dict[str, Any]) -> int:
        return r["sessions_exact"] if r.get("exact_slo_ms") == slo_ms else r[f"sessions_at_{slo_ms:g}ms"]

    for ax, c in zip(axes[0], contexts):
        top = 0
        for kind, (color, ls, marker, shift, label) in styles.items():
            if kind == "target-only":
                r = next(x for x in rows if x["context"] == c and x["kind"] == kind)
                ys = [sessions(r)] * len(rtts)
            else:
                ys = [sessions(next(x for x in rows if (x["context"], x["kind"], x["rtt_ms"], x["alpha"])
                                    == (c, kind, t, alpha))) for t in rtts]
            ax.plot([t * shift for t in rtts], ys, ls, color=color, marker=marker, label=label)  # shift: no overlap
            top = max(top, *ys)
        ax.set_ylim(0, top * 1.3 + 1)
        if TRUSTED_N < top * 1.3:
            ax.axhline(TRUSTED_N, color="grey", lw=0.6, ls=":")
        ax.set_ylabel(f"sessions per H200 at TPOT p90 ≤ {slo_ms:g} ms")
        ext = any(x["extrapolated"] for x in rows if x["context"] == c)
        ax.set_title(f"context {c}" + (" (extrapolated)" if ext else ""))
        ax.set_xscale("log")
        ax.set_xticks(rtts)
        ax.set_xticklabels([f"{t:g}" for t in rtts])
        ax.set_xlabel("draft link RTT (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"PREDICTED by the simulator (not measured): 8B-class target on one H200, α = {alpha:g}; "
                 f"dotted: {TRUSTED_N} sessions, above it the simulator is optimistic", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:+.1f}%"


def markdown(results: list[dict[str, Any]], cals: dict[int, dict[str, float]], setup: dict[str, Any],
             rows_path: str, table_path: str, command: str, tick_rows_path: str | None = None,
             draft_table_path: str | None = None) -> str:
    pred = [r for r in results if r["role"] == "predicted"]
    lines = ["# Simulator vs GPU: out-of-sample predictions of the H200 capacity run", "",
             f"Command: `{command}`  ", f"Measured rows: `{rows_path}` (machine: {setup.get('device_name', '?')} "
             f"target, drafts on {setup.get('draft_device_name', setup.get('draft_device', '?'))}; run command "
             f"`{setup.get('command', '?')}`)  ",
             f"Cost table: `{table_path}`  ",
             f"Simulated on: {platform.machine()} {platform.python_implementation()} {platform.python_version()} "
             "(virtual time; the host does not matter)", "",
             "Calibration (per context, from the N = 1 and N = 8 rows only; see `benchmarks/sim_vs_gpu.py`):", "",
             ("| context | draft ms/token N=1 | draft ms/token N=8 | path ms/round | host ms/tick (1 row) | "
              "host ms/row | session start ms N=1 | N=8 | forward / table |"), "|---|---|---|---|---|---|---|---|---|"]
    for c, cal in cals.items():
        row_src = (f" (tick ctx {cal['tick_rows_context']:g})" if "tick_rows_context" in cal else "")
        lines.append(f"| {c} | {cal['draft_ms_1']:.2f} | {cal['draft_ms_8']:.2f} | {cal['path_ms']:.2f} | "
                     f"{cal.get('host_one_row_ms', cal['tick_overhead_ms']):.2f} | "
                     f"{cal.get('tick_row_overhead_ms', 0.0):.4f}{row_src} | {cal.get('open_ms_1', 0):.1f} | "
                     f"{cal.get('open_ms_8', 0):.1f} | {cal.get('cost_scale', 1.0):.3f} |")
    if tick_rows_path:
        lines += ["", (f"Host ms/row: slope b of the least-squares line host_ms = a + b × batch through "
                       f"`{tick_rows_path}` (`specmq bench tick`, a separate measurement: every γ at its context "
                       "nearest the simulated one). A tick of R rows costs forward + (host ms/tick − b) + R × b: the "
                       "one-row tick keeps its N = 1 value.")]
    else:
        lines += ["", "Host ms/row: none (`--tick-rows none`): every tick costs forward + host ms/tick."]
    if draft_table_path:
        ratios = {c: cal["draft_scale"] for c, cal in cals.items() if cal.get("draft_scale")}
        shown = "; ".join(f"context {c}: " + ", ".join(f"{b}: {r:.2f}" for b, r in sorted(sc.items()))
                          for c, sc in ratios.items())
        lines += ["", (f"Draft step by batch: `{draft_table_path}` (`specmq profile` of the draft on a CPU, a separate "
                       "measurement), as its step cost at each batch over batch 1 "
                       f"({shown}). A process drafting b sessions at N pays the batch-1 step of min(procs, N) "
                       "processes sharing the host (the N = 1 point to the N = 8 point, linear in processes) × the "
                       "ratio at b.")]
    else:
        lines += ["", "Draft step by batch: no draft profile (`--draft-table`): the N = 1 / N = 8 line in N."]
    lines += ["", "Errors are sim / measured − 1. Rows marked calib were used for calibration (N = 1, 8); "
              "all others are predictions.", "",
              "| ctx | mode | N | role | α in | tok/s meas | sim | err | TPOT p50 meas | sim | err | "
              "TPOT p90 meas | sim | err | γ meas | γ sim |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['context']} | {r['mode']} | {r['sessions']} | {r['role']} | {r['alpha_in']} | "
                     f"{r['tok_s_meas']:.0f} | {r['tok_s_sim']:.0f} | {_pct(r['tok_s_err'])} | "
                     f"{r['tpot_p50_ms_meas']:.2f} | {r['tpot_p50_ms_sim']:.2f} | {_pct(r['tpot_p50_ms_err'])} | "
                     f"{r['tpot_p90_ms_meas']:.2f} | {r['tpot_p90_ms_sim']:.2f} | {_pct(r['tpot_p90_ms_err'])} | "
                     f"{r['gamma_meas'] if r['gamma_meas'] is not None else '—'} | {r['gamma_sim']} |")
    s = summary(results)
    lines += ["", "## Summary over predicted points", "",
              "| metric | goal | within goal | median abs error | worst |", "|---|---|---|---|---|"]
    for k, goal in GOALS.items():
        st = s[k]
        lines.append(f"| {k} | ±{goal * 100:.0f}% | {st['within']}/{st['points']} | {st['median_abs'] * 100:.1f}% | "
                     f"{_pct(st['worst'])} |")
    worst = sorted(pred, key=lambda r: -max(abs(r[f'{k}_err'] or 0) / g for k, g in GOALS.items()))[:8]
    lines += ["", "## Worst predicted points", "", "| ctx | mode | N | tok/s err | p50 err | p90 err | likely reason |",
              "|---|---|---|---|---|---|---|"]
    for r in worst:
        lines.append(f"| {r['context']} | {r['mode']} | {r['sessions']} | {_pct(r['tok_s_err'])} | "
                     f"{_pct(r['tpot_p50_ms_err'])} | {_pct(r['tpot_p90_ms_err'])} | {reason(r)} |")
    return "\n".join(lines) + "\n"


def summary(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pred = [r for r in results if r["role"] == "predicted"]
    out = {}
    for k, goal in GOALS.items():
        errs = [r[f"{k}_err"] for r in pred if r[f"{k}_err"] is not None]
        out[k] = {"points": len(errs), "within": sum(abs(e) <= goal for e in errs),
                  "median_abs": statistics.median(abs(e) for e in errs) if errs else math.nan,
                  "worst": max(errs, key=abs) if errs else None, "goal": goal}
    return out


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default="benchmarks/results/capacity_h200.jsonl",
                   help="a 'specmq bench capacity' rows file (JSON lines with a setup row)")
    p.add_argument("--table", default=None, help="profile table (default: the setup row's cost_table)")
    p.add_argument("--seeds", type=int, default=3, help="simulated runs per point (mean)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--capacity", action="store_true",
                   help="instead: predicted sessions per target at TPOT p90 SLOs 15/30/60 ms for α 0.6/0.75/0.9, "
                        "target-only vs auto with laptop-class and second-GPU drafts (same calibration)")
    p.add_argument("--map", action="store_true",
                   help="instead: the predicted capacity map: sessions per target at TPOT p90 SLOs 15/30/60 ms for "
                        "contexts 512/2048/8192, draft devices second GPU / laptop / phone (1B) at RTT 1/10/40 ms, "
                        "target-only, and the targets for 1,000 and 10,000 laptops")
    p.add_argument("--plot", type=Path, default=None, help="--map: write the PNG (sessions at 30 ms vs RTT) here")
    p.add_argument("--draft-table", default=None, metavar="FILE",
                   help="a 'specmq profile' table of the CPU draft (e.g. configs/profiles/cpu-tiny-draft.yaml): a "
                        "draft step's cost by batch over batch 1 scales the calibrated step (default, or 'none': the "
                        "N=1/N=8 line)")
    p.add_argument("--cold-auto", action="store_true",
                   help="start each auto point's controller knowing nothing (default: warmed as the run's order left "
                        "it: fixed-γ modes ran before auto on the same target)")
    p.add_argument("--tick-rows", default=None, metavar="FILE",
                   help=f"a 'specmq bench tick' file: host ms per tick row = the slope of host_ms over batch "
                        f"(default: {TICK_ROWS} when present; 'none': no per-row host time)")


def optional_file(arg: str | None, flag: str, what: str, default: str | None = None) -> str | None:
    """A file flag that may be left out: unset means ``default`` when it exists here, ``none`` means no file;
    a path is taken as given or relative to the repository. A path that does not exist is a one-line error."""
    if arg is None:
        return default if default is not None and (ROOT / default).exists() else None
    if arg.strip().lower() == "none":
        return None
    if Path(arg).exists():
        return arg
    if (ROOT / arg).exists():
        return str(ROOT / arg)
    raise BenchmarkError(f"{what} {arg} not found (pass {flag} none to go without)")


def _tick_rows_info(path: str | None, cals: dict[int, dict[str, float]] | None = None) -> dict[str, Any]:
    """What the JSON output says about the per-row host time: the file, the fit, and b per context."""
    info: dict[str, Any] = {"file": path, "fit": None if path is None else
                            "least squares host_ms = a + b x batch, every gamma, the file's context nearest the "
                            "simulated one; tick_row_overhead_ms = b, tick_overhead_ms = N=1 host time - b"}
    if cals is not None:
        info["per_context"] = {str(c): {k: cal[k] for k in ("tick_row_overhead_ms", "tick_rows_a_ms",
                                                            "tick_rows_context", "tick_rows_points") if k in cal}
                               for c, cal in cals.items()}
    return info


def run(args: argparse.Namespace) -> int:
    from workers.cost_table import CostTableError, load_table

    if args.seeds < 1:
        raise BenchmarkError(f"--seeds must be >= 1, got {args.seeds}")
    if args.plot and not args.map:
        raise BenchmarkError("--plot draws the capacity map: pass --map with it")
    setup, rows = read_rows(args.rows)
    table_path = args.table or setup.get("cost_table")
    if not table_path:
        raise BenchmarkError("no cost table: pass --table (the rows' setup names none)")
    if not Path(table_path).exists() and (ROOT / table_path).exists():
        table_path = str(ROOT / table_path)
    try:
        table = load_table(table_path)
    except CostTableError as exc:
        raise BenchmarkError(str(exc)) from None
    ticks_path = optional_file(args.tick_rows, "--tick-rows", "tick rows file", TICK_ROWS)
    ticks = None
    if ticks_path is not None:
        ticks = read_tick_rows(ticks_path if Path(ticks_path).exists() else ROOT / ticks_path)
    if args.map:
        m = capacity_map(rows, setup, table, seeds=args.seeds, tick_rows=ticks, progress=None if args.json else
                         lambda c, k, r, a, n, v: print(f"sim_vs_gpu: map ctx {c} {k} RTT {r} α={a} N={n} "
                                                        f"TPOT p90 {v:.1f} ms", file=sys.stderr))
        m["tick_rows"] = _tick_rows_info(ticks_path)
        text = capacity_map_markdown(m)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        if args.plot:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            capacity_map_plot(m, args.plot)
        if args.json:
            print_json({"map": m, "synthetic_table": bool(getattr(table, "synthetic", False))})
        else:
            print(text, end="")
        return 0
    if args.capacity:
        cap = capacity_grid(rows, setup, table, seeds=args.seeds, tick_rows=ticks, progress=None if args.json else
                            lambda c, k, a, n, v: print(f"sim_vs_gpu: capacity ctx {c} {k} α={a} N={n} "
                                                        f"TPOT p90 {v:.1f} ms", file=sys.stderr))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(capacity_markdown(cap))
        if args.json:
            print_json({"capacity": cap, "tick_rows": _tick_rows_info(ticks_path),
                        "synthetic_table": bool(getattr(table, "synthetic", False))})
        else:
            print(capacity_markdown(cap), end="")
        return 0
    draft_path = optional_file(args.draft_table, "--draft-table", "draft table")
    draft_table = None
    if draft_path is not None:
        try:
            draft_table = load_table(draft_path if Path(draft_path).exists() else ROOT / draft_path)
        except CostTableError as exc:
            raise BenchmarkError(str(exc)) from None
    results, cals = predict(rows, setup, table, args.seeds, tick_rows=ticks, draft_table=draft_table,
                            warm_auto=not args.cold_auto,
                            progress=None if args.json else lambda r: print(
                                f"sim_vs_gpu: ctx {r['context']} {r['mode']:<11} N={r['sessions']:<4} tok/s "
                                f"{_pct(r['tok_s_err'])} p50 {_pct(r['tpot_p50_ms_err'])} "
                                f"p90 {_pct(r['tpot_p90_ms_err'])}", file=sys.stderr))
    command = "specmq bench sim_vs_gpu " + " ".join(sys.argv[sys.argv.index("sim_vs_gpu") + 1:]) \
        if "sim_vs_gpu" in sys.argv else "specmq bench sim_vs_gpu"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(results, cals, setup, str(args.rows), str(table_path), command, ticks_path,
                                     draft_path))
    s = summary(results)
    if args.json:
        print_json({"calibration": {str(c): v for c, v in cals.items()}, "points": results, "summary": s,
                    "tick_rows": _tick_rows_info(ticks_path, cals), "draft_table": draft_path,
                    "synthetic_table": bool(getattr(table, "synthetic", False))})
    else:
        for k, st in s.items():
            print(f"{k}: {st['within']}/{st['points']} predicted points within ±{st['goal'] * 100:.0f}%, "
                  f"median |error| {st['median_abs'] * 100:.1f}%, worst {_pct(st['worst'])}")
        if args.out:
            print(f"table: {args.out}")
    return 0

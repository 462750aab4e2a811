"""``specmq bench capacity``: the whole pipeline on the CPU (every mode through one broker and target, lossless in
float32), the report mode, and the summary's capacity and goal arithmetic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.capacity import capacity_at, make_row, merge_rounds, summarise

ROOT = Path(__file__).resolve().parents[1]


def _row(mode: str, n: int, tok_s: float, p50: float, p90: float, context: int = 512, errors: int = 0) -> dict:
    return {"context": context, "mode": mode, "temperature": 0.0, "sessions": n, "tok_s": tok_s,
            "tpot_p50_ms": p50, "tpot_p90_ms": p90, "errors": errors, "lossless": 1.0}


def test_summary_counts_sessions_within_each_slo_and_checks_auto_against_the_best_rival():
    rows = [_row("target-only", 8, 100.0, 10.0, 12.0), _row("target-only", 32, 300.0, 20.0, 40.0),
            _row("g4", 8, 120.0, 8.0, 9.0), _row("g4", 32, 250.0, 25.0, 29.0),
            _row("auto", 8, 118.0, 8.2, 9.5), _row("auto", 32, 200.0, 30.0, 31.0, errors=1)]
    assert capacity_at(rows, 512, "target-only", 30.0) == 8
    assert capacity_at(rows, 512, "g4", 30.0) == 32
    assert capacity_at(rows, 512, "auto", 60.0) == 8  # a point with errors never counts
    s = summarise(rows, [15.0, 30.0])
    points = {p["sessions"]: p for p in s["goals"]["auto_never_loses"]["points"]}
    assert points[8]["best_rival"] == "g4" and points[8]["met"]  # 118/120 >= 0.95, TPOT 8.2/8.0 <= 1.05
    assert points[32]["best_rival"] == "target-only" and not points[32]["met"]
    assert s["goals"]["auto_never_loses"]["met"] is False


def test_row_reports_each_round_part_and_the_path_median_over_every_process():
    one = {"draft_ms": 10.0, "network_ms": 20.0, "verify_ms": 30.0, "queue_ms": 8.0, "draft_wait_ms": 4.0,
           "path_ms": 6.0, "busy_wait_ms": 14.0, "batch": 4.0, "n": 2, "path_ms_rounds": [1.0, 5.0]}
    two = dict(one, path_ms=9.0, path_ms_rounds=[2.0, 3.0, 4.0], n=3, batch=21.0)
    rounds = merge_rounds([one, two])
    assert rounds["n"] == 5 and rounds["path_ms"] == 15.0 and sorted(rounds["path_ms_rounds"]) == [1, 2, 3, 4, 5]
    counters = {"ticks": 0.0, "rows": 0.0, "busy_ms": 0.0, "rounds": 0.0}
    results = [{"new_tokens": 4, "tpot_ms": 2.0, "ttft_s": 0.1}]
    row = make_row(96, "g2", 0.0, results, 1.0, counters, counters, rounds)
    assert row["round_path_ms"] == 3.0 and row["round_busy_wait_ms"] == 5.6 and row["round_draft_wait_ms"] == 1.6
    assert row["round_network_ms"] == 8.0 and row["round_queue_ms"] == 3.2  # the old parts keep their meaning
    assert row["round_path_p50_ms"] == 3.0  # the median round, not the mean of sums
    assert row["round_batch"] == 5.0  # sessions in a round's draft step, over every process's rounds
    assert "round_path_p50_ms" not in make_row(96, "g2", 0.0, results, 1.0, counters, counters, None)
    assert "gamma_trace" not in row  # the results carry no per-round γ
    traced = make_row(96, "auto", 0.0, [dict(results[0], gammas=[4, 0, 0, 2])], 1.0, counters, counters, rounds)
    assert traced["gamma_trace"] == [4, 0, 0, 2]  # a lone session's choices, round by round
    two = [dict(results[0], gammas=[2]), dict(results[0], gammas=[0])]
    assert "gamma_trace" not in make_row(96, "auto", 0.0, two, 1.0, counters, counters, rounds)


@pytest.mark.slow
def test_cpu_run_every_mode_is_lossless_and_the_report_renders(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "specmq.cli", "bench", "capacity", "--device", "cpu", "--sessions",
                          "1,2", "--contexts", "64", "--max-new-tokens", "6", "--modes", "target-only,g2,auto,fused",
                          "--sampled-sessions", "0", "--draft-procs", "1", "--json", "--out", str(out),
                          "--logdir", str(tmp_path / "logs")], capture_output=True, text=True, timeout=600, env=env,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    points = [r for r in rows if "mode" in r]
    assert {(r["mode"], r["sessions"]) for r in points} == {(m, n) for m in ("target-only", "g2", "auto", "fused")
                                                            for n in (1, 2)}
    assert all(r["lossless"] == 1.0 and r["errors"] == 0 and r["tokens"] == 6 * r["sessions"] for r in points)
    assert all(r["mean_gamma"] == 0.0 for r in points if r["mode"] == "target-only")  # decode mode throughout
    for r in points:  # a lone session's γ per round, whose mean is the row's mean γ
        if r["sessions"] == 1 and r["mode"] in ("g2", "auto"):
            assert r["gamma_trace"] and r["mean_gamma"] == pytest.approx(sum(r["gamma_trace"]) / len(r["gamma_trace"]),
                                                                          abs=0.01)
    for r in points:
        if r["mode"] in ("g2", "auto") and r.get("round_path_ms") is not None:  # the round split and its median
            assert r["round_path_p50_ms"] >= 0 and r["round_busy_wait_ms"] <= r["round_queue_ms"] + 1e-6
    assert "summary" in rows[-1]
    png = tmp_path / "plot.png"
    rep = subprocess.run([sys.executable, "-m", "specmq.cli", "bench", "capacity", "--report", str(out), "--plot",
                          str(png)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert rep.returncode == 0, rep.stderr
    assert "Most sessions with TPOT p90 within the SLO" in rep.stdout and png.stat().st_size > 1000
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    rep = subprocess.run([sys.executable, "-m", "specmq.cli", "bench", "capacity", "--report", str(bad)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert rep.returncode == 1 and "line 1 is not JSON" in rep.stderr

"""``specmq bench gpu_e2e`` on a CPU: the whole pipeline (target-only batched and single, broker + static-shape
CUDA-engine target worker without graphs + draft processes) with tiny settings, float32, so greedy is exact."""
from __future__ import annotations

import json

import pytest

from tests.test_draft_worker import run_cli

pytestmark = pytest.mark.slow  # a benchmark run end to end in real processes


def test_gpu_e2e_on_cpu():
    res = run_cli("bench", "gpu_e2e", "--device", "cpu", "--sessions", "4", "--gammas", "3", "--max-new-tokens", "8",
                  "--draft-procs", "2", "--single-prompts", "2", "--json", timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    objs = [json.loads(line) for line in lines]  # one JSON object per line, nothing else on stdout
    assert all(isinstance(o, dict) for o in objs)
    setup, rows, summary = objs[0]["setup"], objs[1:-1], objs[-1]["summary"]
    assert setup["device"] == "cpu" and setup["dtype"] == "float32" and setup["torch"]
    by = {(r["arch"], r["mode"]): r for r in rows}
    assert set(by) == {("target-only", "batched"), ("target-only", "single"), ("distributed", "2 procs")}
    batched, single, dist = by["target-only", "batched"], by["target-only", "single"], by["distributed", "2 procs"]
    for r in rows:
        assert r["tokens"] > 0 and r["tok_s_aggregate"] > 0 and r["errors"] == 0
    assert batched["sessions"] == 4 and batched["target_batch"] > 1 and batched["lossless_single"] == 1.0
    assert single["sessions"] == 1
    assert dist["gamma"] == 3 and dist["sessions"] == 4 and dist["tokens"] == batched["tokens"]
    assert dist["target_batch"] is not None and dist["target_batch"] > 1
    assert 0 <= dist["acceptance"] <= 1 and dist["mean_accepted"] is not None
    assert dist["lossless"] == 1.0 and dist["lossless_single"] == 1.0  # float32: token for token
    assert dist["speedup_batched"] > 0 and dist["speedup_single"] > 0
    assert summary["distributed_lossless"] == 1.0 and summary["distributed_best_gamma"] == 3
    assert "gpu_e2e:" in res.stderr  # progress on stderr


def test_gpu_e2e_fused_row_and_round_breakdown_on_cpu():
    """``--fused`` starts ``specmq fused --backend cuda`` (the static-shape engine for both models) and reports its
    row; the distributed row splits a round into draft / network / verify / queue time."""
    res = run_cli("bench", "gpu_e2e", "--device", "cpu", "--sessions", "2", "--gammas", "2", "--max-new-tokens", "6",
                  "--draft-procs", "1", "--single-prompts", "1", "--warmup-runs", "0", "--fused", "--json",
                  timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines()][1:-1]
    by = {r["arch"]: r for r in rows}
    fused, dist = by["fused"], by["distributed"]
    assert fused["tokens"] == dist["tokens"] > 0 and fused["errors"] == 0 and fused["lossless"] == 1.0
    assert fused["target_batch"] is not None and fused["target_batch"] >= 1
    parts = ("round_draft_ms", "round_network_ms", "round_verify_ms", "round_queue_ms")
    assert all(dist[p] >= 0 for p in parts) and dist["round_draft_ms"] > 0 and dist["round_verify_ms"] > 0
    assert dist["round_batch"] >= 1

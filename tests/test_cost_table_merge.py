"""``specmq profile --merge``: profile runs of one pair become one table over the union of their axes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workers.cost_table import CostTableError, load_table, merge_tables, write_table

ROOT = Path(__file__).resolve().parents[1]


def table(path: Path, batches: list[int], tokens: list[int], contexts: list[int], ms, model: str = "m") -> Path:
    write_table(path, model=model, device="cuda", dtype="bfloat16", hardware="H", draft_model="d",
                target_axes={"batch": batches, "tokens": tokens, "context": contexts},
                target_latency_ms=[[[ms(b, t, c) for c in contexts] for t in tokens] for b in batches],
                draft_axes={"batch": batches, "context": contexts},
                draft_latency_ms=[[ms(b, 1, c) / 4 for c in contexts] for b in batches], note="run")
    return path


def linear(b: float, t: float, c: float) -> float:
    return 1.0 + 0.01 * b + 0.02 * t + 0.001 * c


def test_merge_takes_each_batch_from_its_latest_run_and_counts_extrapolated_points(tmp_path):
    a = table(tmp_path / "a.yaml", [8, 32], [8, 32, 96], [512, 2048], linear)
    b = table(tmp_path / "b.yaml", [1, 32, 64], [1, 32, 64], [512, 8192], lambda *x: 2 * linear(*x))
    merged, inside, outside = merge_tables([a, b], tmp_path / "m.yaml")
    assert merged.target.axes["batch"] == [1, 8, 32, 64]
    assert merged.target.axes["context"] == [512, 2048, 8192]
    assert merged.target.axes["tokens"] == [1, 8, 32, 64, 96]
    t = load_table(tmp_path / "m.yaml")
    assert t.verify_ms(8, 32, 2048) == pytest.approx(linear(8, 32, 2048), abs=1e-3)  # only run a has batch 8
    assert t.verify_ms(32, 32, 512) == pytest.approx(2 * linear(32, 32, 512), abs=1e-3)  # run b is later
    assert t.verify_ms(64, 32, 2048) == pytest.approx(2 * linear(64, 32, 2048), abs=1e-3)  # inside b's grid
    # batch 8 at context 8192 lies past run a's contexts: extrapolated (the grid is linear, so exactly so)
    assert t.verify_ms(8, 32, 8192) == pytest.approx(linear(8, 32, 8192), abs=1e-3)
    assert inside + outside == 4 * 5 * 3 + 4 * 3 and outside > 0
    assert "extrapolated" in merged.note


def test_merge_refuses_tables_of_different_models(tmp_path):
    a = table(tmp_path / "a.yaml", [8], [8], [512], linear)
    b = table(tmp_path / "b.yaml", [16], [16], [512], linear, model="other")
    with pytest.raises(CostTableError, match="differs"):
        merge_tables([a, b], tmp_path / "m.yaml")


def test_profile_merge_command_reports_json(tmp_path):
    a = table(tmp_path / "a.yaml", [8], [8], [512], linear)
    b = table(tmp_path / "b.yaml", [16], [16], [512], linear)
    out = subprocess.run([sys.executable, "-m", "specmq.cli", "profile", "--json", "--merge", f"{a},{b}", "--out",
                          str(tmp_path / "m.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["batches"] == [8, 16] and summary["points"] == 1 * 2 * 2 + 2 and summary["extrapolated"] > 0
    bad = subprocess.run([sys.executable, "-m", "specmq.cli", "profile", "--merge", f"{a},{tmp_path / 'no.yaml'}",
                          "--out", str(tmp_path / "x.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_a_run_at_another_context_does_not_override_a_batch_measured_at_this_one(tmp_path):
    a = table(tmp_path / "a.yaml", [8, 32], [8, 32], [512, 2048], linear)
    b = table(tmp_path / "b.yaml", [8], [8, 32], [8192], lambda *x: 3 * linear(*x))
    merge_tables([a, b], tmp_path / "m.yaml")
    t = load_table(tmp_path / "m.yaml")
    assert t.verify_ms(8, 32, 512) == pytest.approx(linear(8, 32, 512), abs=1e-3)  # a's, not b's clamped 8192 value
    assert t.verify_ms(8, 32, 8192) == pytest.approx(3 * linear(8, 32, 8192), abs=1e-3)

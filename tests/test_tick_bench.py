"""``specmq bench tick`` on the CPU: every part of a serving tick is measured and they add up to the tick."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tick_parts_add_up_and_every_row_is_a_full_batch():
    out = subprocess.run([sys.executable, "-m", "specmq.cli", "bench", "tick", "--json", "--batches", "1,4",
                          "--gammas", "0,2", "--ticks", "3", "--context", "32"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    head, rows = lines[0]["header"], lines[1:]
    assert head["context"] == 32 and head["device"] == "cpu"
    assert [(r["gamma"], r["batch"]) for r in rows] == [(0, 1), (0, 4), (2, 1), (2, 4)]
    for r in rows:
        parts = sum(r[k] for k in ("read_ms", "handle_ms", "take_ms", "forward_ms", "accept_ms", "finish_ms",
                                   "encode_ms"))
        assert r["forward_ms"] > 0 and r["tick_ms"] >= r["forward_ms"]
        assert abs(parts - r["tick_ms"]) < 0.01  # the parts of one (the median) tick
        assert abs(r["host_ms"] - (r["tick_ms"] - r["forward_ms"])) < 0.01


def test_a_bad_model_directory_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "specmq.cli", "bench", "tick", "--model", str(tmp_path / "none"),
                          "--batches", "1", "--ticks", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr and out.stderr.strip()


def test_sampled_chunks_with_a_whole_vocabulary_q_are_read_and_judged():
    """``--q dense``: each draft token carries a q over the whole vocabulary, as a drafter without top-k sends."""
    out = subprocess.run([sys.executable, "-m", "specmq.cli", "bench", "tick", "--json", "--batches", "2",
                          "--gammas", "2", "--ticks", "2", "--context", "32", "--temperature", "0.8", "--q", "dense"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["header"]["q"] == "dense"
    (row,) = lines[1:]
    assert row["temperature"] == 0.8 and row["read_ms"] > 0 and row["handle_ms"] > 0


def test_mixed_ticks_carry_prefill_rows_and_the_tables_price():
    """``--prefill-rows``: every timed tick holds that many prefill chunks beside the verifying rows; with a cost
    table each row gives the table's price of the median tick's shape, as the simulator would charge it."""
    out = subprocess.run([sys.executable, "-m", "specmq.cli", "bench", "tick", "--json", "--batches", "2",
                          "--gammas", "0", "--ticks", "2", "--context", "64", "--prefill-rows", "1",
                          "--cost-table", "configs/profiles/cpu-tiny-pair.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()][1:]
    assert row["prefill_rows"] == 1 and row["tokens"] > 2  # two 1-token rows and a prefill chunk
    assert row["table_ms"] > 0 and abs(row["forward_over_table"] - row["forward_ms"] / row["table_ms"]) < 0.01
    bad = subprocess.run([sys.executable, "-m", "specmq.cli", "bench", "tick", "--prefill-rows", "-1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--prefill-rows" in bad.stderr and "Traceback" not in bad.stderr

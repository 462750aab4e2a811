"""The emulated engine (workers/engine/emulated.py): deterministic tokens, the set acceptance rate, lossless
speculation over it, step times priced by the cost table, clear errors for a bad config, and ``bench capacity``
running the emulated pair end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.cost_table import load_table
from workers.engine import EngineError, load_engine
from workers.engine.emulated import FIRST_TOKEN, draft_tokens, is_emulated, target_tokens
from workers.sampling import SamplingParams
from workers.speculation import autoregressive_generate, speculative_generate

ROOT = Path(__file__).resolve().parents[1]
TARGET, DRAFT = ROOT / "models" / "emulated" / "h200-8b", ROOT / "models" / "emulated" / "h200-1b"
TABLE = ROOT / "configs" / "profiles" / "h200-grown-8b-1b.yaml"


def emulated_dir(tmp_path: Path, name: str = "m", **cfg) -> Path:
    d = tmp_path / name
    d.mkdir()
    base = {"model_type": "specmq-emulated", "role": "target", "vocab_size": 64, "cost_table": str(TABLE),
            "time_scale": 0.0}
    (d / "config.json").write_text(json.dumps({**base, **cfg}))
    return d


def test_tokens_are_deterministic_in_range_and_the_draft_agrees_at_its_rate():
    prev = torch.randint(0, 512, (40000,))
    pos = torch.arange(40000)
    t = target_tokens(prev, pos, 512, seed=0)
    assert torch.equal(t, target_tokens(prev, pos, 512, seed=0))
    assert int(t.min()) >= FIRST_TOKEN and int(t.max()) < 512
    assert not torch.equal(t, target_tokens(prev, pos, 512, seed=1))  # the seed picks another model
    for alpha in (0.0, 0.6, 0.9, 1.0):
        d = draft_tokens(prev, pos, 512, 0, alpha)
        assert int(d.min()) >= FIRST_TOKEN and int(d.max()) < 512
        assert (d == t).double().mean().item() == pytest.approx(alpha, abs=0.01)


def test_shipped_pair_loads_through_load_engine_and_refuses_growth():
    assert is_emulated(TARGET) and is_emulated(DRAFT) and not is_emulated(ROOT / "models" / "tiny-target")
    t = load_engine(TARGET, slots=2)
    assert t.info.vocab_size == 512 and t.info.eos_token_ids == () and t.info.device.startswith("emulated:")
    assert load_engine(TARGET, slots=2, backend="cuda").info.dtype == "emulated"  # no weights: any backend
    with pytest.raises(EngineError, match="cannot grow"):
        load_engine(TARGET, grow="llama-3.1-8b")


def test_speculation_over_the_emulated_pair_is_lossless(tmp_path):
    target = load_engine(emulated_dir(tmp_path, "t", vocab_size=512), slots=2)
    draft = load_engine(emulated_dir(tmp_path, "d", vocab_size=512, role="draft", acceptance=0.8), slots=2)
    prompt = list(range(5, 40))
    ref = autoregressive_generate(target, prompt, 60, SamplingParams())
    for gamma in (1, 4):
        out = speculative_generate(draft, target, prompt, gamma, 60, SamplingParams())
        assert out.tokens == ref.tokens
        assert 0 < out.accepted < out.drafted  # some accepted, some rejected: α 0.8
    sampled = speculative_generate(draft, target, prompt, 4, 40, SamplingParams(temperature=0.8, seed=3))
    assert len(sampled.tokens) == 40 and all(FIRST_TOKEN <= t < 512 for t in sampled.tokens)


def test_rollback_restores_the_logits_a_slot_gives():
    eng = load_engine(TARGET, slots=2)
    eng.step_ms = lambda *a: 0.0  # no sleeping in a unit test
    slot = eng.allocate()
    first = eng.forward([(slot, [7, 8, 9])])[0]
    eng.forward([(slot, [10, 11])])
    eng.rollback(slot, 2)
    assert eng.length(slot) == 3
    again = eng.forward([(slot, [10, 11])])[0]
    other = eng.allocate()
    fresh = eng.forward([(other, [7, 8, 9, 10, 11])], last_only=[True])[0]
    assert torch.equal(again[-1], fresh[0]) and first.shape == (3, 512)
    assert int(first.argmax(-1)[0]) == int(target_tokens(torch.tensor([7]), torch.tensor([0]), 512, 0)[0])


def test_step_time_is_the_tables_price_scaled():
    table = load_table(TABLE)
    t = load_engine(TARGET, slots=1)
    d = load_engine(DRAFT, slots=1)
    assert t.cost_ms(64, 192, 512.0) == pytest.approx(table.verify_ms(64, 192, 512.0))
    assert d.cost_ms(8, 8, 2048.0) == pytest.approx(table.draft_step_ms(8, 2048.0))
    # a draft step feeding many tokens a row (catch-up, prefill) costs proportionally more past 64 a row
    assert d.cost_ms(1, 256, 512.0) == pytest.approx(4 * table.draft_step_ms(1, 512.0))


@pytest.mark.parametrize("cfg, message", [
    ({"role": "verifier"}, "role must be one of"),
    ({"vocab_size": 3}, "vocab_size must be an integer"),
    ({"acceptance": 1.5}, "acceptance must be a number in"),
    ({"time_scale": -1}, "time_scale must be a number"),
    ({"seed": "x"}, "seed must be a non-negative integer"),
    ({"cost_table": ""}, "cost_table .* is missing"),
    ({"cost_table": "nowhere.yaml"}, "cost_table .*nowhere.yaml"),
])
def test_a_bad_config_is_an_engine_error_naming_the_key(tmp_path, cfg, message):
    with pytest.raises(EngineError, match=message):
        load_engine(emulated_dir(tmp_path, **cfg))


@pytest.mark.slow
def test_bench_capacity_runs_the_emulated_pair_and_refuses_a_mixed_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "specmq.cli", "bench", "capacity", "--device", "cpu", "--contexts", "96",
            "--max-new-tokens", "8", "--sampled-sessions", "0", "--draft-procs", "1", "--json"]
    out = tmp_path / "rows.jsonl"
    res = subprocess.run(base + ["--target-model", str(TARGET), "--draft-model", str(DRAFT), "--sessions", "1,4",
                                 "--modes", "target-only,g2", "--out", str(out), "--logdir", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["setup"]["emulated"].startswith("emulated:")
    points = [r for r in rows if "mode" in r]
    assert len(points) == 4 and all(r["lossless"] == 1.0 and r["errors"] == 0 for r in points)
    g2 = [r for r in points if r["mode"] == "g2"]
    assert all(r["alpha"] is not None and 0 < r["alpha"] <= 1 and r["mean_gamma"] > 0 for r in g2)
    assert all(r.get("round_send_ms", 0.0) >= 0 for r in g2)
    mixed = subprocess.run(base + ["--target-model", str(TARGET), "--sessions", "1", "--modes", "g2"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert mixed.returncode != 0 and "emulate both or neither" in mixed.stderr
    fused = subprocess.run(base + ["--target-model", str(TARGET), "--draft-model", str(DRAFT), "--modes", "fused"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert fused.returncode != 0 and "fused worker needs real models" in fused.stderr


def test_bench_tick_builds_the_emulated_engine_as_is():
    from workers.profiling import build_engine

    eng = build_engine(str(TARGET), None, "cpu", "float32", slots=4, max_context=600)
    assert eng.info.dtype == "emulated" and eng.info.num_slots == 4 and eng.info.max_context == 600

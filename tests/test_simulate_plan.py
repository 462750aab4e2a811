"""``specmq simulate plan``: the fewest targets that keep N sessions' TPOT p90 under an SLO."""
from __future__ import annotations

import json

import pytest

from simulator.config import ConfigError, load_config
from simulator.plan import fleet_config, plan_targets

CONFIG = """\
seed: 1
duration_s: 2
burn_in_s: 0.5
gamma: auto
costs: configs/profiles/h200-grown-8b-1b.yaml
drafts: {mix: {server: 1.0}}
targets:
  - {name: gpu, count: 1, slots: 256, max_batch_tokens: 2304, max_batch_rows: 256, prefill_chunk: 256, tick_ms: 2.0}
acceptance: {alpha: 0.75}
workload: {prompt_tokens: 448, output_tokens: 64}
"""


def fake(cfg: dict) -> dict:
    """TPOT p90 falls as 100 / targets: the answer for an SLO of X is ceil(100 / X)."""
    k = cfg["targets"][0]["count"]
    assert cfg["workload"]["arrival"] == "closed" and cfg["drafts"]["count"] == 40
    return {"tpot_p90_ms": 100.0 / k, "tpot_p50_ms": 80.0 / k, "ttft_p90_ms": 5.0, "throughput_tok_s": 100.0 * k,
            "finished": 10, "synthetic": True, "cost_tables": ["fake"]}


@pytest.mark.parametrize("slo, want", [(100.0, 1), (30.0, 4), (7.0, 15), (2.0, 50)])
def test_search_finds_the_fewest_targets_in_few_runs(slo, want):
    plan = plan_targets(load_config(None), 40, slo, fake, max_targets=64)
    assert plan.targets == want
    assert plan.point(want).meets(slo) and (want == 1 or not plan.point(want - 1).meets(slo))
    assert len(plan.tried) <= 2 * 6 + 1  # doubling then bisecting: O(log max_targets) runs


def test_not_met_within_max_targets_says_so():
    plan = plan_targets(load_config(None), 40, 1.0, fake, max_targets=8)
    assert plan.targets is None and plan.to_json()["met"] is False
    assert max(p.targets for p in plan.tried) == 8


def test_bad_plan_inputs_are_named():
    cfg = load_config(None)
    with pytest.raises(ConfigError, match="--sessions"):
        plan_targets(cfg, 0, 10.0, fake)
    with pytest.raises(ConfigError, match="--slo-tpot-ms"):
        plan_targets(cfg, 4, 0.0, fake)
    with pytest.raises(ConfigError, match="distributed"):
        fleet_config(load_config(None, {"architecture": "fused"}), 4, 1)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from specmq.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_plan_on_a_small_config(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(CONFIG)
    rc, out, _ = run_cli(["simulate", "plan", "--config", str(path), "--sessions", "64", "--slo-tpot-ms", "12",
                          "--max-targets", "8", "--json"], capsys)
    assert rc == 0
    rep = json.loads(out.strip().splitlines()[-1])
    k = rep["targets"]
    tried = {p["targets"]: p for p in rep["tried"]}
    assert rep["met"] and 1 < k <= 8 and tried[k]["tpot_p90_ms"] <= 12 < tried[k - 1]["tpot_p90_ms"]
    assert rep["synthetic"] is False and rep["cost_tables"] == ["configs/profiles/h200-grown-8b-1b.yaml"]
    rc, out, _ = run_cli(["simulate", "plan", "--config", str(path), "--sessions", "64", "--slo-tpot-ms", "12",
                          "--max-targets", "8", "--no-progress"], capsys)
    assert rc == 0 and f"need {k} target(s)" in out and "costs: measured" in out
    rc, out, _ = run_cli(["simulate", "plan", "--config", str(path), "--sessions", "64", "--slo-tpot-ms", "1",
                          "--max-targets", "2", "--no-progress"], capsys)
    assert rc == 1 and "not met with up to 2 target(s)" in out
    rc, _, err = run_cli(["simulate", "plan", "--config", str(path), "--slo-tpot-ms", "12"], capsys)
    assert rc != 0 and "--sessions" in err

"""The simulator's inputs and outputs: cost tables, acceptance rounds, workloads, captures, config, CLI."""
from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import msgpack
import pytest

from protocol.codec import encode
from protocol.messages import Generate, SessionOpen, Verify
from simulator.acceptance import AcceptanceError, EmpiricalAcceptance, load_rounds, make_acceptance
from simulator.config import ConfigError, load_config
from simulator.costs import load_table
from simulator.sweep import parse_vary
from simulator.workload import (KIND_GENERATE, KIND_SPEC, WorkloadError, interarrivals, load_capture, load_trace,
                                synthetic)
from specmq.cli import main
from workers.cost_table import CostTableError, read_table, write_table


def _table(tmp_path, **kw):
    # latency = 1 + 2*batch + 0.5*tokens + 0.01*context: multilinear interpolation must be exact for it
    b, t, c = [1, 4, 16], [1, 8, 64], [0, 100, 1000]
    target = [[[1 + 2 * x + 0.5 * y + 0.01 * z for z in c] for y in t] for x in b]
    draft = [[0.5 + 0.1 * x + 0.001 * z for z in c] for x in b]
    written = write_table(tmp_path / "t.yaml", model="m", device="cpu", dtype="float32", hardware="test",
                          target_axes={"batch": b, "tokens": t, "context": c}, target_latency_ms=target,
                          draft_axes={"batch": b, "context": c}, draft_latency_ms=draft, **kw)
    assert written == read_table(tmp_path / "t.yaml")  # the format round-trips
    return load_table(tmp_path / "t.yaml")


def test_cost_table_round_trip_interpolation_and_edges(tmp_path):
    tab = _table(tmp_path)
    assert tab.model == "m" and tab.hardware == "test" and not tab.synthetic
    f = lambda x, y, z: 1 + 2 * x + 0.5 * y + 0.01 * z  # noqa: E731
    assert tab.verify_ms(4, 8, 100) == pytest.approx(f(4, 8, 100))  # grid point
    assert tab.verify_ms(10, 30, 550) == pytest.approx(f(10, 30, 550))  # inside: multilinear
    assert tab.verify_ms(32, 128, 2000) == pytest.approx(f(32, 128, 2000))  # above: linear extrapolation
    assert tab.verify_ms(0.5, 0, -5) == pytest.approx(f(1, 1, 0))  # below: clamped
    assert tab.draft_step_ms(4, 100) == pytest.approx(0.5 + 0.4 + 0.001 * 96, abs=0.04)


def test_cost_table_errors_name_the_problem(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("format: specmq-cost-table\nversion: 1\ntarget: {axes: {batch: [1, 2], tokens: [1], "
                 "context: [0]}, latency_ms: [[[1.0]]]}\ndraft: {axes: {batch: [1], context: [0]}, "
                 "latency_ms: [[1.0]]}\n")
    with pytest.raises(CostTableError, match=r"target.latency_ms must be a list of 2 \(axis 'batch'\)"):
        load_table(p)
    p.write_text("format: other\n")
    with pytest.raises(CostTableError, match="not a cost table"):
        load_table(p)
    with pytest.raises(CostTableError, match="not found"):
        load_table(tmp_path / "missing.yaml")


def test_example_profile_is_labelled_synthetic():
    tab = load_table("configs/profiles/example-cpu.yaml")
    assert tab.synthetic and "SYNTHETIC" in tab.hardware
    assert tab.verify_ms(64, 320, 500) > tab.verify_ms(1, 5, 500) > 0


def test_rounds_csv_and_json_and_errors(tmp_path):
    rows = "round,gamma,accepted,draft_ms,network_ms,verify_ms\n" + "".join(
        f"{i},4,{k},5.0,2.0,9.0\n" for i, k in enumerate([0, 4, 4, 2, 1, 4, 3, 0]))
    (tmp_path / "r.csv").write_text(rows)
    acc = make_acceptance({"rounds": str(tmp_path / "r.csv")})
    assert isinstance(acc, EmpiricalAcceptance)
    assert acc.expected_tokens(4) == pytest.approx(1 + 18 / 8)
    assert {acc.draw(4, random.Random(i)) for i in range(200)} == {0, 1, 2, 3, 4}
    assert 0 <= acc.draw(7, random.Random(1)) <= 7  # unseen gamma: iid fallback
    (tmp_path / "r.json").write_text(json.dumps({"rounds": [{"round": 0, "gamma": 2, "accepted": 1}]}))
    assert load_rounds(tmp_path / "r.json") == [(2, 1)]
    (tmp_path / "bad.csv").write_text("round,gamma,accepted\n0,4,2\n1,4,x\n")
    with pytest.raises(AcceptanceError, match=r"row 3: column 'accepted' must be an integer"):
        load_rounds(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("round,gamma,accepted\n0,4,5\n")
    with pytest.raises(AcceptanceError, match="row 2"):
        load_rounds(tmp_path / "bad2.csv")


def test_arrival_processes_have_the_right_rate_and_spread():
    rng = random.Random(4)
    for kind, cv in (("poisson", 1.0), ("deterministic", 0.0), ("bursty", 2.5)):
        gen = interarrivals(kind, 50.0, rng, cv=2.5)
        gaps = [next(gen) for _ in range(20_000)]
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(1 / 50.0, rel=0.05)
        assert statistics.pstdev(gaps) / mean == pytest.approx(cv, abs=0.1)
    reqs = synthetic({"arrival": "poisson", "rate": 10, "prompt_tokens": {"dist": "lognormal", "mean": 200},
                      "output_tokens": 64}, 100.0, random.Random(1))
    assert len(reqs) == pytest.approx(1000, rel=0.1)
    assert all(r.output_tokens == 64 for r in reqs)
    assert statistics.fmean(r.prompt_tokens for r in reqs) == pytest.approx(200, rel=0.1)


def test_azure_trace_columns_and_bad_rows(tmp_path):
    reqs = load_trace("configs/sim/traces/azure-tiny.csv")
    assert len(reqs) == 40 and reqs[0].arrival == 0.0
    assert all(b.arrival >= a.arrival for a, b in zip(reqs, reqs[1:]))
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n0.5,abc,5\n")
    with pytest.raises(WorkloadError, match=r"row 3, column 'prompt_tokens': bad value 'abc'"):
        load_trace(p)
    p.write_text("when,prompt_tokens,output_tokens\n0,1,1\n")
    with pytest.raises(WorkloadError, match="missing column arrival_s or TIMESTAMP"):
        load_trace(p)


def _write_capture(path):
    recs = [
        (0.50, "in", b"\x00d1", SessionOpen(session="s1", prompt_ids=list(range(30)), max_new_tokens=40)),
        (0.60, "in", b"\x00d1", Verify(session="s1", seq=0, pos=30, tokens=[1, 2, 3])),
        (0.70, "out", b"\x00d1", SessionOpen(session="s9", prompt_ids=[1], max_new_tokens=1)),  # outbound: skip
        (1.25, "in", b"\x00g1", Generate(job="j1", prompt="x" * 400, max_new_tokens=16)),
        (2.00, "in", b"\x00d1", SessionOpen(session="s1", prompt_ids=list(range(50)), max_new_tokens=40)),  # reopen
        (2.50, "in", b"\x00d2", SessionOpen(session="s1", prompt_ids=[5, 6], max_new_tokens=8)),
    ]
    with open(path, "wb") as fh:
        fh.write(msgpack.packb({"format": "specmq-capture", "version": 1, "started": 1.7e9}, use_bin_type=True))
        for t, d, peer, msg in recs:
            fh.write(msgpack.packb({"t": t, "dir": d, "peer": peer, "body": encode(msg)}, use_bin_type=True))
        fh.write(msgpack.packb({"t": 3.0, "dir": "in", "peer": b"x", "body": b"\xc1garbage"}, use_bin_type=True))


def test_capture_adapter(tmp_path):
    path = tmp_path / "cap.specmq"
    _write_capture(path)
    reqs = load_capture(path)
    assert [(r.arrival, r.prompt_tokens, r.output_tokens, r.kind) for r in reqs] == [
        (0.0, 30, 40, KIND_SPEC), (0.75, 100, 16, KIND_GENERATE), (2.0, 2, 8, KIND_SPEC)]
    (tmp_path / "bad").write_bytes(msgpack.packb({"format": "nope"}))
    with pytest.raises(WorkloadError, match="missing header"):
        load_capture(tmp_path / "bad")
    cfg = load_config(None, {"architecture": "mixed", "fused.count": 1, "workload.arrival": "capture",
                             "workload.capture": str(path), "duration_s": 5.0, "burn_in_s": 0.0})
    from simulator.simulation import simulate

    res = simulate(cfg)
    assert res["requests"] == 3 and res["finished"] == 3


def test_config_rejects_unknown_keys_and_parses_vary(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("drafts: {count: 3, colour: red}\n")
    with pytest.raises(ConfigError, match="drafts.colour"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, {"nope.x": 1})
    assert load_config(None, {"drafts": 7, "targets.0.slots": 9})["targets"][0]["slots"] == 9
    assert parse_vary("drafts=1..1000") == ("drafts", [1, 4, 16, 63, 251, 1000])
    assert parse_vary("gamma=2..8:2") == ("gamma", [2, 4, 6, 8])
    assert parse_vary("alpha=0.5..0.9/3") == ("alpha", [0.5, 0.7, 0.9])
    assert parse_vary("router=rr,jsq2,wjsq2") == ("router", ["rr", "jsq2", "wjsq2"])


def test_cli_run_json_and_errors(capsys, tmp_path):
    rc = main(["simulate", "--config", "configs/sim/default.yaml", "--set", "duration_s=4", "--set",
               "burn_in_s=1", "--json", "--out", str(tmp_path / "run"), "--log-level", "error"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("throughput_tok_s", "ttft_p50_ms", "tpot_p50_ms", "goodput", "events", "wall_s"):
        assert key in res and not (isinstance(res[key], float) and math.isnan(res[key]))
    assert (tmp_path / "run" / "queue_depth.csv").exists() and (tmp_path / "run" / "queue_depth.png").exists()
    assert main(["simulate", "--config", "configs/sim/default.yaml", "--set", "router=fastest"]) == 1
    assert "unknown routing policy 'fastest'" in capsys.readouterr().err


def test_cli_sweep_writes_csv_json_and_plots(capsys, tmp_path):
    out = tmp_path / "sweep"
    rc = main(["simulate", "sweep", "--config", "configs/sim/default.yaml", "--set", "duration_s=3", "--set",
               "burn_in_s=0.5", "--vary", "drafts=4..16/2", "--vary", "router=rr,jsq2", "--out", str(out),
               "--json", "--log-level", "error"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["drafts"], r["router"]) for r in res["results"]] == [(4, "rr"), (4, "jsq2"), (16, "rr"), (16, "jsq2")]
    for name in ("sweep.csv", "sweep.json", "throughput.png", "latency.png", "queue_depth.png"):
        assert (out / name).stat().st_size > 0
    assert res["synthetic"] is False and json.loads((out / "sweep.json").read_text())["synthetic"] is False
    assert all(r["cost_tables"] == ["configs/profiles/cpu-tiny-pair.yaml"] for r in res["results"])


SYNTHETIC_TABLE = "configs/profiles/example-cpu.yaml"
SHORT = ["--set", "duration_s=2", "--set", "burn_in_s=0.5", "--log-level", "error"]


def test_results_say_whether_their_costs_were_synthetic(capsys, tmp_path):
    from simulator.costs import ConstantCost
    from simulator.simulation import simulate

    short = {"duration_s": 2.0, "burn_in_s": 0.5}
    measured = simulate(load_config("configs/sim/default.yaml", short))
    assert measured["synthetic"] is False and measured["cost_tables"] == ["configs/profiles/cpu-tiny-pair.yaml"]
    fake = simulate(load_config("configs/sim/default.yaml", dict(short, costs=SYNTHETIC_TABLE)))
    assert fake["synthetic"] is True and fake["cost_tables"] == [SYNTHETIC_TABLE]
    one_group = load_config("configs/sim/scale-1000.yaml", {"duration_s": 1.0, "burn_in_s": 0.0, "drain_s": 0.0,
                                                            "drafts": 20, "targets.1.costs": SYNTHETIC_TABLE})
    assert simulate(one_group)["synthetic"] is True  # one synthetic group taints the run
    assert simulate(load_config(None, short), costs=ConstantCost(5.0))["synthetic"] is True  # a formula

    assert main(["simulate", "--config", "configs/sim/default.yaml", "--set", f"costs={SYNTHETIC_TABLE}",
                 *SHORT]) == 0
    summary = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert summary["synthetic"] == "true" and summary["cost_tables"] == SYNTHETIC_TABLE
    assert main(["simulate", "sweep", "--config", "configs/sim/default.yaml", "--set", f"costs={SYNTHETIC_TABLE}",
                 "--vary", "router=rr,jsq2", "--no-progress", "--out", str(tmp_path / "s"), *SHORT]) == 0
    assert f"costs: SYNTHETIC (not measured): {SYNTHETIC_TABLE}" in capsys.readouterr().out.splitlines()
    assert main(["simulate", "sweep", "--config", "configs/sim/default.yaml", "--vary", "router=rr",
                 "--no-progress", "--out", str(tmp_path / "m"), *SHORT]) == 0
    assert "costs: measured: configs/profiles/cpu-tiny-pair.yaml" in capsys.readouterr().out.splitlines()


def test_simulator_benchmark_reports_synthetic_costs(tmp_path):
    from benchmarks.simulator import bench_scenario

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"duration_s: 1\nburn_in_s: 0\ndrain_s: 0\ncosts: {SYNTHETIC_TABLE}\n")
    row = bench_scenario(str(cfg))
    assert row["synthetic"] is True and row["cost_tables"] == [SYNTHETIC_TABLE]


def _tables_of(cfg: dict) -> set[str]:
    groups = [cfg] + list(cfg["targets"]) + [cfg["fused"]]
    return {g["costs"] for g in groups if g.get("costs")}


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs/sim").glob("*.yaml")))
def test_shipped_sim_configs_use_measured_tables_or_say_synthetic(path):
    """A shipped config priced by a synthetic table says so in its header comment, and only such a config does."""
    tables = _tables_of(load_config(path))
    synthetic = sorted(t for t in tables if read_table(t).synthetic)
    header = "".join(line for line in Path(path).read_text().splitlines(keepends=True) if line.startswith("#"))
    assert tables
    assert ("SYNTHETIC" in header) == bool(synthetic), f"{path}: synthetic tables {synthetic}, header: {header!r}"


def test_sim_vs_real_calibration_reproduces_measured_rounds(tmp_path):
    from benchmarks.sim_vs_real import compare

    rng = random.Random(9)
    lines = ["round,gamma,accepted,draft_ms,network_ms,verify_ms"]
    for i in range(400):
        k = min(4, int(rng.expovariate(0.5)))
        lines.append(f"{i},4,{k},{rng.uniform(18, 22):.3f},{rng.uniform(9, 11):.3f},{rng.uniform(28, 32):.3f}")
    (tmp_path / "rounds.csv").write_text("\n".join(lines) + "\n")
    out = compare(tmp_path / "rounds.csv", output_tokens=200, duration_s=30.0)
    assert out["ratio"]["round_ms"] == pytest.approx(1.0, abs=0.05)
    assert out["ratio"]["tokens_per_round"] == pytest.approx(1.0, abs=0.05)

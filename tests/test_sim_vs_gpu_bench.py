"""``specmq bench sim_vs_gpu`` on a tiny synthetic capacity rows file: calibration only from N=1 and N=8, every
other point predicted, signed errors, a markdown table; bad rows files give a one-line reason."""
from __future__ import annotations

import json

import pytest

from benchmarks import BenchmarkError
from benchmarks.sim_vs_gpu import calibrate, read_rows
from workers.cost_table import load_table, write_table

CONTEXT, OUTPUT = 96, 24


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "table.yaml"
    batch, tokens, context = [1, 64], [1, 1024], [0, 4096]
    write_table(path, model="t", device="test", dtype="float32", hardware="formula (test)",
                target_axes={"batch": batch, "tokens": tokens, "context": context},
                target_latency_ms=[[[3.0 + 0.02 * b + 0.01 * t for _ in context] for t in tokens] for b in batch],
                draft_axes={"batch": batch, "context": context},
                draft_latency_ms=[[0.3 for _ in context] for _ in batch], synthetic=True)
    return path


def row(mode: str, n: int, tok_s: float, tpot: float, **kw) -> dict:
    base = {"context": CONTEXT, "mode": mode, "temperature": 0.0, "sessions": n, "tok_s": tok_s,
            "tpot_p50_ms": tpot, "tpot_p90_ms": tpot * 1.1, "ttft_p50_s": 0.02, "target_batch": float(n),
            "busy": 0.9, "mean_gamma": 0.0, "alpha": None}
    if mode != "target-only":
        g = {"g2": 2.0, "g4": 4.0, "auto": 3.0}.get(mode, 3.0)
        base.update(mean_gamma=g, alpha=0.8, round_draft_ms=0.5 * g * (1 + n / 16), round_network_ms=1.0,
                    round_verify_ms=3.2)
    base.update(kw)
    return base


@pytest.fixture
def rows_file(tmp_path, table):
    path = tmp_path / "rows.jsonl"
    setup = {"setup": {"device_name": "test GPU", "draft_device": "cpu", "sessions": [1, 8, 16],
                       "contexts": [CONTEXT], "max_new_tokens": OUTPUT, "draft_procs": 2, "tick_ms": 2.0,
                       "cost_table": str(table), "command": "specmq bench capacity (synthetic)"}}
    rows = [row("target-only", 1, 250, 3.2), row("target-only", 8, 1800, 3.5), row("target-only", 16, 3000, 3.9),
            row("g2", 1, 400, 2.0), row("g2", 8, 2000, 3.0), row("g2", 16, 3100, 4.0),
            row("g4", 1, 450, 1.8), row("g4", 8, 1900, 3.4), row("g4", 16, 2800, 4.5),
            row("auto", 1, 430, 1.9), row("auto", 8, 2100, 3.1), row("auto", 16, 3200, 3.8),
            row("fused", 8, 5000, 1.0), row("g2", 8, 1, 99.0)]  # fused is not simulated; a repeat is ignored
    path.write_text("\n".join(json.dumps(r) for r in [setup, *rows]) + "\n")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from specmq.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_predicts_every_point_and_calibrates_on_n1_n8_only(rows_file, tmp_path, capsys):
    md = tmp_path / "out.md"
    rc, out, _ = run_cli(["bench", "sim_vs_gpu", "--rows", str(rows_file), "--seeds", "1", "--out", str(md),
                          "--json"], capsys)
    assert rc == 0
    rep = json.loads(out.strip().splitlines()[-1])
    pts = rep["points"]
    assert {(p["mode"], p["sessions"]) for p in pts} == {(m, n) for m in ("target-only", "g2", "g4", "auto")
                                                         for n in (1, 8, 16)}
    assert {p["role"] for p in pts if p["sessions"] == 16} == {"predicted"}
    assert {p["role"] for p in pts if p["sessions"] in (1, 8)} == {"calib"}
    for p in pts:
        assert p["tok_s_err"] == pytest.approx(p["tok_s_sim"] / p["tok_s_meas"] - 1, abs=1e-3)
        assert p["tok_s_sim"] > 0 and p["tpot_p90_ms_sim"] >= p["tpot_p50_ms_sim"] > 0
    assert [p["tok_s_meas"] for p in pts if p["mode"] == "g2" and p["sessions"] == 8] == [2000]  # first occurrence
    assert rep["summary"]["tok_s"]["points"] == 4 and rep["synthetic_table"] is True
    text = md.read_text()
    assert "| 96 | g4 | 16 | predicted |" in text and "Worst predicted points" in text


def test_calibration_ignores_the_predicted_points(rows_file, table):
    _, rows = read_rows(rows_file)
    cal = calibrate(rows, CONTEXT, load_table(table), OUTPUT)
    changed = [dict(r, round_draft_ms=999.0, round_network_ms=999.0, tpot_p50_ms=999.0, busy=0.1)
               if r["sessions"] == 16 else r for r in rows]
    assert calibrate(changed, CONTEXT, load_table(table), OUTPUT) == cal
    assert cal["path_ms"] == pytest.approx(1.0) and cal["draft_ms_1"] == pytest.approx(0.5 * (1 + 1 / 16))


def test_forward_over_table_is_the_targets_own_correction_at_n8_when_the_rows_carry_it(rows_file, table):
    _, rows = read_rows(rows_file)
    busy_based = calibrate(rows, CONTEXT, load_table(table), OUTPUT)["cost_scale"]
    t = load_table(table)
    assert busy_based == pytest.approx(3.5 * 0.9 / t.verify_ms(8, 8, CONTEXT - OUTPUT / 2))  # tpot × busy / table
    learned = [dict(r, cost_correction=1.07) if (r["mode"], r["sessions"]) == ("target-only", 8)
               else dict(r, cost_correction=9.0) for r in rows]  # only the N = 8 target-only row may count
    assert calibrate(learned, CONTEXT, t, OUTPUT)["cost_scale"] == pytest.approx(1.07)


def test_bad_rows_files_are_named(tmp_path, capsys):
    with pytest.raises(BenchmarkError, match="not found"):
        read_rows(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"setup": {}}\nnot json\n')
    with pytest.raises(BenchmarkError, match="line 2"):
        read_rows(bad)
    bad.write_text(json.dumps({"context": 96, "mode": "g2", "sessions": 1}) + "\n")
    with pytest.raises(BenchmarkError, match="lacks tok_s"):
        read_rows(bad)
    rc, _, err = run_cli(["bench", "sim_vs_gpu", "--rows", str(tmp_path / "missing.jsonl")], capsys)
    assert rc != 0 and "not found" in err


def test_capacity_grid_reports_the_largest_n_within_each_slo(rows_file, table):
    from benchmarks.sim_vs_gpu import capacity_grid

    setup, rows = read_rows(rows_file)
    cap = capacity_grid(rows, setup, load_table(table), alphas=(0.8,), slos=(4.0, 1000.0), grid=(1, 4, 16), seeds=1)
    assert [(r["kind"], r["alpha"]) for r in cap] == [("target-only", None), ("laptop", 0.8), ("gpu2", 0.8)]
    for r in cap:
        p90 = r["tpot_p90_ms"]
        assert r["sessions_at_1000ms"] == 16  # a loose SLO: the largest N tried
        ok = [n for n, v in p90.items() if v <= 4.0]
        assert r["sessions_at_4ms"] == (max(ok) if ok else 0)


def test_capacity_map_covers_devices_rtts_and_an_extrapolated_context(rows_file, table, tmp_path):
    import math

    from benchmarks.sim_vs_gpu import (
        DRAFT_DEVICES,
        capacity_map,
        capacity_map_markdown,
        capacity_map_plot,
        device_step_ms,
        kv_session_cap,
        rtt_link,
    )

    setup, rows = read_rows(rows_file)
    m = capacity_map(rows, setup, load_table(table), contexts=(CONTEXT, 4 * CONTEXT), rtts=(1.0, 40.0),
                     slos=(4.0, 1000.0), grid=(1, 4), side_alphas=(0.9,), plan_context=CONTEXT, plan_slo_ms=6.0,
                     fleets=(10,), seeds=1)
    kinds = {(r["context"], r["kind"], r["rtt_ms"], r["alpha"]) for r in m["rows"]}
    for c in (CONTEXT, 4 * CONTEXT):
        assert (c, "target-only", None, 0.75) in kinds
        for d in DRAFT_DEVICES:
            assert {(c, d.name, 1.0, 0.75), (c, d.name, 40.0, 0.75), (c, d.name, 40.0, 0.9)} <= kinds
    assert m["contexts"][str(4 * CONTEXT)] == {"calibrated_at": CONTEXT, "measured": False,
                                               "kv_cap": kv_session_cap(4 * CONTEXT)}
    assert all(r["extrapolated"] == (r["context"] != CONTEXT) for r in m["rows"])
    for r in m["rows"]:
        assert r["sessions_at_1000ms"] == 4  # a loose SLO: the largest N tried
    # a longer link never makes a one-session round faster
    laptop = {r["rtt_ms"]: r["tpot_p90_ms"][1] for r in m["rows"]
              if (r["context"], r["kind"], r["alpha"]) == (CONTEXT, "laptop", 0.75)}
    assert laptop[40.0] > laptop[1.0] + 2.0
    # the fleet plan: ceil(fleet / sessions per target), target-only and laptops at each RTT
    assert [(p["kind"], p["rtt_ms"]) for p in m["plan"]] == [("target-only", None), ("laptop", 1.0),
                                                             ("laptop", 40.0)]
    for p in m["plan"]:
        s = p["sessions_per_target"]
        assert p["targets"]["10"] == (math.ceil(10 / s) if s else None)
    text = capacity_map_markdown(m)
    assert "RTT 40 ms" in text and "†" in text and "10 laptops" in text
    png = tmp_path / "map.png"
    capacity_map_plot(m, png, slo_ms=1000.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    laptop_dev = next(d for d in DRAFT_DEVICES if d.name == "laptop")
    assert device_step_ms(laptop_dev, 8192) > device_step_ms(laptop_dev, 512) > laptop_dev.step_ms
    assert rtt_link(40.0)["latency_ms"] == 20.0 and kv_session_cap(8192) == 115


def tick_file(path, lines: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(x) for x in [{"machine": "test"}, {"header": {"context": 512}}, *lines])
                    + "\n")
    return str(path)


def tick(batch: int, gamma: int, context: int, host_ms: float) -> dict:
    return {"batch": batch, "gamma": gamma, "context": context, "tick_ms": 5.0 + host_ms, "forward_ms": 5.0,
            "host_ms": host_ms, "host_us_per_row": host_ms * 1000 / batch}


@pytest.fixture
def ticks_file(tmp_path):
    """Host time 0.2 + 0.01 × batch at context 512 (γ 0 and γ 4 straddle the line), 0.1 + 0.05 × batch at 4096."""
    lines = [tick(b, g, 512, 0.2 + 0.01 * b + (0.003 if g else -0.003)) for b in (1, 8, 64) for g in (0, 4)]
    lines += [tick(b, 0, 4096, 0.1 + 0.05 * b) for b in (1, 32)]
    return tick_file(tmp_path / "ticks.jsonl", lines)


def test_tick_rows_fit_a_line_over_every_gamma_at_the_nearest_context(ticks_file):
    from benchmarks.sim_vs_gpu import fit_tick_rows, read_tick_rows

    pts = read_tick_rows(ticks_file)
    assert len(pts) == 8  # header lines skipped
    near = fit_tick_rows(pts, CONTEXT)
    assert near["tick_row_overhead_ms"] == pytest.approx(0.01) and near["tick_rows_a_ms"] == pytest.approx(0.2)
    assert (near["tick_rows_context"], near["tick_rows_points"]) == (512, 6)
    far = fit_tick_rows(pts, 3000)
    assert far["tick_row_overhead_ms"] == pytest.approx(0.05) and far["tick_rows_context"] == 4096


def test_tick_rows_slope_adds_per_row_and_keeps_the_one_row_tick(rows_file, table, ticks_file):
    from benchmarks.sim_vs_gpu import read_tick_rows, sim_config

    _, rows = read_rows(rows_file)
    plain = calibrate(rows, CONTEXT, load_table(table), OUTPUT)
    cal = calibrate(rows, CONTEXT, load_table(table), OUTPUT, read_tick_rows(ticks_file))
    assert plain["tick_row_overhead_ms"] == 0.0 and plain["tick_overhead_ms"] > 0.01
    assert cal["tick_row_overhead_ms"] == pytest.approx(0.01)
    assert cal["tick_overhead_ms"] + cal["tick_row_overhead_ms"] == pytest.approx(plain["tick_overhead_ms"])
    assert cal["host_one_row_ms"] == plain["tick_overhead_ms"]
    cfg = sim_config(mode="target-only", sessions=16, context=CONTEXT, output=OUTPUT, alpha=0.8, cal=cal, slots=16,
                     draft_procs=2, tick_ms=2.0, seed=0)
    assert cfg["targets"][0]["tick_row_overhead_ms"] == pytest.approx(0.01)


def test_tick_rows_option_reaches_the_prediction_and_the_report(rows_file, tmp_path, capsys):
    steep = tick_file(tmp_path / "steep.jsonl", [tick(b, 0, 512, 0.1 + 0.5 * b) for b in (1, 16)])

    def predicted(arg: str) -> tuple[dict, float]:
        rc, out, _ = run_cli(["bench", "sim_vs_gpu", "--rows", str(rows_file), "--seeds", "1", "--json",
                              "--tick-rows", arg], capsys)
        assert rc == 0
        rep = json.loads(out.strip().splitlines()[-1])
        return rep, next(p["tpot_p50_ms_sim"] for p in rep["points"]
                         if (p["mode"], p["sessions"]) == ("target-only", 16))

    with_rows, tpot = predicted(steep)
    without, tpot_plain = predicted("none")
    assert with_rows["tick_rows"]["file"] == steep and without["tick_rows"]["file"] is None
    assert with_rows["calibration"][str(CONTEXT)]["tick_row_overhead_ms"] == pytest.approx(0.5)
    assert with_rows["tick_rows"]["per_context"][str(CONTEXT)]["tick_rows_context"] == 512
    assert without["calibration"][str(CONTEXT)]["tick_row_overhead_ms"] == 0.0
    assert tpot - tpot_plain > 0.5 * 15 * 0.5  # 16-row ticks pay 15 more rows of host time
    md = tmp_path / "out.md"
    rc, _, _ = run_cli(["bench", "sim_vs_gpu", "--rows", str(rows_file), "--seeds", "1", "--out", str(md),
                        "--tick-rows", steep], capsys)
    assert rc == 0 and "| 0.5000 (tick ctx 512) |" in md.read_text() and steep in md.read_text()


def test_bad_tick_rows_files_are_named(tmp_path, rows_file, capsys):
    from benchmarks.sim_vs_gpu import fit_tick_rows, read_tick_rows

    with pytest.raises(BenchmarkError, match="not found"):
        read_tick_rows(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"machine": "x"}\nnot json\n')
    with pytest.raises(BenchmarkError, match="line 2"):
        read_tick_rows(bad)
    bad.write_text(json.dumps({"batch": 8, "context": 512}) + "\n")
    with pytest.raises(BenchmarkError, match="lacks host_ms"):
        read_tick_rows(bad)
    bad.write_text(json.dumps({"machine": "x"}) + "\n")
    with pytest.raises(BenchmarkError, match="no tick rows"):
        read_tick_rows(bad)
    one = read_tick_rows(tick_file(tmp_path / "one.jsonl", [tick(8, 0, 512, 1.0), tick(8, 4, 512, 1.2)]))
    with pytest.raises(BenchmarkError, match="two batch sizes"):
        fit_tick_rows(one, 512)
    rc, _, err = run_cli(["bench", "sim_vs_gpu", "--rows", str(rows_file), "--tick-rows",
                          str(tmp_path / "missing.jsonl")], capsys)
    assert rc != 0 and "tick rows file" in err and "not found" in err


def test_draft_steps_scale_by_batch_and_by_processes_sharing_the_host():
    from benchmarks.sim_vs_gpu import draft_at, draft_steps

    cal = {"draft_ms_1": 2.0, "draft_ms_8": 2.4, "draft_scale": {1: 1.0, 2: 1.5, 4: 2.5, 8: 4.5, 16: 8.5}}
    assert draft_steps(cal, 1, 8) == {1: 2.0, 2: 3.0, 4: 5.0, 8: 9.0, 16: 17.0}  # one process: the N = 1 step
    assert draft_steps(cal, 8, 8)[1] == pytest.approx(2.4)  # eight processes of one session: the N = 8 step
    assert draft_steps(cal, 4, 8)[1] == pytest.approx(2.0 + 0.4 * 3 / 7)  # four processes: between
    assert draft_at(cal, 64, 8) == pytest.approx(2.4 * 4.5)  # 64 sessions on 8 processes: batch 8 each
    assert draft_at(cal, 256, 8) == pytest.approx(2.4 * 8.5 * 2)  # past the profile: in proportion to rows
    two = {**cal, "draft_ms_8": 2.0 * 4.5 * 1.1}  # with 2 processes, N = 8 drafts 4 sessions each
    assert draft_steps(two, 8, 2)[1] == pytest.approx(2.0 * 4.5 * 1.1 / 2.5)
    line = {"draft_ms_1": 2.0, "draft_ms_8": 2.7}  # no profile: the line in N through N = 1 and N = 8
    assert draft_steps(line, 15, 8) == pytest.approx(2.0 + 0.1 * 14)


def test_draft_table_option_reaches_the_prediction_and_the_report(rows_file, tmp_path, capsys):
    path = tmp_path / "draft.yaml"
    batch, context = [1, 2, 8, 16], [0, 4096]
    write_table(path, model="draft", device="cpu", dtype="float32", hardware="formula (test)",
                target_axes={"batch": batch, "tokens": [1, 8], "context": context},
                target_latency_ms=[[[1.0 * b for _ in context] for _ in (1, 8)] for b in batch],
                draft_axes={"batch": batch, "context": context},
                draft_latency_ms=[[1.0 * b for _ in context] for b in batch], synthetic=True)
    out = {}
    for name, flag in (("steep", str(path)), ("line", "none")):
        md = tmp_path / f"{name}.md"
        rc, text, _ = run_cli(["bench", "sim_vs_gpu", "--rows", str(rows_file), "--seeds", "1", "--json",
                               "--draft-table", flag, "--out", str(md)], capsys)
        assert rc == 0
        out[name] = (json.loads(text), md.read_text())
    steep, line = out["steep"][0], out["line"][0]
    assert steep["draft_table"] == str(path) and line["draft_table"] is None
    assert steep["calibration"][str(CONTEXT)]["draft_scale"]["16"] == pytest.approx(16.0)
    tok = {name: {(p["mode"], p["sessions"]): p["tok_s_sim"] for p in out[name][0]["points"]} for name in out}
    assert tok["steep"][("g4", 16)] < tok["line"][("g4", 16)]  # 8 sessions a process cost 8x a step, not the line
    assert str(path) in out["steep"][1] and "no draft profile" in out["line"][1]
    rc, _, err = run_cli(["bench", "sim_vs_gpu", "--rows", str(rows_file), "--draft-table", str(tmp_path / "no.yaml")],
                         capsys)
    assert rc != 0 and "draft table" in err and "no.yaml" in err


def test_auto_points_start_with_what_the_runs_before_them_taught_the_controller(rows_file, table):
    from benchmarks.sim_vs_gpu import calibrate, draft_at, predict, warm_state

    setup, rows = read_rows(rows_file)
    cal = calibrate(rows, CONTEXT, load_table(table), OUTPUT)
    costs, alpha = warm_state(cal, 0.7, procs=2)
    assert sorted(costs) == list(range(1, 10)) and alpha == 0.7
    assert costs[1] == (pytest.approx(cal["draft_ms_1"]), cal["path_ms"])
    assert costs[6][0] == pytest.approx(draft_at(cal, 32, 2)) and costs[6][0] >= costs[1][0]
    t = load_table(table)
    warm = {(r["mode"], r["sessions"]): r for r in predict(rows, setup, t, seeds=1, warm_auto=True)[0]}
    cold = {(r["mode"], r["sessions"]): r for r in predict(rows, setup, t, seeds=1, warm_auto=False)[0]}
    assert warm[("g2", 16)] == cold[("g2", 16)]  # fixed γ has no controller to warm
    assert any(warm[("auto", n)] != cold[("auto", n)] for n in (1, 8, 16))  # auto starts from what it knew

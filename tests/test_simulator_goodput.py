"""The simulated target runs the real goodput controller (``workers.goodput``) and decode mode (γ = 0) as the real
target worker does: decode sessions commit one token per tick, and ``gamma: auto`` speculates while the verify step
is memory-bound and decodes once it turns compute-bound."""
from __future__ import annotations

import pytest

from simulator.config import ConfigError, load_config
from simulator.simulation import Simulation
from workers.cost_table import load_table, write_table
from workers.goodput import GoodputController


class Roofline:
    """Memory-bound below ``knee`` tokens (extra tokens are free), compute-bound above (tests/test_goodput.py's)."""

    source, synthetic = "roofline (test)", True

    def __init__(self, weights_ms: float = 5.0, knee: int = 64, per_token_ms: float = 0.08) -> None:
        self.weights_ms, self.knee, self.per_token_ms = weights_ms, knee, per_token_ms

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        return max(self.weights_ms, tokens * self.per_token_ms) + 0.001 * batch * context / 64

    def draft_step_ms(self, batch: int, context: float) -> float:
        return 0.5


def closed(n: int, gamma, output: int, path_ms: float = 0.5, **over) -> dict:
    """N drafts on zero-latency links, one session each, all opening at t=0 (a closed loop of one request)."""
    cfg = load_config(None, {"seed": 3, "gamma": gamma, "duration_s": 3.0, "burn_in_s": 0.0, "drain_s": 60.0,
                             "drafts.count": n, "broker.overhead_ms": 0.0, "targets.0.count": 1,
                             "targets.0.slots": 512, "targets.0.max_batch_rows": 512,
                             "targets.0.max_batch_tokens": 8192, "targets.0.tick_ms": 2.0,
                             "workload.arrival": "closed", "workload.requests_per_user": 1,
                             "workload.prompt_tokens": 16, "workload.output_tokens": output})
    cfg["links"]["zero"] = {"latency_ms": 0.0, "jitter_ms": 0.0, "bandwidth_mbps": 1e9, "availability": 1.0}
    cfg["draft_classes"] = {"local": {"link": "zero", "step_ms": 0.5, "path_ms": path_ms}}
    cfg["drafts"]["mix"] = {"local": 1.0}
    for k, v in over.items():
        cfg[k] = v
    return cfg


@pytest.fixture
def linear_table(tmp_path):
    """A measured-format table whose forward costs 4 ms + 0.05 ms per row: exact under interpolation."""
    path = tmp_path / "linear.yaml"
    batch, tokens, context = [1, 512], [1, 4096], [0, 8192]
    write_table(path, model="linear", device="test", dtype="float32", hardware="formula (test)",
                target_axes={"batch": batch, "tokens": tokens, "context": context},
                target_latency_ms=[[[4.0 + 0.05 * b for _ in context] for _ in tokens] for b in batch],
                draft_axes={"batch": batch, "context": context},
                draft_latency_ms=[[0.5 for _ in context] for _ in batch], synthetic=True)
    return load_table(path)


@pytest.mark.parametrize("n", [4, 32])
def test_decode_mode_gives_one_token_per_tick_and_the_closed_form_rate(linear_table, n):
    sim = Simulation(closed(n, 0, 1000, path_ms=0.0), costs=linear_table)
    out = sim.run()
    tau = linear_table.verify_ms(n, n, 0)  # every session a 1-token row in every tick
    assert out["decode_rounds"] > 0 and out["mean_gamma"] == 0
    st = sim.metrics.workers["t0"]
    assert st.tokens - 16 * n == st.rows - n  # decode ticks: one token per row (less the prefill tick's prompts)
    assert st.rows / st.ticks == pytest.approx(n, rel=0.01)  # every session in (almost) every tick
    assert out["throughput_tok_s"] == pytest.approx(n * 1000.0 / tau, rel=0.02)
    assert out["tpot_p50_ms"] == pytest.approx(tau, rel=0.02)
    assert out["finished"] == n


def test_auto_speculates_at_small_batch_and_decodes_at_large_batch():
    few = Simulation(closed(2, "auto", 300, acceptance={"alpha": 0.8, "rounds": None, "pairs": {}}),
                     costs=Roofline()).run()
    many_sim = Simulation(closed(256, "auto", 300, acceptance={"alpha": 0.8, "rounds": None, "pairs": {}}),
                          costs=Roofline())
    many = many_sim.run()
    assert few["mean_gamma"] >= 2 and few["decode_rounds"] == 0
    assert many["decode_rounds"] > 0.7 * (many["decode_rounds"] + sim_rounds(many_sim))
    # fixed-γ and decode runs at 256 sessions: auto's choice is the faster one
    g4 = Simulation(closed(256, 4, 300, acceptance={"alpha": 0.8, "rounds": None, "pairs": {}}),
                    costs=Roofline()).run()
    assert many["throughput_tok_s"] > g4["throughput_tok_s"]


def sim_rounds(sim: Simulation) -> int:
    return sim.metrics.rounds


def test_the_simulated_target_holds_the_real_controller_fed_with_observations():
    sim = Simulation(closed(4, "auto", 120), costs=Roofline(weights_ms=5.0))
    ctl = sim.targets[0].controller
    assert type(ctl) is GoodputController  # the module the target worker uses, not a copy
    seen = []
    observe_round, observe_tick = ctl.observe_round, ctl.observe_tick
    ctl.observe_round = lambda *a, **k: (seen.append(("round", a, k)), observe_round(*a, **k))[1]
    ctl.observe_tick = lambda *a, **k: (seen.append(("tick", a, k)), observe_tick(*a, **k))[1]
    sim.run()
    rounds = [s for s in seen if s[0] == "round"]
    ticks = [s for s in seen if s[0] == "tick"]
    assert rounds and ticks
    assert any(a[3] > 0 for _, a, _ in rounds)  # the drafter's draft cost reaches the controller
    assert any(a[4] >= 0.5 for _, a, _ in rounds[4:])  # and its measured path (≥ the class's path_ms)
    assert all(a[3] == pytest.approx(5.0, rel=0.2) for _, a, _ in ticks if a[1] <= 64)  # measured tick costs
    assert Simulation(closed(4, 4, 50), costs=Roofline()).targets[0].controller is None  # fixed γ: no controller


@pytest.mark.parametrize("over, match", [({"gamma": "fast"}, "gamma"), ({"gamma": -1}, "gamma"),
                                         ({"decode_tokens": 0}, "decode_tokens"),
                                         ({"controller": {"max_gamma": 0, "tpot_slo_ms": None, "replan_ms": 1}},
                                          "max_gamma")])
def test_bad_gamma_settings_are_named(over, match):
    cfg = closed(2, 4, 20)
    cfg.update(over)
    with pytest.raises(ConfigError, match=match):
        Simulation(cfg, costs=Roofline())


def test_host_time_per_tick_and_session_start_add_where_they_should(linear_table):
    cfg = closed(8, 0, 400, path_ms=0.0)
    cfg["targets"][0]["tick_overhead_ms"] = 1.0
    cfg["draft_classes"]["local"]["open_ms"] = 50.0
    sim = Simulation(cfg, costs=linear_table)
    out = sim.run()
    tau = linear_table.verify_ms(8, 8, 0)
    assert out["tpot_p50_ms"] == pytest.approx(tau + 1.0, rel=0.02)  # every tick pays the host time too
    assert min(r.first_token for r in sim.requests) >= 0.050  # no open leaves before the session start
    cfg["targets"][0]["tick_overhead_ms"] = -1.0
    with pytest.raises(ValueError, match="tick_overhead_ms"):
        Simulation(cfg, costs=linear_table)


def test_the_simulated_targets_host_time_reaches_its_controller():
    """The simulated host time per tick is what the real target measures between back-to-back ticks: the
    controller prices decode rows with it there as here."""
    cfg = closed(4, "auto", 60)
    cfg["targets"][0]["tick_overhead_ms"] = 0.8
    cfg["targets"][0]["tick_row_overhead_ms"] = 0.05
    sim = Simulation(cfg, costs=Roofline(weights_ms=5.0))
    sim.run()
    assert 0.8 + 0.05 <= sim.targets[0].controller.host_ms <= 0.8 + 4 * 0.05 + 1e-9


def test_host_time_per_row_adds_to_every_tick_from_the_config(linear_table):
    cfg = closed(8, 0, 400, path_ms=0.0)
    cfg["targets"][0]["tick_overhead_ms"] = 1.0
    cfg["targets"][0]["tick_row_overhead_ms"] = 0.25
    out = Simulation(cfg, costs=linear_table).run()
    assert out["tpot_p50_ms"] == pytest.approx(linear_table.verify_ms(8, 8, 0) + 1.0 + 8 * 0.25, rel=0.02)
    cfg["targets"][0]["tick_row_overhead_ms"] = -0.1
    with pytest.raises(ValueError, match="tick_row_overhead_ms"):
        Simulation(cfg, costs=linear_table)


def test_simulated_drafters_report_no_path_for_their_first_round():
    """The first round waits behind every new prompt's prefill: like the real drafter, the simulated one does not
    report it as a round's path (the second chunk carries 0), and reports every later round's."""
    sim = Simulation(closed(1, "auto", 60), costs=Roofline(weights_ms=5.0))
    ctl = sim.targets[0].controller
    paths = []
    observe_round = ctl.observe_round
    ctl.observe_round = lambda *a, **k: (paths.append(a[4]), observe_round(*a, **k))[1]
    sim.run()
    assert len(paths) >= 4
    assert paths[0] == 0.0 and paths[1] == 0.0  # nothing measured yet; the first round's trip is not reported
    assert all(p >= 0.5 for p in paths[2:])  # every later chunk carries its previous round's path


def test_simulated_first_rounds_report_their_draft_cost_when_they_draft_two_or_more():
    """Like the real drafter, a first round with γ >= 2 reports its drafting cost (the real one: its steps after
    the catch-up), so the controller knows a cost after one round."""
    sim = Simulation(closed(1, "auto", 60), costs=Roofline(weights_ms=5.0))
    ctl = sim.targets[0].controller
    drafts = []
    observe_round = ctl.observe_round
    ctl.observe_round = lambda *a, **k: (drafts.append((a[2], a[3])), observe_round(*a, **k))[1]
    sim.run()
    drafted, draft_ms = drafts[0]
    assert drafted >= 2 and draft_ms == pytest.approx(drafted * 0.5)  # the class's 0.5 ms step, γ steps


def test_a_warm_decoding_fleet_opens_sessions_in_decode_mode():
    """The open's answer carries the controller's advice: with drafting known to cost far more than it saves,
    simulated sessions never draft, not even a first round."""
    sim = Simulation(closed(8, "auto", 40), costs=Roofline(weights_ms=5.0))
    sim.targets[0].controller.warm({lv: (400.0, 1.0) for lv in range(1, 6)}, alpha=0.7, examined=64)
    out = sim.run()
    assert sim.metrics.drafted == 0 and out["decode_rounds"] > 0 and out["finished"] == 8
    cold = Simulation(closed(8, "auto", 40), costs=Roofline(weights_ms=5.0))
    cold.run()
    assert cold.metrics.drafted > 0  # cold, each session's first round drafts before any advice


def test_the_simulated_target_measures_the_decode_gap():
    """As the real target does, the simulated one measures a decode session's gap between requests (its answer's
    way back, the drafter's path, its request's way in and its wait for a tick) and its controller prices decode
    rows with it: with a 5 ms path, each request of 8 tokens misses more than 5 ms of ticks."""
    cfg = closed(1, "auto", 128, path_ms=5.0, decode_tokens=8)
    cfg["draft_classes"]["local"]["step_ms"] = 50.0  # drafting cannot pay: the controller sends it to decode mode
    sim = Simulation(cfg, costs=Roofline(weights_ms=5.0))
    sim.run()
    assert sim.metrics.decode_rounds >= 4
    gap = sim.targets[0].controller.decode_gap()
    assert 5.0 <= gap <= 5.0 + 2 * 5.1  # the path, then at most a tick's wait (and a tick's cycle) on top


def test_the_simulated_target_reports_its_prompt_backlog_and_budget_to_the_controller():
    """As the real target does after every tick: the prompt tokens still to cache, the sessions holding them and
    their whole length; the controller plans with the target's token budget and prefill chunk."""
    cfg = closed(8, "auto", 40)
    cfg["workload"]["prompt_tokens"] = 600
    cfg["targets"][0]["max_batch_tokens"] = 1024
    cfg["targets"][0]["prefill_chunk"] = 128
    sim = Simulation(cfg, costs=Roofline(weights_ms=5.0))
    ctl = sim.targets[0].controller
    assert (ctl.config.max_batch_tokens, ctl.config.prefill_chunk) == (1024, 128)
    seen = []
    observe = ctl.observe_prefill
    ctl.observe_prefill = lambda *a: (seen.append(a), observe(*a))[1]
    sim.run()
    busy = [a for a in seen if a[0] > 0]
    assert busy and all(a[1] >= 1 and a[2] >= a[0] for a in busy)  # whole prompts are at least what is left
    assert busy[0][2] == 600 * busy[0][1]
    assert seen[-1][:2] == (0, 0) and ctl.prefill_backlog == (0, 0)  # every prompt cached by the end

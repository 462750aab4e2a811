"""The goodput controller: speculation while the verify step is memory-bound and drafts are cheap, decode mode when
the step turns compute-bound or drafting costs more than it gains, TPOT SLOs respected; and decode mode (γ = 0) on
the target worker gives target-only output."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from protocol import errors as E
from protocol.messages import Result, SessionOpen, SessionOpened, Verify
from tests.model_fixtures import tiny_pair  # noqa: F401  (fixture)
from workers.adaptive_gamma import expected_tokens
from workers.engine import load_engine
from workers.goodput import (FLEET_EVIDENCE, FUSED, MIN_EVIDENCE, PROBE_GAMMA, PROBE_MAX, ControllerConfig,
                             GoodputController,
                             OnlineStepCost, SessionCosts, choose_plan, evaluate_plan, group_sessions)
from workers.sampling import SamplingParams
from workers.speculation import autoregressive_generate
from workers.target_worker import TargetConfig, TargetServer
from workers.tokenizer_text import encode, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


class Roofline:
    """A step that reads ``weights_ms`` of weights and computes ``per_token_ms`` per token beyond ``knee`` tokens:
    memory-bound below the knee (extra tokens are free), compute-bound above it."""

    def __init__(self, weights_ms: float = 5.0, knee: int = 64, per_token_ms: float = 0.08) -> None:
        self.weights_ms, self.knee, self.per_token_ms = weights_ms, knee, per_token_ms

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        return max(self.weights_ms, tokens * self.per_token_ms) + 0.001 * batch * context / 64


def sessions(n: int, alpha: float, draft_ms: float = 0.5, path_ms: float = 0.5) -> list[SessionCosts]:
    return [SessionCosts(alpha, draft_ms, path_ms, 512) for _ in range(n)]


def test_speculates_while_memory_bound_and_decodes_once_compute_bound():
    cost, cfg = Roofline(), ControllerConfig(max_gamma=8)
    few = choose_plan(cost, sessions(2, 0.8), cfg)
    assert min(few.gammas) >= 2  # 2 rows x (γ+1) tokens stay under the knee: drafts are nearly free
    many = choose_plan(cost, sessions(256, 0.8), cfg)
    assert set(many.gammas) == {0}  # 256 rows are past the knee already: every draft token costs compute
    # the choice is the best of the uniform plans by the controller's own model, and beats decoding
    for plan, n in ((few, 2), (many, 256)):
        decode = evaluate_plan(cost, sessions(n, 0.8), [0] * n)
        assert plan.goodput_tok_s >= decode.goodput_tok_s


def test_decoding_pays_the_hosts_time_between_ticks():
    """A decoded token costs its forward plus the worker's host time before the next tick (h); a speculative round
    has h inside its measured path already. Priced at the forward alone, decoding looked cheaper than it is: with
    h counted, the same session speculates."""
    cost, cfg = Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6)
    one = sessions(1, 0.7, draft_ms=2.0, path_ms=2.5)
    assert choose_plan(cost, one, cfg).gammas == [0]
    with_host = choose_plan(cost, one, cfg, host_ms=1.5)
    assert with_host.gammas[0] >= 1
    decode = evaluate_plan(cost, one, [0], host_ms=1.5)
    assert decode.tpot_ms == [pytest.approx(cost.verify_ms(1, 1, 512) + 1.5)]
    assert decode.goodput_tok_s == pytest.approx(1000.0 / (cost.verify_ms(1, 1, 512) + 1.5))
    spec = evaluate_plan(cost, one, [3]), evaluate_plan(cost, one, [3], host_ms=1.5)
    assert spec[0].tpot_ms == spec[1].tpot_ms  # no decode row in the tick: h is in the path, not added again
    # the controller learns h from measured gaps and plans with it; a fused worker's h is every row's: not used
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    for i in range(40):  # the fleet's drafts: α about 0.7, 2 ms a draft token, 4 ms of path a round
        ctl.observe_round(f"f{i % 4}", accepted=2 + i % 2, drafted=4, draft_ms=8.0, path_ms=4.0, context=512)
    ctl.track("s", 512)
    assert ctl.next_gamma("s") == 0
    for _ in range(20):
        ctl.observe_host(1.5)
    assert ctl.host_ms == pytest.approx(1.5) and ctl.stats()["host_ms"] == pytest.approx(1.5)
    assert ctl.next_gamma("s") >= 1


def test_same_acceptance_different_batch_different_choice():
    """Acceptance alone is the wrong signal: α is the same, the best γ is not."""
    cost, cfg = Roofline(knee=48), ControllerConfig(max_gamma=8)
    gammas = [choose_plan(cost, sessions(n, 0.7), cfg).gammas[0] for n in (1, 8, 32, 128)]
    assert gammas[0] > gammas[-1] and gammas == sorted(gammas, reverse=True)


def test_expensive_drafts_and_low_acceptance_choose_decode():
    cost, cfg = Roofline(), ControllerConfig(max_gamma=8)
    assert set(choose_plan(cost, sessions(1, 0.3, draft_ms=4.0, path_ms=3.0), cfg).gammas) == {0}
    assert min(choose_plan(cost, sessions(1, 0.9, draft_ms=0.2, path_ms=0.2), cfg).gammas) >= 4


def test_tpot_slo_is_kept_when_a_plan_can_keep_it():
    cost = Roofline(weights_ms=5.0)
    ss = sessions(4, 0.6, draft_ms=2.0, path_ms=10.0)  # a slow link: speculation has long rounds
    free = choose_plan(cost, ss, ControllerConfig(max_gamma=8))
    slo = choose_plan(cost, ss, ControllerConfig(max_gamma=8, tpot_slo_ms=6.0))
    assert slo.worst_tpot_ms <= 6.0
    assert free.worst_tpot_ms >= slo.worst_tpot_ms


def test_mixed_acceptance_groups_get_their_own_gamma():
    cost, cfg = Roofline(weights_ms=5.0, knee=40), ControllerConfig(max_gamma=8)
    ss = sessions(8, 0.95, draft_ms=0.3) + sessions(8, 0.05, draft_ms=0.3)
    plan = choose_plan(cost, ss, cfg)
    assert min(plan.gammas[:8]) > max(plan.gammas[8:])


def test_fused_mode_charges_drafting_on_the_same_device():
    cost = Roofline(weights_ms=5.0)
    ss = sessions(4, 0.7)
    cheap = choose_plan(cost, ss, ControllerConfig(mode=FUSED), draft_step_ms=0.3)
    dear = choose_plan(cost, ss, ControllerConfig(mode=FUSED), draft_step_ms=6.0)
    assert max(cheap.gammas) > max(dear.gammas)
    # a round of γ costs τ + γ draft steps and commits E(α, γ) per row
    g = cheap.gammas[0]
    assert cheap.goodput_tok_s == pytest.approx(4 * expected_tokens(0.7, g) / (cheap.tick_ms + g * 0.3) * 1000)


def test_online_cost_fits_a_line_and_never_decreases():
    c = OnlineStepCost()
    assert c.verify_ms(1, 1, 0) == 1.0  # nothing seen yet: a neutral guess
    for tokens in (8, 16, 32, 64, 128) * 4:
        c.observe(8, tokens, 100, 2.0 + 0.05 * tokens)
    assert c.verify_ms(8, 100, 100) == pytest.approx(7.0, rel=0.02)
    assert c.verify_ms(8, 200, 100) > c.verify_ms(8, 100, 100)


def test_controller_tracks_sessions_and_corrects_the_table():
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    for i in range(4):
        for _ in range(2):
            ctl.observe_round(f"s{i}", accepted=4, drafted=4, draft_ms=1.0, path_ms=0.5, context=300)
    assert all(ctl.next_gamma(f"s{i}") >= 2 for i in range(4))
    for _ in range(30):  # the device is 3x slower than the table said
        ctl.observe_tick(4, 20, 300, 15.0)
    assert ctl.correction == pytest.approx(3.0, rel=0.05)
    ctl.forget("s0")
    assert "s0" not in ctl.sessions and ctl.stats()["plan_sessions"] in (3, 4)
    with pytest.raises(ValueError):
        ControllerConfig(max_gamma=0)


# ---------------------------------------------------------------------- decode mode on the target worker
def _ticks(server: TargetServer) -> list:
    out = []
    while server.oldest() is not None:
        tick = server.take_tick()
        out += server.finish(tick, server.compute(tick), 1.0)
    return out


def test_decode_mode_equals_target_only_and_is_checked(tiny_pair):
    tok = load_tokenizer(tiny_pair.target)
    prompt = encode(tok, "def parse_args(argv):")
    engine = load_engine(tiny_pair.target, slots=2, max_context=128)
    ref = autoregressive_generate(load_engine(tiny_pair.target, slots=1, max_context=128), prompt, 20,
                                  SamplingParams()).tokens
    server = TargetServer(engine, TargetConfig(max_decode=16))
    server.handle(SessionOpen(session="a", prompt_ids=prompt, max_new_tokens=20))
    (opened,) = _ticks(server)
    assert isinstance(opened, SessionOpened)
    pos = len(prompt)

    def code(msg):
        (reply,) = server.handle(msg)
        return reply.code

    assert code(Verify(session="a", seq=0, pos=pos, tokens=[1], decode=4)) == E.BAD_REQUEST
    assert code(Verify(session="a", seq=0, pos=pos, tokens=[], decode=17)) == E.BAD_REQUEST
    out, seq, ticks = [], 0, 0
    while True:
        assert server.handle(Verify(session="a", seq=seq, pos=pos, tokens=[], decode=6)) == []
        t0 = server.counters["ticks"]
        replies = _ticks(server)
        ticks += server.counters["ticks"] - t0
        (res,) = replies
        assert isinstance(res, Result) and res.accepted == 0
        assert res.next_gamma == -1  # nothing has reported a drafting cost: no advice, the drafter keeps its γ
        out += res.tokens
        pos, seq = res.pos, seq + 1
        if res.finished:
            break
        assert len(res.tokens) == 6  # one token per tick, answered once
        assert server.handle(Verify(session="a", seq=seq - 1, pos=pos, tokens=[], decode=6)) == [res]  # resend
    assert out == ref  # decode mode is target-only decoding
    assert ticks == len(ref)


# ---------------------------------------------------------------------- the fused worker under the controller
class FlatDraft:
    def __init__(self, ms: float) -> None:
        self.ms = ms

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        return self.ms


@pytest.mark.parametrize("draft_step_ms, decodes", [(0.05, False), (50.0, True)])
def test_fused_goodput_policy_is_lossless_and_follows_the_draft_cost(tiny_pair, draft_step_ms, decodes):
    from workers.goodput import GoodputGammaPolicy
    from workers.speculation import speculative_generate_many

    tok = load_tokenizer(tiny_pair.target)
    prompts = [encode(tok, t) for t in ("def main():", "import sys\nimport os", "class Queue:")]
    target = load_engine(tiny_pair.target, slots=3, max_context=128)
    draft = load_engine(tiny_pair.draft, slots=3, max_context=128)
    ref = load_engine(tiny_pair.target, slots=1, max_context=128)
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=5, mode=FUSED, replan_ms=0.0),
                            draft_cost=FlatDraft(draft_step_ms))
    policy = GoodputGammaPolicy(ctl)
    out = speculative_generate_many(draft, target, prompts, 4, 24, SamplingParams(), gamma_policy=policy)
    for p, r in zip(prompts, out):
        assert r.tokens == autoregressive_generate(ref, p, 24, SamplingParams()).tokens
    gammas = [g for r in out for g in r.gammas]
    if decodes:  # a draft step dearer than ten verify steps: drafting never pays, but for rare probe rounds
        assert gammas.count(0) >= 0.8 * len(gammas) and set(gammas) <= {0, PROBE_GAMMA}
    else:
        assert min(gammas[:3]) >= 1 and max(gammas) >= 2


def test_fused_worker_auto_uses_the_controller(tiny_pair):
    from workers.fused_worker import FusedConfig, FusedServer
    from workers.goodput import GoodputGammaPolicy

    tok = load_tokenizer(tiny_pair.target)
    target = load_engine(tiny_pair.target, slots=2, max_context=128)
    draft = load_engine(tiny_pair.draft, slots=2, max_context=128)
    server = FusedServer(draft, target, tok, FusedConfig(auto=True, cost_table="configs/profiles/cpu-tiny-pair.yaml"))
    assert isinstance(server.gamma_policy, GoodputGammaPolicy) and server.chooses_gamma
    assert not server.gamma_policy.controller.online


def test_one_bad_round_does_not_end_speculation_and_decoding_sessions_are_probed():
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    ctl.observe_round("s", accepted=0, drafted=4, draft_ms=0.4, path_ms=0.5, context=100)
    assert 0.3 < ctl.sessions["s"].alpha < 0.6  # the prior still weighs: one round is weak evidence
    for _ in range(20):  # a draft that never agrees: decode mode, with probes at growing intervals
        ctl.observe_round("s", accepted=0, drafted=2, draft_ms=2.0, path_ms=3.0, context=100)
    seq = [ctl.next_gamma("s") for _ in range(80)]
    probes = [i for i, g in enumerate(seq) if g]
    assert all(seq[i] == PROBE_GAMMA for i in probes) and len(probes) >= 3
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # the interval doubles while decoding stays best
    for _ in range(10):  # the session's draft starts agreeing: speculation comes back
        ctl.observe_round("s", accepted=2, drafted=2, draft_ms=2.0, path_ms=3.0, context=100)
    assert ctl.next_gamma("s") >= 2


def test_no_probe_schedule_where_speculation_cannot_pay_even_at_high_acceptance():
    """Drafting dearer than a good draft saves: probes cannot change the plan, so they come only every PROBE_MAX
    decode requests (and resume their schedule once drafting gets cheap)."""
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    for _ in range(10):  # a fine draft (α ≈ 0.9), but 20 ms a token against a 5 ms decode step
        ctl.observe_round("s", accepted=2, drafted=2, draft_ms=40.0, path_ms=3.0, context=100)
    seq = [ctl.next_gamma("s") for _ in range(3 * (PROBE_MAX + 1))]
    probes = [i for i, g in enumerate(seq) if g]
    assert ctl.plan is not None and not any(ctl.plan.gammas)
    assert probes == [PROBE_MAX, 2 * PROBE_MAX + 1, 3 * PROBE_MAX + 2]  # the rare probe only
    for _ in range(40):  # the draft stops agreeing, but gets fast: at α 0.9 it would pay, so probes come early
        ctl.observe_round("s", accepted=0, drafted=2, draft_ms=0.2, path_ms=1.5, context=100)
    ctl.sessions["s"].decodes = 0
    seq = [ctl.next_gamma("s") for _ in range(PROBE_MAX)]
    assert not any(ctl.plan.gammas) and seq.index(PROBE_GAMMA) <= 2


def _opened(tiny_pair, max_new_tokens: int) -> tuple[TargetServer, list[int], SessionOpened]:
    """A target of the shipped pair (3 slots) with session "a" opened on a short code prompt."""
    prompt = encode(load_tokenizer(tiny_pair.target), "def parse_args(argv):")
    server = TargetServer(load_engine(tiny_pair.target, slots=3, max_context=128), TargetConfig(max_decode=16))
    server.handle(SessionOpen(session="a", prompt_ids=prompt, max_new_tokens=max_new_tokens))
    (opened,) = _ticks(server)
    return server, prompt, opened


def test_the_open_carries_the_first_chunks_gamma(tiny_pair):
    """In a fleet that decodes, a new session is told at its open: no first drafted round."""
    server, prompt, opened = _opened(tiny_pair, 20)
    assert isinstance(opened, SessionOpened) and opened.next_gamma == -1  # nothing known yet: no advice
    ctl = server.controller
    for i in range(24):  # the fleet's drafts cost far more than they save (and it has examined enough)
        ctl.observe_round(f"x{i}", accepted=1, drafted=4, draft_ms=400.0, path_ms=30.0, context=64)
    server.handle(SessionOpen(session="b", prompt_ids=prompt, max_new_tokens=20))
    (opened,) = _ticks(server)
    assert isinstance(opened, SessionOpened) and opened.session == "b" and opened.next_gamma == 0


def test_planning_groups_alike_sessions():
    ss = sessions(100, 0.71) + sessions(50, 0.9) + sessions(3, 0.2)
    groups, weights, of = group_sessions(ss)
    assert len(groups) == 3 and weights == [100.0, 50.0, 3.0] and of[0] == 0 and of[120] == 1 and of[-1] == 2
    cost = Roofline()
    plan = choose_plan(cost, ss, ControllerConfig(max_gamma=6))
    assert len(plan.gammas) == 153
    same = evaluate_plan(cost, ss, plan.gammas)  # the grouped prediction is the per-session one
    assert plan.goodput_tok_s == pytest.approx(same.goodput_tok_s, rel=1e-6)


def test_no_advice_until_a_drafting_cost_is_known_then_newcomers_borrow_the_fleets():
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    ctl.observe_round("a", accepted=3, drafted=4, context=100)  # a first round: acceptance, no costs (catch-up)
    assert ctl.next_gamma("a") == -1
    for _ in range(12):  # drafting is slow (20 ms a token): speculation cannot pay against a 5 ms step
        ctl.observe_round("a", accepted=3, drafted=4, draft_ms=80.0, path_ms=1.0, context=100)
    assert ctl.next_gamma("a") == 0
    ctl.track("b", 100)  # a newcomer has reported nothing: it is planned with the fleet's costs, not as free
    assert ctl.knows_costs("b") and ctl.next_gamma("b") == 0
    fast = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    for _ in range(12):
        fast.observe_round("a", accepted=4, drafted=4, draft_ms=0.4, path_ms=0.5, context=100)
    fast.track("b", 100)
    assert fast.next_gamma("b") >= 2


def test_fleet_costs_are_kept_per_load_level_and_forgotten_when_stale():
    """Drafting measured under 64 sessions (contended drafters) does not decide for a lone session: it has no
    fleet cost at its load, so it gets no advice and measures its own; costs unrefreshed for 30 s are dropped."""
    now = [0.0]
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0),
                            clock=lambda: now[0])
    crowd = [f"c{i}" for i in range(64)]
    for k in crowd:
        ctl.track(k, 100)
    for _ in range(3):
        for k in crowd:  # 40 ms a token at this load: drafting cannot pay
            ctl.observe_round(k, accepted=4, drafted=4, draft_ms=160.0, path_ms=2.0, context=100)
    ctl.track("late", 100)  # a newcomer at the same load borrows the crowd's costs: decode at once
    assert ctl.load_level() == 7 and ctl.knows_costs("late") and ctl.next_gamma("late") == 0
    for k in crowd + ["late"]:
        ctl.forget(k)
    ctl.track("alone", 100)
    assert ctl.load_level() == 1 and not ctl.knows_costs("alone") and ctl.next_gamma("alone") == -1
    for _ in range(4):  # its own rounds: drafting is cheap alone
        ctl.observe_round("alone", accepted=4, drafted=4, draft_ms=1.2, path_ms=0.5, context=100)
    assert ctl.next_gamma("alone") >= 2
    ctl.forget("alone")
    ctl.track("next", 100)  # the lone session's level is known now
    assert ctl.fleet_costs()[0] == pytest.approx(0.3) and ctl.next_gamma("next") >= 2
    now[0] += 31.0  # nothing reported for 31 s: the level's costs are forgotten
    assert ctl.fleet_costs() == (0.0, 0.0) and ctl.next_gamma("next") == -1


def test_a_warmed_controller_advises_newcomers_at_once():
    """Warmed with per-level fleet costs and a pooled acceptance (a restarted target, or a simulated point that
    follows others), a newcomer gets advice at its open instead of drafting blind."""
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    ctl.track("new", 100)
    assert ctl.next_gamma("new") == -1  # cold: nothing known
    ctl.warm({1: (40.0, 2.0), 2: (40.0, 2.0)}, alpha=0.7, examined=64)
    assert ctl.prior_alpha() == pytest.approx(0.7) and ctl.fleet_costs() == (40.0, 2.0)
    assert ctl.next_gamma("new") == 0  # drafting at 40 ms a token cannot pay: decode from the open
    fast = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    fast.track("new", 100)
    fast.warm({1: (0.3, 0.5)}, alpha=0.9, examined=64)
    assert fast.next_gamma("new") >= 2


def test_a_session_is_not_sent_to_decode_mode_on_two_unlucky_first_rounds():
    """Until a session has examined MIN_EVIDENCE draft tokens (or the worker has pooled FLEET_EVIDENCE), its own
    acceptance gives no advice: a bad start does not buy the rest of the session in decode mode. Once the fleet
    has evidence, its pooled acceptance is a newcomer's prior."""
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    for _ in range(2):
        ctl.observe_round("s", accepted=0, drafted=4, draft_ms=8.0, path_ms=3.0, context=100)
    assert ctl.sessions["s"].examined < MIN_EVIDENCE and ctl.next_gamma("s") == -1
    for _ in range(6):  # the draft keeps missing: now it is evidence
        ctl.observe_round("s", accepted=0, drafted=4, draft_ms=8.0, path_ms=3.0, context=100)
    assert ctl.sessions["s"].examined >= MIN_EVIDENCE and ctl.next_gamma("s") == 0
    for i in range(12):  # a fleet of good sessions: a newcomer starts from their acceptance, not the default
        ctl.observe_round(f"g{i}", accepted=4, drafted=4, draft_ms=0.4, path_ms=0.5, context=100)
    assert ctl.fleet_examined >= FLEET_EVIDENCE and ctl.prior_alpha() > 0.7
    ctl.track("new", 100)
    assert ctl.alpha_of("new") == pytest.approx(ctl.prior_alpha()) and ctl.next_gamma("new") >= 1


def test_a_session_whose_acceptance_moves_follows_the_plan_at_once():
    """The plan is kept per α group for ``replan_ms``; a session whose α changes group gets that group's γ, or a
    fresh plan, on its next round instead of its old γ until the next replan."""
    t = [0.0]
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=1e9),
                            clock=lambda: t[0])
    for _ in range(10):
        ctl.observe_round("s", accepted=4, drafted=4, draft_ms=0.4, path_ms=0.5, context=100)
    assert ctl.next_gamma("s") >= 3
    for _ in range(40):  # its draft stops agreeing: the long replan interval must not hold the old γ
        ctl.observe_round("s", accepted=0, drafted=2, draft_ms=2.0, path_ms=3.0, context=100)
    assert ctl.next_gamma("s") <= 1


def test_decode_rows_pay_their_requests_path():
    """A decode session misses the ticks that run while its answer travels back and its next request travels in:
    once per request of k tokens it pays the path and the wait for a tick. The fewer tokens a request asks for,
    the more that weighs."""
    cost = Roofline(weights_ms=5.0)
    one = sessions(1, 0.6, draft_ms=2.0, path_ms=4.0)
    tau = cost.verify_ms(1, 1, 512)
    assert evaluate_plan(cost, one, [0]).tpot_ms == [pytest.approx(tau)]  # k not given: not charged
    charged = evaluate_plan(cost, one, [0], decode_tokens=8)
    assert charged.tpot_ms == [pytest.approx(tau + (4.0 + tau / 2) / 8)]
    assert charged.goodput_tok_s == pytest.approx(1000.0 / charged.tpot_ms[0])
    cfg = ControllerConfig(max_gamma=6)
    assert choose_plan(cost, one, cfg, decode_tokens=64).gammas == [0]
    assert choose_plan(cost, one, cfg, decode_tokens=1).gammas[0] >= 1  # a round trip per token: drafting wins
    # measured at the target, the gap between a request's last tick and the next one's first replaces the path
    # (which counts waits for draft steps that decode requests never have), less the h a back-to-back tick takes
    gapped = [SessionCosts(0.6, 2.0, 4.0, 512, decode_gap_ms=3.0)]
    assert evaluate_plan(cost, gapped, [0], decode_tokens=8, host_ms=1.0).tpot_ms == [
        pytest.approx(tau + 1.0 + (3.0 - 1.0) / 8)]
    ctl = GoodputController(cost, ControllerConfig(replan_ms=0.0))
    assert ctl.decode_tokens == 8  # the drafters' default until a request says otherwise
    for _ in range(30):
        ctl.observe_decode("s", 2, 2)
    assert ctl.decode_tokens == pytest.approx(2.0, abs=0.01) and ctl.sessions["s"].uncached == 60


def _catch_up_fleet(rate_ms: float | None, newcomers: int = 0) -> GoodputController:
    """A fleet whose drafts save nothing at α 0.5 (2 ms a draft token, 3 ms of path a round, a 5 ms step): its
    sessions decode. ``rate_ms``: what a draft cache's catch-up costs per token, as the drafters reported it;
    ``newcomers``: sessions n0.. (context 128, 64 tokens to go) that opened before the fleet reported."""
    ctl = GoodputController(Roofline(weights_ms=5.0), ControllerConfig(max_gamma=6, replan_ms=0.0))
    for i in range(newcomers):
        ctl.track(f"n{i}", 128, remaining=64)
    for i in range(20):
        catchup = {"catchup_ms": 100.0 * rate_ms, "catchup_tokens": 100} if rate_ms else {}
        ctl.observe_round(f"f{i % 4}", accepted=1, drafted=2, draft_ms=4.0, path_ms=3.0, context=100, **catchup)
    return ctl


def test_a_probe_must_repay_its_draft_catch_up():
    """A probe feeds the draft cache every token it has not seen: a long prompt's catch-up can cost more than a
    good draft would save over the tokens left, and then the session decodes on without probes; a short one's
    probe repays itself. A newcomer the fleet's acceptance sends to decoding scouts its own at once where that
    pays. Unknown catch-up: newcomers decode at their open and probes keep their schedule."""
    ctl = _catch_up_fleet(0.05)
    assert ctl.catchup_rate() == pytest.approx(0.05)
    ctl.track("long", 2048, remaining=64)
    ctl.track("short", 128, remaining=64)
    assert ctl.next_gamma("short") == PROBE_GAMMA  # a scout: 128 tokens of catch-up (6 ms) against ~1 ms a token
    assert ctl.plan is not None and ctl.plan.gammas[-1] == 0
    assert ctl.probe_pays("long") is False
    long = [ctl.next_gamma("long") for _ in range(100)]
    assert long == [0] * 100  # 2048 tokens (102 ms, twice that to be sure) cannot be repaid over 64 tokens
    assert ctl.probe_pays("short") is True
    ctl.track("short", 128, remaining=2)  # ...nor a short prompt's over two tokens left
    assert ctl.probe_pays("short") is False
    blind = _catch_up_fleet(None)
    blind.track("long", 2048, remaining=64)
    assert blind.catchup_rate() == 0.0 and blind.probe_pays("long") is None
    seq = [blind.next_gamma("long") for _ in range(8)]
    assert seq[0] == 0 and PROBE_GAMMA in seq  # no scout at the open, probes on their schedule


def test_the_target_feeds_catch_up_and_decoded_tokens_to_the_controller(tiny_pair):
    server, prompt, opened = _opened(tiny_pair, 40)
    t = server.controller.sessions["a"]
    assert t.uncached == len(prompt) and t.remaining == 40  # the draft cache holds nothing of it yet
    server.handle(Verify(session="a", seq=0, pos=opened.pos, tokens=[], decode=4))
    (res,) = _ticks(server)
    assert isinstance(res, Result) and len(res.tokens) == 4
    assert t.uncached == len(prompt) + 4 and t.remaining == 36 and server.controller.decode_tokens < 8
    assert server.controller.decode_gap() == 0.0  # one request: no gap between two yet
    time.sleep(0.02)  # the answer's way back and the next request's way in
    server.handle(Verify(session="a", seq=1, pos=res.pos, tokens=[], decode=4))
    (res,) = _ticks(server)
    assert 15.0 <= server.controller.decode_gap() < 5000.0  # measured from the first request's last tick
    assert t.uncached == len(prompt) + 8
    server.handle(Verify(session="a", seq=2, pos=res.pos, tokens=[5, 6], draft_ms=2.0, catchup_ms=30.0,
                         catchup_tokens=len(prompt) + 8))
    (res,) = _ticks(server)
    assert isinstance(res, Result) and t.uncached == 0
    assert server.controller.catchup_rate() == pytest.approx(30.0 / (len(prompt) + 8))
    stats = server.stats()
    assert stats["catchup_ms_per_token"] > 0 and stats["decode_gap_ms"] >= 15.0


def test_sessions_opening_together_do_not_all_scout_at_once():
    """At most one in 16 sessions (at least one) is in a probe or scout round at a time: sessions that open together
    would all scout, and their catch-ups would share the drafters. An answered scout makes room for the next."""
    ctl = _catch_up_fleet(0.05, newcomers=28)  # with the fleet's four: 32 sessions, room for two
    first = [ctl.next_gamma(f"n{i}") for i in range(28)]
    assert first.count(PROBE_GAMMA) == 2 and set(first) == {0, PROBE_GAMMA}
    scout = first.index(PROBE_GAMMA)
    ctl.observe_round(f"n{scout}", accepted=1, drafted=2, draft_ms=4.0, path_ms=3.0, context=130)
    assert ctl.next_gamma(f"n{scout}") == 0  # its scout is answered: room for one more
    again = [ctl.next_gamma(f"n{i}") for i in range(28) if first[i] == 0]
    assert again.count(PROBE_GAMMA) == 1
    ctl.forget(f"n{first.index(PROBE_GAMMA, scout + 1)}")  # a session that leaves frees its place too
    assert [ctl.next_gamma(f"n{i}") for i in range(28) if first[i] == 0].count(PROBE_GAMMA) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0, 0.0])
def test_a_bad_catch_up_or_gap_report_is_ignored(bad):
    """Reports come from drafters over the wire: a NaN, infinite or negative figure changes nothing."""
    ctl = _catch_up_fleet(None)
    ctl.observe_round("f0", accepted=1, drafted=2, draft_ms=4.0, catchup_ms=bad, catchup_tokens=100)
    ctl.observe_round("f0", accepted=1, drafted=2, draft_ms=4.0, catchup_ms=50.0, catchup_tokens=-100)
    ctl.observe_decode_gap("f0", bad if bad != 0.0 else -1.0)
    assert ctl.catchup_rate() == 0.0 and ctl.decode_gap() == 0.0
    ctl.observe_round("f0", accepted=1, drafted=2, draft_ms=4.0, catchup_ms=50.0, catchup_tokens=100)
    assert ctl.catchup_rate() == pytest.approx(0.5)  # a sound report still counts


def test_prompts_waiting_make_every_tick_longer_and_speculation_pays_sooner():
    """While prompts wait to be cached, each tick carries their chunks whatever the plan: τ grows for decoding and
    speculating alike, and a round's tokens amortise it. The same 64 sessions that decode on an idle target draft
    while 9 prompts are prefilled beside them (measured on an emulated H200: γ 2 gave 1.26x target-only's tok/s)."""
    from workers.cost_table import load_table

    table = load_table(ROOT / "configs" / "profiles" / "h200-grown-8b-1b.yaml")
    group = [SessionCosts(0.7, 1.6, 8.0, 2048, 1.3)] * 64
    cfg = ControllerConfig(max_gamma=4)
    idle = choose_plan(table, group, cfg, correction=1.08, host_ms=0.3, decode_tokens=8)
    busy = choose_plan(table, group, cfg, correction=1.08, host_ms=0.3, decode_tokens=8, prefill=(2240.0, 9.0, 0.03))
    assert set(idle.gammas) == {0} and min(busy.gammas) >= 2
    assert busy.tick_ms > idle.tick_ms  # the prefill chunks ride in the tick


def test_prefill_per_tick_is_a_chunk_per_waiting_prompt_within_the_token_budget():
    ctl = GoodputController(Roofline(), ControllerConfig(max_batch_tokens=512, prefill_chunk=256))
    assert ctl.prefill_per_tick(64) == (0.0, 0.0, 0.0)  # nothing waits
    ctl.observe_prefill(1000, 3)
    assert ctl.prefill_per_tick(64)[:2] == (448.0, 2.0)  # 512 less the 64 decode rows' tokens: two chunks
    ctl.observe_prefill(100, 1)
    assert ctl.prefill_per_tick(8)[:2] == (100.0, 1.0)  # the backlog is the limit
    unbounded = GoodputController(Roofline(), ControllerConfig(prefill_chunk=256))
    unbounded.observe_prefill(1000, 3)
    assert unbounded.prefill_per_tick(500)[:2] == (768.0, 3.0)
    ctl.observe_prefill(-5, 2)  # a nonsense report counts as nothing waiting
    assert ctl.prefill_per_tick(8) == (0.0, 0.0, 0.0)
    # a prompt token is worth the output it unlocks: the running sessions' remaining output over a waiting
    # prompt's whole length (not what is left of it)
    ctl.observe_prefill(896, 4, prompt_tokens=4 * 300)
    for i in range(8):
        ctl.track(f"s{i}", 512, remaining=64)
    assert ctl.prefill_per_tick(8) == pytest.approx((504.0, 2.0, 64 / 300))
    ctl.observe_prefill(896, 4)  # the whole length unknown: what is left stands for it
    assert ctl.prefill_per_tick(8)[2] == pytest.approx(64 / 224)


def test_verify_tokens_that_crowd_prompts_out_of_the_budget_pay_for_their_slower_progress():
    """Within a token budget, verify rows go first: a plan's extra verify tokens shorten its ticks' prefill and
    slow the waiting prompts, which goodput counts at the output they unlock."""
    cost = Roofline(weights_ms=5.0, knee=64, per_token_ms=0.02)
    group = [SessionCosts(0.7, 1.0, 3.0, 512)] * 100
    free = evaluate_plan(cost, group, [4] * 100, prefill=(400.0, 2.0, 0.0), max_tokens=512)
    valued = evaluate_plan(cost, group, [4] * 100, prefill=(400.0, 2.0, 1.0), max_tokens=512)
    # 500 verify tokens leave room for 12 prompt tokens a tick; decoding's 100 leave room for all 400
    assert valued.goodput_tok_s - free.goodput_tok_s == pytest.approx(12 / free.tick_ms * 1000.0)
    dec_free = evaluate_plan(cost, group, [0] * 100, prefill=(400.0, 2.0, 0.0), max_tokens=512)
    dec_valued = evaluate_plan(cost, group, [0] * 100, prefill=(400.0, 2.0, 1.0), max_tokens=512)
    assert dec_valued.goodput_tok_s - dec_free.goodput_tok_s == pytest.approx(400 / dec_free.tick_ms * 1000.0)
    assert free.tick_ms < evaluate_plan(cost, group, [4] * 100, prefill=(400.0, 2.0, 0.0)).tick_ms  # capped


def test_the_target_reports_its_prompt_backlog_to_the_controller(tiny_pair):
    prompt = encode(load_tokenizer(tiny_pair.target), "def parse_args(argv):\n    return argv\n" * 2)
    server = TargetServer(load_engine(tiny_pair.target, slots=3, max_context=128),
                          TargetConfig(max_decode=16, prefill_chunk=8, max_batch_tokens=16))
    assert server.controller.config.prefill_chunk == 8 and server.controller.config.max_batch_tokens == 16
    assert server.handle(SessionOpen(session="a", prompt_ids=prompt, max_new_tokens=8)) == []
    assert server.handle(SessionOpen(session="b", prompt_ids=prompt, max_new_tokens=8)) == []
    tick = server.take_tick()
    server.finish(tick, server.compute(tick), 1.0)
    waiting = sum(server.sessions[k].to_prefill for k in ("a", "b"))
    assert server.controller.prefill_backlog == (waiting, 2) and waiting > 0
    _ticks(server)
    assert server.controller.prefill_backlog == (0, 0)

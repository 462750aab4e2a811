"""The simulator against closed forms, built from its own entities (Target, Broker, Simulation).

Parameters are drawn from a seeded generator so each run checks a different-looking but reproducible point.
"""
from __future__ import annotations

import copy
import math
import random

import pytest
import simpy

from simulator.acceptance import IidAcceptance
from simulator.config import load_config
from simulator.costs import ConstantCost, ExponentialCost
from simulator.entities.links import Link
from simulator.entities.targets import Session, Target
from simulator.metrics import Metrics
from simulator.simulation import simulate
from simulator.workload import Request
from workers.batching import BatchLimits

PARAMS = random.Random(20261126)


def _single_server(cost, lam: float, customers: int, seed: int):
    """A target configured as one FIFO server: one row per tick, no batching delay, Poisson chunk arrivals."""
    env = simpy.Environment()
    metrics = Metrics(start=0.0, end=math.inf)
    limits = BatchLimits(max_batch_tokens=1 << 20, max_batch_rows=1, prefill_chunk=1, tick_ms=0.0)
    waits: list[float] = []
    target = Target(env, "t0", limits, slots=1 << 30, cost=cost, rng=random.Random(seed), metrics=metrics,
                    on_tick=lambda start, w, service: waits.extend(w))
    rng = random.Random(seed + 1)
    req = Request(0, 0.0, 1, 1 << 40)
    sess = Session(req, Link("local", 0.0), rng, IidAcceptance(0.0))
    samples: list[int] = []

    def source():
        for _ in range(customers):
            yield env.timeout(rng.expovariate(lam))
            target.verify(sess, 1, env.event())

    def sampler(period: float):
        while True:
            samples.append(len(target.verify_q))
            yield env.timeout(period)

    env.process(source())
    env.process(sampler(0.2 / lam))
    env.run(until=customers / lam * 1.02)
    skip = customers // 20  # burn-in: the system starts empty
    return waits[skip:], samples[len(samples) // 20:]


@pytest.mark.parametrize("trial", range(2))
def test_mm1_waiting_time_and_queue_length(trial):
    rho = PARAMS.uniform(0.3, 0.6)
    mu = 100.0  # services per second (mean 10 ms)
    lam = rho * mu
    waits, samples = _single_server(ExponentialCost(1000.0 / mu, seed=trial), lam, 40_000, seed=100 + trial)
    wq = sum(waits) / len(waits)
    lq = sum(samples) / len(samples)
    assert wq == pytest.approx(rho / (mu - lam), rel=0.12)  # M/M/1: Wq = rho / (mu - lambda)
    assert lq == pytest.approx(rho * rho / (1 - rho), rel=0.12)  # Lq = rho^2 / (1 - rho)


def test_md1_pollaczek_khinchine():
    rho = PARAMS.uniform(0.4, 0.75)
    mu = 100.0
    waits, samples = _single_server(ConstantCost(1000.0 / mu), rho * mu, 30_000, seed=7)
    wq = sum(waits) / len(waits)
    assert wq == pytest.approx(rho / (2 * mu * (1 - rho)), rel=0.1)  # P-K with zero service variance
    assert sum(samples) / len(samples) == pytest.approx(rho * rho / (2 * (1 - rho)), rel=0.12)


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_iid_tokens_per_round_closed_form(gamma):
    alpha = PARAMS.uniform(0.4, 0.9)
    acc = IidAcceptance(alpha)
    expected = (1 - alpha ** (gamma + 1)) / (1 - alpha)
    assert acc.expected_tokens(gamma) == pytest.approx(expected)
    rng = random.Random(gamma)
    n = 40_000
    mean = sum(acc.draw(gamma, rng) + 1 for _ in range(n)) / n
    assert mean == pytest.approx(expected, rel=0.02)


def _small_cfg(**over):
    cfg = load_config(None)
    cfg.update(duration_s=20.0, burn_in_s=2.0, drain_s=20.0)
    cfg["drafts"] = {"count": 24, "sessions": 1, "mix": {"server": 1.0}}
    cfg["workload"] = dict(cfg["workload"], rate=6.0, output_tokens={"dist": "constant", "value": 400},
                           prompt_tokens={"dist": "constant", "value": 64})
    for k, v in over.items():
        cfg[k] = v
    return cfg


def test_simulated_tokens_per_round_matches_iid_model():
    alpha = round(PARAMS.uniform(0.5, 0.85), 3)
    gamma = PARAMS.randint(2, 6)
    cfg = _small_cfg(gamma=gamma, acceptance={"alpha": alpha, "rounds": None, "pairs": {}})
    res = simulate(cfg)
    assert res["tokens_per_round"] == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha), rel=0.03)
    assert res["finished"] == res["requests"] > 50


def test_jsq2_beats_random_on_tail_latency():
    """Each session is one exponential job (prefill only, one row per tick, FIFO): routing is job dispatch, where
    the power of two choices is known to cut waiting sharply against random placement at high load."""
    cfg = load_config(None)
    cfg.update(duration_s=60.0, burn_in_s=5.0, drain_s=60.0)
    cfg["broker"] = dict(cfg["broker"], overhead_ms=0.0)
    cfg["links"] = {"zero": {"latency_ms": 0.0, "jitter_ms": 0.0, "bandwidth_mbps": 1e9, "availability": 1.0}}
    cfg["draft_classes"] = {"instant": {"step_ms": 0.0, "link": "zero"}}
    cfg["drafts"] = {"count": 500, "sessions": 1, "mix": {"instant": 1.0}}
    cfg["targets"] = [dict(cfg["targets"][0], count=8, slots=10_000, tick_ms=0.0, max_batch_rows=1)]
    cfg["workload"] = dict(cfg["workload"], arrival="poisson", rate=0.9 * 8 * 50.0,
                           output_tokens={"dist": "constant", "value": 1},
                           prompt_tokens={"dist": "constant", "value": 8})
    p99 = {}
    for router in ("random", "jsq2"):
        c = copy.deepcopy(cfg)
        c["router"] = router
        p99[router] = simulate(c, costs=ExponentialCost(20.0, seed=3))["ttft_p99_ms"]
    assert p99["jsq2"] < 0.6 * p99["random"], p99


def test_same_seed_same_result_and_seed_matters():
    cfg = load_config("configs/sim/default.yaml", {"duration_s": 6.0, "burn_in_s": 1.0})
    strip = ("wall_s", "events_per_s")
    a = {k: v for k, v in simulate(copy.deepcopy(cfg)).items() if k not in strip}
    b = {k: v for k, v in simulate(copy.deepcopy(cfg)).items() if k not in strip}
    assert a == b
    cfg["seed"] = 99
    c = {k: v for k, v in simulate(cfg).items() if k not in strip}
    assert c["ttft_p50_ms"] != a["ttft_p50_ms"]


@pytest.mark.parametrize("arch", ["fused", "mixed"])
def test_fused_and_mixed_architectures_finish_everything(arch):
    cfg = load_config("configs/sim/mixed.yaml", {"duration_s": 8.0, "burn_in_s": 1.0, "architecture": arch})
    res = simulate(cfg)
    assert res["requests"] > 20 and res["finished"] == res["requests"]
    assert res["throughput_tok_s"] > 0 and res["fused"] == 4
    assert 0.0 <= res["goodput"] <= 1.0


def test_bounded_verify_queue_answers_busy_and_loses_nothing():
    cfg = _small_cfg()
    cfg["workload"] = dict(cfg["workload"], rate=3.0, output_tokens={"dist": "constant", "value": 60})
    cfg["broker"] = dict(cfg["broker"], verify_queue_max=2)
    cfg["targets"] = [dict(cfg["targets"][0], count=1, tick_ms=20.0)]
    res = simulate(cfg)
    assert res["busy_refusals"] > 0
    assert res["finished"] == res["requests"]


def test_closed_loop_users_scale_load_with_drafts():
    res = {}
    for n in (2, 12):
        cfg = load_config("configs/sim/default.yaml", {"duration_s": 8.0, "burn_in_s": 1.0, "drafts": n,
                                                      "workload.arrival": "closed", "workload.think_s": 0.5})
        res[n] = simulate(cfg)
        assert res[n]["requests"] > 0 and res[n]["draft_queue_mean"] == 0
    assert res[12]["throughput_tok_s"] > 3 * res[2]["throughput_tok_s"]


class _Perfect:
    """Every draft token accepted."""

    def draw(self, gamma: int, rng) -> int:
        return gamma


@pytest.mark.parametrize("tick_ms", [0.0, 20.0])
def test_fused_worker_ticks_like_the_real_one(tick_ms):
    """One job, prompt 129 (128 cached in two 64-token chunks), 9 tokens at γ 4: prefill, prefill, a round of
    γ 4 (first tokens), a round of γ 3 (clipped to the 4 tokens left); an idle worker first waits tick_ms."""
    from simulator.entities.fused import FusedWorker
    from simulator.entities.generate_queue import GenerateQueue

    env = simpy.Environment()
    metrics = Metrics(start=0.0, end=math.inf)
    queue = GenerateQueue(8)
    limits = BatchLimits(max_batch_tokens=512, max_batch_rows=8, prefill_chunk=64, tick_ms=tick_ms)
    worker = FusedWorker(env, "f0", queue, limits, 4, 4, ConstantCost(10.0, draft_ms=1.0), random.Random(0),
                         metrics, Link("local", 0.0), lambda kind, name: _Perfect())
    req = Request(0, 0.0, 129, 9)
    queue.put(req)
    env.run(until=1.0)
    prefill_tick, wait = 10.0 + 1.0, tick_ms  # target forward + the draft forward the chunk rides in
    first = wait + 2 * prefill_tick + 10.0 + 4 * 1.0
    assert req.first_token * 1000 == pytest.approx(first, abs=0.01)  # + the local link's bytes
    assert req.finished * 1000 == pytest.approx(first + 10.0 + 3 * 1.0, abs=0.01)
    assert (metrics.rounds, metrics.drafted, req.committed) == (2, 7, 9)
    assert worker.stats.ticks == 4 and worker.stats.tokens == 64 + 64 + 5 + 4 and not worker.jobs


@pytest.mark.parametrize("rows", [1, 5, 12])
def test_tick_costs_forward_plus_host_time_per_tick_and_per_row(rows):
    """A tick of R rows answers after forward × cost_scale + tick_overhead_ms + R × tick_row_overhead_ms."""
    forward, scale, per_tick, per_row = 7.0, 1.5, 0.4, 0.03
    env = simpy.Environment()
    limits = BatchLimits(max_batch_tokens=1 << 20, max_batch_rows=rows, prefill_chunk=1, tick_ms=0.0)
    target = Target(env, "t0", limits, slots=1 << 30, cost=ConstantCost(forward), rng=random.Random(0),
                    metrics=Metrics(start=0.0, end=math.inf), cost_scale=scale, tick_overhead_ms=per_tick,
                    tick_row_overhead_ms=per_row)
    link = Link("instant", 0.0, bandwidth_mbps=1e15)
    answered: list[float] = []
    for i in range(rows):
        sess = Session(Request(i, 0.0, 1, 1 << 20), link, random.Random(i), IidAcceptance(0.5))
        done = env.event()
        done.callbacks.append(lambda _ev: answered.append(env.now))
        assert target.verify(sess, 2, done)
    env.run(until=1.0)
    assert len(answered) == rows
    expected_ms = forward * scale + per_tick + rows * per_row
    assert all(t * 1000.0 == pytest.approx(expected_ms, abs=1e-6) for t in answered)


def test_negative_host_time_per_row_is_named():
    limits = BatchLimits(max_batch_tokens=64, max_batch_rows=4, prefill_chunk=1, tick_ms=0.0)
    with pytest.raises(ValueError, match="tick_row_overhead_ms must be >= 0"):
        Target(simpy.Environment(), "t0", limits, slots=4, cost=ConstantCost(1.0), rng=random.Random(0),
               metrics=Metrics(start=0.0, end=math.inf), tick_row_overhead_ms=-0.01)

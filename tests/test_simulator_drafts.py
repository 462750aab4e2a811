"""The simulator's model of the real drafter: batched drafting (one draft_batch at a time over every ready session,
gathering up to gather_ms), per-batch step times, closed-loop users with a request budget, and a shared-CPU cost
scale on the target."""
from __future__ import annotations

import math
import random

import pytest
import simpy

from simulator.acceptance import IidAcceptance
from simulator.config import ConfigError, load_config
from simulator.costs import ConstantCost
from simulator.entities.drafts import DraftBatcher, DraftClass, DraftDevice
from simulator.entities.links import Link
from simulator.simulation import Simulation


def test_step_ms_mapping_interpolates_clamps_and_extrapolates():
    cls = DraftClass("x", Link("l", 0.0), step_ms={1: 2.0, 5: 6.0, 9: 8.0})
    assert cls.fixed_step_ms(1) == 2.0 and cls.fixed_step_ms(0) == 2.0  # clamped below
    assert cls.fixed_step_ms(3) == pytest.approx(4.0)
    assert cls.fixed_step_ms(7) == pytest.approx(7.0)
    assert cls.fixed_step_ms(13) == pytest.approx(10.0)  # linear above the last point
    assert DraftClass("c", Link("l", 0.0), step_ms=3.0).fixed_step_ms(7) == 3.0
    assert DraftClass("t", Link("l", 0.0)).fixed_step_ms(7) is None  # the cost table decides
    with pytest.raises(ValueError):
        DraftClass("bad", Link("l", 0.0), step_ms={0: 1.0})


def _batcher(gather_ms: float, step: dict, active: int):
    env = simpy.Environment()
    cls = DraftClass("b", Link("l", 0.0), step_ms=step, batched=True, gather_ms=gather_ms)
    dev = DraftDevice("d0", cls, ConstantCost(0.0), random.Random(0), sessions=active)
    dev.active = active
    return env, dev, DraftBatcher(env, dev)


def test_batcher_gathers_ready_sessions_into_one_draft_call():
    env, dev, b = _batcher(5.0, {1: 1.0, 2: 1.5}, active=2)
    done: dict[str, float] = {}

    def session(name: str, at: float, gamma: int):
        yield env.timeout(at)
        yield b.draft(gamma, 10)
        done[name] = env.now

    env.process(session("a", 0.0, 2))
    env.process(session("b", 0.002, 1))
    env.run()
    # both in one batch starting at 2 ms: step 0 over 2 rows (1.5 ms), step 1 over the one row left (1 ms)
    assert b.batches == 1 and b.rows == 2
    assert done["a"] == pytest.approx(0.002 + 0.0025) and done["b"] == pytest.approx(0.002 + 0.0025)


def test_batcher_waits_at_most_gather_ms_for_a_missing_session():
    env, dev, b = _batcher(5.0, {1: 1.0}, active=2)
    done: list[float] = []

    def session(at: float):
        yield env.timeout(at)
        yield b.draft(1, 10)
        done.append(env.now)

    env.process(session(0.0))
    env.process(session(0.020))  # too late for the first batch; the device is idle again then
    env.run()
    assert b.batches == 2
    assert done[0] == pytest.approx(0.005 + 0.001)  # gathered 5 ms, then one 1 ms step
    assert done[1] == pytest.approx(0.020 + 0.005 + 0.001)


def _closed_cfg(sessions: int, per_user: int, batched: bool, output: int = 11) -> dict:
    cfg = load_config(None)
    cfg.update(duration_s=100.0, burn_in_s=0.0, drain_s=0.0, sample_ms=1000.0, gamma=1, router="rr")
    cfg["broker"] = dict(cfg["broker"], overhead_ms=0.0)
    cfg["links"] = {"lo": {"latency_ms": 0.0, "jitter_ms": 0.0, "dist": "constant"}}
    cfg["draft_classes"] = {"cpu": {"step_ms": {1: 1.0, 4: 4.0}, "link": "lo", "batched": batched,
                                    "gather_ms": 2.0}}
    cfg["drafts"] = {"count": 1, "sessions": sessions, "mix": {"cpu": 1.0}}
    cfg["targets"] = [dict(cfg["targets"][0], count=1, slots=sessions, tick_ms=1.0)]
    cfg["workload"] = dict(cfg["workload"], arrival="closed", think_s=0.0, requests_per_user=per_user,
                           prompt_tokens={"dist": "constant", "value": 8},
                           output_tokens={"dist": "constant", "value": output})
    return cfg


def test_closed_loop_sessions_move_in_step_through_one_batched_device():
    sim = Simulation(_closed_cfg(4, 2, batched=True), costs=ConstantCost(10.0))
    sim.default_acceptance = IidAcceptance(0.0)  # one token per round: 10 rounds per request
    sim.run()
    assert len(sim.requests) == 8 and all(not math.isnan(r.finished) for r in sim.requests)  # 4 users x 2
    batcher = sim.pool.devices[0].batcher
    assert batcher.rows == 8 * 10 and batcher.batches == 2 * 10  # all four sessions in every draft call
    # a round: draft 4 rows (4 ms) + verify (10 ms): no tick wait, since every active session's chunk is there
    # (workers.batching.tick_due with active_rows); the open: prefill alone
    first = sim.requests[0]
    assert first.finished - first.arrival == pytest.approx(0.010 + 10 * 0.014, abs=1e-4)  # + bytes on the wire
    ends = sorted(r.finished for r in sim.requests)
    assert ends[-1] == pytest.approx(2 * (0.010 + 10 * 0.014), abs=2e-4)


def test_unbatched_device_keeps_the_old_per_session_round():
    sim = Simulation(_closed_cfg(1, 1, batched=False), costs=ConstantCost(10.0))
    sim.default_acceptance = IidAcceptance(0.0)
    sim.run()
    (r,) = sim.requests
    assert sim.pool.devices[0].batcher is None
    # a lone session: draft (1 ms) + verify (10 ms) a round, no batching wait at the target
    assert r.finished - r.arrival == pytest.approx(0.010 + 10 * (0.001 + 0.010), abs=1e-4)


def test_target_cost_scale_multiplies_every_forward():
    cfg = _closed_cfg(1, 1, batched=True)
    cfg["targets"][0]["cost_scale"] = 2.5
    sim = Simulation(cfg, costs=ConstantCost(10.0))
    services: list[float] = []
    sim.targets[0].on_tick = lambda start, waits, s: services.append(s)
    sim.run()
    assert services and all(s == pytest.approx(0.025) for s in services)


def test_bad_step_ms_mapping_is_a_config_error():
    cfg = _closed_cfg(1, 1, batched=True)
    cfg["draft_classes"]["cpu"]["step_ms"] = {0: 1.0}
    with pytest.raises(ConfigError, match="cpu"):
        Simulation(cfg, costs=ConstantCost(1.0))


def _tick_rows(send_ms: float) -> tuple[list[int], object]:
    cfg = _closed_cfg(4, 1, batched=True, output=21)
    cfg["draft_classes"]["cpu"]["send_ms"] = send_ms
    sim = Simulation(cfg, costs=ConstantCost(10.0))
    sim.default_acceptance = IidAcceptance(0.0)
    rows: list[int] = []
    sim.targets[0].on_tick = lambda start, waits, s: rows.append(len(waits)) if waits else None
    sim.run()
    assert all(not math.isnan(r.finished) for r in sim.requests)
    return rows, sim.pool.devices[0].batcher


def test_send_spread_wider_than_tick_ms_splits_the_batch_as_the_real_sessions_drift_apart():
    # all at once: every verify tick holds all four sessions, every draft call all four
    rows, batcher = _tick_rows(0.0)
    assert set(rows) == {4} and batcher.rows == 4 * batcher.batches
    # 0.5 ms apart: the 4th chunk reaches the target 1.5 ms after the 1st, past tick_ms (1 ms): the target
    # starts with the first ones, the rest wait out that tick, and the two groups stay apart in later rounds
    rows, batcher = _tick_rows(0.5)
    assert max(rows) < 4 and sum(rows) == 4 * 20
    assert batcher.rows < 4 * batcher.batches  # the drafter drafts the groups separately too
    # a spread inside tick_ms changes nothing but the send time
    rows, _ = _tick_rows(0.3)
    assert set(rows) == {4}


def test_negative_send_ms_is_a_config_error():
    cfg = _closed_cfg(1, 1, batched=True)
    cfg["draft_classes"]["cpu"]["send_ms"] = -1.0
    with pytest.raises(ConfigError, match="send_ms"):
        Simulation(cfg, costs=ConstantCost(1.0))

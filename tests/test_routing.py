"""The one load signal (``broker.routing.worker_load``) and the simulator's side of it: what a placement sees.

The real broker's side runs over sockets in ``tests/test_broker.py`` (a slow or crowded target gets no new
sessions from the load-aware policies).
"""
from __future__ import annotations

import math
import random

import pytest
import simpy

from broker.routing import ROUTERS, make_router, worker_load
from simulator.acceptance import IidAcceptance
from simulator.costs import ConstantCost
from simulator.entities.broker import Broker
from simulator.entities.links import Link
from simulator.entities.targets import Session, Target
from simulator.metrics import Metrics
from simulator.workload import Request
from workers.batching import BatchLimits


def test_load_is_sessions_plus_the_backlog_beyond_one_request_per_session():
    assert worker_load("a", 8, sessions=4, outstanding=0).load == 4
    assert worker_load("a", 8, sessions=4, outstanding=4).load == 4  # one chunk in flight each: a tick's batch
    row = worker_load("a", 8, sessions=4, outstanding=10)  # pipelined chunks or opens piling up
    assert (row.backlog, row.load, row.utilisation) == (6, 10, 10 / 8)
    with pytest.raises(ValueError, match="worker a: sessions .* must be >= 0"):
        worker_load("a", 8, sessions=-1, outstanding=0)


@pytest.mark.parametrize("policy", ["least_loaded", "jsq2"])  # wjsq2 samples with replacement: may draw "a" twice
def test_outstanding_requests_break_ties_between_equal_loads(policy):
    busy, idle = worker_load("a", 8, 3, 3), worker_load("b", 8, 3, 0)  # "a" sorts first by id
    rng = random.Random(0)
    picks = {make_router(policy).place([busy, idle], rng).id for _ in range(20)}
    assert picks == {"b"}


@pytest.mark.parametrize("policy", ["least_loaded", "jsq2"])
def test_backlog_outweighs_sessions(policy):
    piled = worker_load("a", 64, sessions=2, outstanding=20)  # load 20
    crowded = worker_load("b", 64, sessions=10, outstanding=10)  # load 10
    assert make_router(policy).place([piled, crowded], random.Random(1)).id == "b"


def test_every_policy_accepts_worker_load_rows():
    rows = [worker_load(f"w{i}", 4, i, 2 * i) for i in range(3)]
    for name in ROUTERS:
        assert make_router(name).place(rows, random.Random(2)) in rows


def _target(env: simpy.Environment, name: str, ms: float) -> Target:
    limits = BatchLimits(max_batch_tokens=1 << 20, max_batch_rows=64, prefill_chunk=1 << 20, tick_ms=0.0)
    return Target(env, name, limits, slots=8, cost=ConstantCost(ms), rng=random.Random(0),
                  metrics=Metrics(start=0.0, end=math.inf))


def _session(out_tokens: int) -> Session:
    return Session(Request(0, 0.0, 4, out_tokens), Link("local", 0.0), random.Random(1), IidAcceptance(0.0))


def test_simulated_target_counts_what_the_broker_counts():
    """Outstanding: an open until its first token, a chunk until its answer (the broker sees both leave)."""
    env = simpy.Environment()
    t = _target(env, "t0", ms=10.0)
    s = _session(out_tokens=3)
    t.sessions += 1  # placed (the simulator's broker counts it)
    opened = env.event()
    t.open_session(s, opened)
    assert t.outstanding == 1
    env.run(until=opened)
    assert t.outstanding == 0 and s.committed == 1
    done = [env.event(), env.event()]
    assert t.verify(s, 1, done[0]) and t.verify(s, 1, done[1])
    assert t.outstanding == 2
    env.run(until=env.now + 0.005)  # mid-tick: both chunks still unanswered
    assert t.outstanding == 2
    env.run(until=done[1])
    assert t.outstanding == 0 and t.sessions == 0  # the session's last token released its slot


def test_simulated_broker_steers_new_sessions_off_a_backlogged_target():
    env = simpy.Environment()
    slow, fast = _target(env, "slow", 1000.0), _target(env, "fast", 1.0)
    slow.sessions, slow.outstanding = 2, 12  # pipelined chunks waiting behind a long tick
    broker = Broker([slow, fast], "least_loaded", random.Random(0))
    placed = [broker.place_session().name for _ in range(8)]
    assert placed == ["fast"] * 8 and fast.sessions == 8
    rnd = Broker([_target(env, "x", 1.0), _target(env, "y", 1.0)], "random", random.Random(0))
    assert {rnd.place_session().name for _ in range(16)} == {"x", "y"}

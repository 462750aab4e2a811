"""``workers.local_cluster`` and ``broker.client.request_stats``: the one way to start, wait for and stop a cluster."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker.client import request_stats
from tests.conftest import free_endpoint
from workers.local_cluster import ClusterError, LocalCluster

ROOT = Path(__file__).resolve().parents[1]
HB = ("--heartbeat-interval", "0.1", "--liveness", "10")


def test_request_stats_answers_from_a_broker_and_none_from_nothing(broker):
    snap = request_stats(broker.frontend, 5.0)
    assert snap is not None and "workers" in snap and "counters" in snap
    t0 = time.monotonic()
    assert request_stats(free_endpoint(), 0.3) is None  # nobody listens there
    assert time.monotonic() - t0 < 5


@pytest.mark.slow
def test_cluster_waits_for_its_workers_and_stops_them_all(tmp_path):
    with LocalCluster(logdir=tmp_path, cwd=ROOT) as cluster:
        cluster.start_broker(*HB)
        cluster.start_worker("echo-worker", "e0", *HB)
        cluster.start_worker("echo-worker", "e1", "--kind", "fused", *HB)
        assert cluster.wait_registered({"e0", "e1"}, timeout_s=60)
        snap = cluster.snapshot(5.0)
        assert snap is not None and {w["kind"] for w in snap["workers"].values()} == {"target", "fused"}
        procs = [s.proc for s in cluster.services.values()]
    assert all(p.poll() is not None for p in procs)  # SIGTERM (then SIGKILL) on leaving the block
    assert (tmp_path / "broker.log").read_text()  # each process logs to its own file


@pytest.mark.slow
def test_a_process_that_exits_early_is_named(tmp_path):
    with LocalCluster(logdir=tmp_path, cwd=ROOT) as cluster:
        cluster.start_broker(*HB)
        cluster.start_worker("echo-worker", "bad", "--kind", "nonsense", *HB)
        with pytest.raises(ClusterError, match=r"bad exited with code 1 .*bad\.log.* before everything was ready"):
            cluster.wait_registered({"bad"}, timeout_s=60)
        assert "--kind must be target or fused" in (tmp_path / "bad.log").read_text()


@pytest.mark.slow
def test_too_few_workers_in_time_is_a_clear_error(tmp_path):
    with LocalCluster(logdir=tmp_path, cwd=ROOT) as cluster:
        cluster.start_broker(*HB)
        with pytest.raises(ClusterError, match=r"only 0 of 1 workers registered within 2s \(missing: ghost\)"):
            cluster.wait_registered({"ghost"}, timeout_s=2)

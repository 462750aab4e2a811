"""Monitoring: Prometheus scrape, stats PUB and ``specmq monitor --once --json`` agree with the broker's counts."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from broker.client import BrokerClient
from broker.ops import stats_pub_address
from protocol.codec import decode, encode
from protocol.messages import Heartbeat, Ready
from tests.conftest import run_async
from tests.ops_helpers import drive, echo_workers, wait_workers


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_stats_pub_address_defaults_to_frontend_port_plus_two():
    assert stats_pub_address("tcp://127.0.0.1:5555", "auto") == "tcp://127.0.0.1:5557"
    assert stats_pub_address("tcp://127.0.0.1:*", "auto") == "tcp://127.0.0.1:*"
    assert stats_pub_address("ipc:///tmp/x", "auto") == ""
    assert stats_pub_address("tcp://127.0.0.1:5555", "") == ""


@pytest.mark.slow
def test_metrics_pub_and_monitor_agree_with_broker_under_load(make_broker):
    b = make_broker(metrics_port=0)

    async def main():
        async with echo_workers(b.backend, "target", "target", "fused"):
            await wait_workers(b, 3)
            async with BrokerClient(b.frontend, timeout=5) as client:
                # several drivers at once: load while we scrape
                scrape_task = asyncio.get_running_loop().run_in_executor(None, scrape, b.snapshot()["metrics"])
                results = await asyncio.gather(*[drive(client, sessions=5, chunks=6, jobs=2, tag=f"c{k}-")
                                                 for k in range(4)])
                mid = await scrape_task
                assert mid[("specmq_workers", (("kind", "target"),))] == 2
            await asyncio.get_running_loop().run_in_executor(None, check, b, results)

    run_async(main(), timeout=90)


def check(b, results: list[dict]) -> None:
    """With the workers still up and the load finished: every view of the counts agrees."""
    chunks = sum(r["chunks"] for r in results)
    jobs = sum(r["jobs"] for r in results)
    deadline = time.monotonic() + 5
    def settled(snap: dict) -> bool:  # the fire-and-forget closes landed; every worker has sent its figures
        return not snap["sessions"] and not snap["jobs"] and all(w["stats"] for w in snap["workers"].values())

    while not settled(b.snapshot()):
        assert time.monotonic() < deadline, b.snapshot()
        time.sleep(0.02)
    own = b.snapshot()
    counters = own["counters"]
    assert counters["msgs_in"]["verify"] == chunks == 120
    assert counters["msgs_out"]["done"] == jobs == 8

    m = scrape(own["metrics"])
    assert m[("specmq_chunks_in_total", ())] == counters["msgs_in"]["verify"]
    assert m[("specmq_chunks_out_total", ())] == counters["msgs_out"]["result"] == chunks
    assert m[("specmq_jobs_in_total", ())] == counters["msgs_in"]["generate"]
    assert m[("specmq_jobs_out_total", ())] == jobs
    assert m[("specmq_messages_in_total", (("type", "session_open"),))] == counters["msgs_in"]["session_open"] == 20
    assert m[("specmq_sessions_placed_total", ())] == counters["sessions_placed"]
    assert m[("specmq_busy_total", ())] == counters["busy"] == 0
    assert m[("specmq_dead_workers_total", ())] == 0
    assert m[("specmq_sessions_open", ())] == own["sessions"]
    for q, v in own["queues"].items():
        assert m[("specmq_queue_depth", (("queue", q),))] == v["depth"] == 0
    for name, w in own["workers"].items():
        labels = (("kind", w["kind"]), ("worker", name))
        assert m[("specmq_worker_capacity", labels)] == w["capacity"]
        assert 0 <= m[("specmq_worker_heartbeat_age_seconds", labels)] < 5
        assert m[("specmq_worker_slots_total", (("worker", name),))] == 64  # from its heartbeat stats

    # the monitor, given only the frontend, reports the same counts
    out = subprocess.run([sys.executable, "-m", "specmq", "monitor", "--broker", b.frontend, "--once", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["counters"]["msgs_in"]["verify"] == chunks
    assert snap["counters"]["msgs_out"]["done"] == jobs
    assert set(snap["queues"]) == set(own["queues"]) and all("depth" in q for q in snap["queues"].values())
    assert set(snap["workers"]) == set(own["workers"])

    # the PUB socket advertised in the snapshot publishes the same figures every second
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(own["stats_pub"])
    try:
        assert sub.poll(5000), "no snapshot on the stats PUB socket"
        pub_snap = decode(sub.recv(), max_frame=1 << 26).snapshot
    finally:
        sub.close()
    assert pub_snap["counters"]["msgs_in"]["verify"] == chunks




def test_worker_heartbeat_figures_become_gauges(make_broker):
    b = make_broker(metrics_port=0)
    ctx = zmq.Context.instance()
    w = ctx.socket(zmq.DEALER)
    w.setsockopt(zmq.LINGER, 0)
    w.connect(b.backend)
    try:
        w.send(encode(Ready(kind="target", model="m", capacity=8, vocab_size=100, worker="t0")))
        stats = {"tick_ms": 12.5, "batch_rows": 3, "slots_used": 2, "slots_total": 8, "accepted": 40, "drafted": 50}
        w.send(encode(Heartbeat(stats=stats)))
        deadline = time.monotonic() + 5
        while b.snapshot()["workers"].get("t0", {}).get("stats") != stats:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        m = scrape(b.snapshot()["metrics"])
        assert m[("specmq_worker_tick_seconds", (("worker", "t0"),))] == 0.0125
        assert m[("specmq_worker_batch_rows", (("worker", "t0"),))] == 3
        assert m[("specmq_worker_accepted_tokens_total", (("worker", "t0"),))] == 40
        assert m[("specmq_worker_slots_used", (("worker", "t0"),))] == 2
    finally:
        w.close()


@pytest.mark.slow
def test_monitor_fails_clearly_when_broker_is_silent():
    from tests.conftest import free_endpoint

    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "specmq", "monitor", "--broker", free_endpoint(), "--once",
                          "--json", "--timeout", "0.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "did not answer within 0.5s" in out.stderr
    assert time.monotonic() - t0 < 30


def test_monitor_rates_and_rows_from_two_snapshots():
    from collections import deque

    from rich.console import Console

    from broker.monitor import rates, render, sparkline, worker_rows

    stats0 = {"ticks": 5, "drafted": 10, "accepted": 5, "tick_ms": 3.2, "batch_rows": 4, "slots_used": 2,
              "slots_total": 8}
    prev = {"uptime_s": 1, "counters": {"msgs_in": {"verify": 10}}, "queues": {}, "workers": {
        "t": {"kind": "target", "stats": stats0}}}
    snap = {"uptime_s": 3, "counters": {"msgs_in": {"verify": 30}}, "queues": {"verify:t": {"depth": 3,
                                                                                           "inflight": 2}},
            "workers": {"t": {"kind": "target", "heartbeat_age_s": 0.2,
                              "stats": dict(stats0, ticks=15, drafted=30, accepted=20)}}}
    assert rates(prev, snap)["chunks_in"] == 10.0
    row = worker_rows(snap, prev)[0]
    assert row["acceptance"] == 0.75 and row["rate_per_s"] == 5.0 and row["slots"] == "2/8"
    assert sparkline([0, 1, 2]) == "▁▅█"
    console = Console(width=160, record=True)
    console.print(render(snap, prev, {"verify:t": deque([0, 3])}, "tcp://x:1"))
    text = console.export_text()
    assert "verify:t" in text and "75%" in text and "3.20" in text

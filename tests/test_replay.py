"""Replay: re-sending a capture's client side reproduces its traffic; a dead broker fails fast and clearly."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from broker.capture import summarize
from broker.client import BrokerClient
from broker.replay import ReplayError, load_plan, replay
from tests.conftest import free_endpoint, run_async
from tests.ops_helpers import drive, echo_workers, wait_settled, wait_workers


def _client_side(summary: dict) -> dict:
    """Client-side message counts, less the replayer's own liveness probe (one stats_request)."""
    return {k: v for k, v in summary["client_messages"].items() if k != "stats_request"}


def test_replay_reproduces_the_captured_client_traffic(make_broker, tmp_path):
    original, again = tmp_path / "a.capture", tmp_path / "b.capture"
    a = make_broker(capture=str(original))

    async def record():
        async with echo_workers(a.backend, "target", "fused"):
            await wait_workers(a, 2)
            async with BrokerClient(a.frontend, timeout=5) as client:
                await drive(client, sessions=4, chunks=5, jobs=3, gap_s=0.005)
                await wait_settled(a)  # the last closes land

    run_async(record(), timeout=60)
    a.stop()
    first = summarize(original)
    plan, _ = load_plan(original)
    assert len(plan) == sum(first["client_messages"].values())

    b = make_broker(capture=str(again))

    async def play():
        async with echo_workers(b.backend, "target", "fused"):
            await wait_workers(b, 2)
            return await replay(original, b.frontend, speed=2.0, drain_s=5.0)

    report = run_async(play(), timeout=60)
    b.stop()
    assert report["sent"] == len(plan)
    assert report["errors"] == 0 and report["busy"] == 0
    # every request but the fire-and-forget closes got its final answer
    assert report["answered"] == report["sent"] - first["client_messages"]["session_close"]
    assert report["drift_p99_ms"] >= 0 and "drift_p50_ms" in report
    second = summarize(again)
    assert second["sessions"] == first["sessions"] == 4
    assert second["jobs"] == first["jobs"] == 3
    assert _client_side(second) == _client_side(first)


def test_replay_loops_and_filters(make_broker, tmp_path):
    original = tmp_path / "a.capture"
    a = make_broker(capture=str(original))

    async def record():
        async with echo_workers(a.backend, "target"):
            await wait_workers(a, 1)
            async with BrokerClient(a.frontend, timeout=5) as client:
                await drive(client, sessions=2, chunks=2, jobs=0, tag="keep")
                await drive(client, sessions=1, chunks=2, jobs=0, tag="skip")
        deadline = time.monotonic() + 5  # the live capture is flushed every 100 ms
        while summarize(original)["client_messages"].get("session_close", 0) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # replay into the same broker with a fresh target: fresh ids per loop, so no collisions
        async with echo_workers(a.backend, "target"):
            await wait_workers(a, 1)
            return await replay(original, a.frontend, speed=4.0, loops=2, sessions="keep")

    report = run_async(record(), timeout=60)
    # keep0, keep1: open + 2 chunks + close each, twice; the capture was still being written (no closes lost)
    assert report["sent_by_type"]["session_open"] == 4 and report["sent_by_type"]["verify"] == 8
    assert report["errors"] == 0


@pytest.mark.slow
def test_replay_against_a_dead_broker_fails_fast(tmp_path):
    original = tmp_path / "a.capture"
    from broker.capture import CaptureWriter
    from protocol.codec import encode
    from protocol.messages import SessionOpen

    w = CaptureWriter(original)
    w.tap("in", "frontend", b"p", encode(SessionOpen(session="s", prompt_ids=[1])))
    w.close()
    t0 = time.monotonic()
    with pytest.raises(ReplayError, match="did not answer"):
        asyncio.run(replay(original, free_endpoint(), connect_timeout=0.3))
    assert time.monotonic() - t0 < 10
    out = subprocess.run([sys.executable, "-m", "specmq", "replay", str(original), "--broker", free_endpoint(),
                          "--timeout", "0.3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "did not answer" in out.stderr

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
    """Client-side message counts, less the replayer's own liveness probe (one stats_request) and the recording
    client's heartbeats (not replayed: liveness, not workload)."""
    return {k: v for k, v in summary["client_messages"].items() if k not in ("stats_request", "heartbeat")}


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


async def _record_sessions(a, path) -> dict:
    """A capture of 4 sessions x 6 chunks and 2 generate jobs against quick echo workers; its summary."""
    async with echo_workers(a.backend, "target", "fused"):
        await wait_workers(a, 2)
        async with BrokerClient(a.frontend, timeout=5) as client:
            await drive(client, sessions=4, chunks=6, jobs=2, gap_s=0.005)
            await wait_settled(a)
    a.stop()
    return summarize(path)


async def _replay_on_slow_target(b, original, **kw) -> dict:
    """Replay ``original`` into ``b`` whose echo target answers each batch 40 ms late (a loaded target)."""
    from workers.echo_worker import serve_echo

    stop = asyncio.Event()
    tasks = [asyncio.create_task(serve_echo(b.backend, "target", name="slow", delay_ms=40.0, heartbeat_interval=0.1,
                                            stop=stop)),
             asyncio.create_task(serve_echo(b.backend, "fused", name="jobs", heartbeat_interval=0.1, stop=stop))]
    try:
        await wait_workers(b, 2)
        return await replay(original, b.frontend, speed=4.0, drain_s=5.0, **kw)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


def _overtakes(path) -> int:
    """Requests of a session or job sent before the answer to the previous one came back (in a capture)."""
    plan, _ = load_plan(path)
    last: dict = {}
    n = 0
    for p in plan:
        prev = last.get(p.chain)
        if prev is not None and prev.awaits_answer and p.msg["type"] != "cancel":
            if prev.answered_at is None or prev.answered_at > p.t:
                n += 1
        last[p.chain] = p
    return n


def test_causal_replay_at_speed_4_gets_every_answer_without_bad_sequence(make_broker, tmp_path):
    """At 4x the recorded pace a loaded target answers later than the recorded think times: open loop, chunks
    overtake their predecessors and closes overtake last results. Causal replay waits for each answer first."""
    original, again = tmp_path / "a.capture", tmp_path / "b.capture"
    first = run_async(_record_sessions(make_broker(capture=str(original)), original), timeout=60)
    b = make_broker(capture=str(again))
    report = run_async(_replay_on_slow_target(b, original), timeout=90)
    b.stop()
    assert report["mode"] == "causal"
    assert report["sent"] == sum(first["client_messages"].values())
    assert report["errors"] == 0 and "bad_sequence" not in report["error_codes"] and report["busy"] == 0
    assert report["answered"] == report["sent"] - first["client_messages"]["session_close"]  # every answer
    assert not report["warnings"]
    assert _overtakes(again) == 0  # every request left after the answer to its session's previous one
    second = summarize(again)
    assert second["sessions"] == 4 and second["jobs"] == 2


@pytest.mark.slow
def test_open_loop_replay_keeps_recorded_times_whatever_the_answers(make_broker, tmp_path):
    original, again = tmp_path / "a.capture", tmp_path / "b.capture"
    run_async(_record_sessions(make_broker(capture=str(original)), original), timeout=60)
    b = make_broker(capture=str(again))
    report = run_async(_replay_on_slow_target(b, original, open_loop=True), timeout=90)
    b.stop()
    assert report["mode"] == "open_loop" and report["sent"] == len(load_plan(original)[0])
    assert _overtakes(again) > 0  # 24 chunks a few ms apart against a target that answers 40 ms late


def test_load_plan_finds_each_requests_recorded_answer(tmp_path):
    from broker.capture import CaptureWriter
    from protocol.codec import encode
    from protocol.messages import Result, SessionClose, SessionOpen, SessionOpened, Verify

    path = tmp_path / "a.capture"
    w = CaptureWriter(path)
    sent = [("in", SessionOpen(session="s", prompt_ids=[1])), ("out", SessionOpened(session="s", pos=1)),
            ("in", Verify(session="s", seq=0, pos=1, tokens=[2])),
            ("in", Verify(session="s", seq=0, pos=1, tokens=[2])),  # a resend while the first is in flight
            ("out", Result(session="s", seq=0, accepted=1, tokens=[2, 3], pos=3)), ("in", SessionClose(session="s"))]
    for direction, msg in sent:
        w.tap(direction, "frontend", b"p", encode(msg))
    w.close()
    plan, _ = load_plan(path)
    assert [p.msg["type"] for p in plan] == ["session_open", "verify", "verify", "session_close"]
    opened, chunk, resend, close = plan
    assert opened.answered_at is not None and opened.answered_at <= chunk.t
    assert chunk.answered_at is not None and chunk.answered_at >= resend.t
    assert resend.answered_at is None  # the broker drops a resend of a chunk in flight: it has no answer of its own
    assert close.answered_at is None and not close.awaits_answer
    assert len({p.chain for p in plan}) == 1

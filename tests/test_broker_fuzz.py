"""Thousands of generated malformed frames at both broker sockets; afterwards a well-formed session completes."""
from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.client import BrokerClient, wait_for
from conftest import run_async, wait_until
from protocol.messages import MESSAGE_TYPES, Result, SessionOpen, SessionOpened, Verify
from workers.echo_worker import serve_echo

FIELD_NAMES = sorted({f for cls in MESSAGE_TYPES.values() for f in cls.__dataclass_fields__} | {"bogus"})
scalars = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.binary(max_size=12))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                                         max_size=3), max_leaves=8)
messages = st.builds(
    lambda v, t, fields: msgpack.packb({"v": v, "type": t, **fields}, use_bin_type=True),
    st.sampled_from([1, 1, 1, 0, 2, "1", True, None]),
    st.sampled_from(sorted(MESSAGE_TYPES) + ["bogus", ""]),
    st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=6),
)
frames = st.lists(st.binary(max_size=48) | messages | values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
                  min_size=1, max_size=3)


@pytest.mark.slow
def test_fuzzed_frames_then_a_session_completes(broker):
    ctx = zmq.Context.instance()
    socks = {}
    for side, addr in (("frontend", broker.frontend), ("backend", broker.backend)):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(addr)
        socks[side] = s
    sent = {"n": 0}

    @settings(max_examples=2000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(side=st.sampled_from(["frontend", "backend"]), parts=frames)
    def fuzz(side, parts):
        socks[side].send_multipart(parts)
        sent["n"] += 1

    try:
        fuzz()
        # everything sent was read and answered or counted before we go on
        assert wait_until(lambda: sum(broker.snapshot()["counters"]["msgs_in"].values()) >= sent["n"], 30)
    finally:
        for s in socks.values():
            s.close()
    counters = broker.snapshot()["counters"]
    assert sent["n"] >= 1000
    assert sum(counters["errors"].values()) > 0

    async def session():
        # fuzzed Ready frames may have registered bogus workers; they die by missed heartbeats
        assert await wait_for(lambda: not broker.snapshot()["workers"], 10)
        stop = asyncio.Event()
        worker = asyncio.create_task(serve_echo(broker.backend, "target", heartbeat_interval=0.1, liveness=10,
                                                stop=stop))
        try:
            async with BrokerClient(broker.frontend) as c:
                assert await wait_for(lambda: len(broker.snapshot()["workers"]) == 1, 5)
                opened = await c.request(SessionOpen(session="s", prompt_ids=[1, 2, 3]))
                assert isinstance(opened, SessionOpened)
                pos = opened.pos
                for seq in range(5):
                    r = await c.request(Verify(session="s", seq=seq, pos=pos, tokens=[4, 5]))
                    assert isinstance(r, Result) and r.accepted == 2
                    pos = r.pos
                assert pos == 3 + 5 * 3
        finally:
            stop.set()
            await asyncio.wait_for(worker, 5)

    run_async(session(), 30)

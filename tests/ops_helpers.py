"""Helpers shared by the operations tests (metrics, capture, replay, CURVE): echo workers and client traffic."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from broker.client import BrokerClient, wait_for
from protocol.messages import Done, Generate, Result, SessionClose, SessionOpen, SessionOpened, Verify
from workers.echo_worker import serve_echo


@asynccontextmanager
async def echo_workers(backend: str, *kinds: str, heartbeat_interval: float = 0.1) -> AsyncIterator[None]:
    """Run one in-process echo worker per kind ("target" / "fused") until the block ends."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(serve_echo(backend, kind, capacity=64, name=f"echo-{kind}{i}",
                                            heartbeat_interval=heartbeat_interval, stop=stop))
             for i, kind in enumerate(kinds)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


async def wait_workers(broker_thread, n: int, timeout: float = 10.0) -> None:
    if not await wait_for(lambda: len(broker_thread.snapshot()["workers"]) >= n, timeout):
        raise AssertionError(f"{n} workers did not register")


async def wait_settled(broker_thread, timeout: float = 5.0) -> None:
    """Wait until the broker holds no session and no job: the client's fire-and-forget closes have landed."""
    def settled() -> bool:
        snap = broker_thread.snapshot()
        return not snap["sessions"] and not snap["jobs"]

    if not await wait_for(settled, timeout):
        raise AssertionError(f"broker still holds work: {broker_thread.snapshot()['counters']}")


async def drive(client: BrokerClient, sessions: int = 4, chunks: int = 5, jobs: int = 2, tag: str = "s",
                gap_s: float = 0.0) -> dict:
    """Open ``sessions`` sessions, send ``chunks`` verify chunks each, close them; run ``jobs`` generate jobs."""

    async def one(i: int) -> int:
        sid = f"{tag}{i}"
        opened = await client.request(SessionOpen(session=sid, prompt_ids=[1, 2, 3]))
        assert isinstance(opened, SessionOpened), opened
        pos = opened.pos
        for seq in range(chunks):
            res = await client.request(Verify(session=sid, seq=seq, pos=pos, tokens=[5, 6]))
            assert isinstance(res, Result), res
            pos = res.pos
            if gap_s:
                await asyncio.sleep(gap_s)
        await client.send(SessionClose(session=sid))
        return chunks

    async def job(i: int) -> int:
        last = None
        async for msg in client.generate(Generate(job=f"{tag}j{i}", prompt="hi", max_new_tokens=3)):
            last = msg
        assert isinstance(last, Done), last
        return 1

    done = await asyncio.gather(*[one(i) for i in range(sessions)], *[job(i) for i in range(jobs)])
    return {"chunks": sum(done[:sessions]), "jobs": sum(done[sessions:])}

"""Timed waits that keep their cancels.

``asyncio.wait_for`` before Python 3.12 returns the result, and drops the cancel, when the awaited thing completes
in the same loop step as a cancel of the caller: a loop told to stop then runs on as if never told (a gateway's
stop and a client's heartbeat loop, cancelled while it sent a beat, each hung a close this way). Every timed wait
in the broker, the workers and the gateway goes through ``within``. ``asyncio.timeout`` (3.11+) has no such race and costs one timer instead of a task per call.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable


async def within(aw: Awaitable[Any], timeout: float) -> Any:
    """``await aw`` for at most ``timeout`` seconds; ``asyncio.TimeoutError`` past it (which is ``TimeoutError``
    on 3.11+). On Python 3.10 this falls back to ``wait_for``, race included."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            return await aw
    return await asyncio.wait_for(aw, timeout)  # pragma: no cover - Python 3.10

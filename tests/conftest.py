"""Shared fixtures: free ports, an in-process broker (thread), echo workers, and an asyncio runner with a timeout."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Coroutine

import pytest

from broker.state import BrokerConfig


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def run_async(coro: Coroutine, timeout: float = 30.0) -> Any:
    """Run a coroutine to completion with a hard timeout (tests never hang)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` from synchronous test code until it holds or ``timeout`` passes; returns whether it held.

    The blocking twin of ``broker.client.wait_for``: tests wait on a condition, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class BrokerThread:
    """A real broker serving on random loopback ports from a background thread; ``stop()`` always joins."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.broker = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="broker", daemon=True)

    def _main(self) -> None:
        from broker.broker import Broker

        async def main() -> None:
            self.broker = Broker(self.config)
            self._ready.set()
            await self.broker.run()

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self._ready.set()

    def start(self) -> "BrokerThread":
        self._thread.start()
        if not self._ready.wait(10) or self.broker is None:
            raise RuntimeError(f"broker did not start: {self.error!r}")
        return self

    @property
    def frontend(self) -> str:
        return self.broker.frontend_endpoint

    @property
    def backend(self) -> str:
        return self.broker.backend_endpoint

    def snapshot(self) -> dict:
        """A stats snapshot read across threads (fine for tests: dict reads of plain state)."""
        return self.broker.stats_snapshot()

    def stop(self, timeout: float = 10.0) -> None:
        if self.broker is not None:
            self.broker.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("broker thread did not stop")
        if self.error is not None:
            raise self.error


TEST_CONFIG = BrokerConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", heartbeat_interval=0.1,
                           liveness=5, grace_s=1.0, retry_ms=5)


@pytest.fixture
def make_broker() -> Callable[..., BrokerThread]:
    """Factory: ``make_broker(router="rr", max_queue=2)`` starts a broker with short heartbeats; all are stopped."""
    started: list[BrokerThread] = []

    def make(**overrides: Any) -> BrokerThread:
        b = BrokerThread(replace(TEST_CONFIG, **overrides)).start()
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(make_broker) -> BrokerThread:
    """A running broker with the test config (heartbeat 0.1 s, liveness 5)."""
    return make_broker()


@pytest.fixture
def patient_broker(make_broker) -> BrokerThread:
    """Generous liveness for tests that run model workers in-process: a loaded CI box must not make the broker
    declare a worker dead mid-test while a forward holds the event loop."""
    return make_broker(heartbeat_interval=0.2, liveness=25)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add contention on a shared CPU (10x slower here). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; torch is imported only by modules that ask."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

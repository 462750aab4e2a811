"""``specmq up``: starts broker + workers as subprocesses, prints ready, serves, stops cleanly on SIGTERM."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from broker.client import BrokerClient
from protocol.messages import Done, Generate, SessionOpen, SessionOpened
from tests.conftest import free_endpoint, run_async
from tests.model_fixtures import tiny_pair  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # real processes
ROOT = Path(__file__).resolve().parents[1]


def _start(*args: str) -> tuple[subprocess.Popen, "queue.Queue[str]"]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "specmq", "up", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=lambda s=stream: [lines.put(x) for x in s], daemon=True).start()
    return proc, lines


def _wait_line(lines: "queue.Queue[str]", needle: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} in {timeout}s; last lines: {seen[-10:]}")


def test_up_starts_serves_and_stops_on_sigterm(tiny_pair):
    front, back = free_endpoint(), free_endpoint()
    proc, lines = _start("--frontend", front, "--backend", back, "--targets", "1", "--fused", "1",
                         "--target-model", str(tiny_pair.target), "--draft-model", str(tiny_pair.draft),
                         "--slots", "2", "--jobs", "2", "--ready-timeout", "100")
    try:
        ready = _wait_line(lines, "specmq up: ready", 120)
        assert front in ready and back in ready

        async def use():
            async with BrokerClient(front, timeout=30) as client:
                opened = await client.request(SessionOpen(session="s", prompt_ids=[1, 5, 6], max_new_tokens=4))
                msgs = [m async for m in client.generate(Generate(job="j", prompt="Once upon", max_new_tokens=5))]
                return opened, msgs[-1]

        opened, done = run_async(use(), 60)
        assert isinstance(opened, SessionOpened) and opened.pos == 3
        assert isinstance(done, Done) and len(done.token_ids) == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_up_fails_in_one_line_when_a_worker_cannot_start(tmp_path):
    proc, lines = _start("--frontend", free_endpoint(), "--backend", free_endpoint(), "--targets", "1",
                         "--fused", "0", "--target-model", str(tmp_path / "missing"), "--ready-timeout", "100")
    try:
        assert proc.wait(100) == 1
        line = _wait_line(lines, "specmq up:", 5)
        assert "target0 exited with code 1" in line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

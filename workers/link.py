"""The worker side of the specmq protocol: one DEALER to the broker's backend, liveness, credit, reconnects.

Model workers (target, fused) and ``workers.echo_worker`` build on this; it never imports torch.

Usage::

    ready = Ready(kind="target", model="llama-68m", capacity=64, vocab_size=32000, worker="gpu0")
    async with WorkerLink("tcp://127.0.0.1:5556", ready, stats=lambda: {"tick_ms": 3.1}) as link:
        link.grant(64)                        # Credit: how many requests the broker may forward now
        while True:
            for msg in await link.recv_batch():   # or: msg = await link.recv(timeout=1.0)
                if isinstance(msg, Disconnect):   # the link re-registered: every session/job is gone
                    forget_everything()
                elif isinstance(msg, Verify):
                    ...
                    await link.send(Result(...))  # or link.send_nowait(msg) from sync code
                    link.grant(1)                 # one request finished: one more credit

API
- ``WorkerLink(broker, ready, *, heartbeat_interval=HEARTBEAT_INTERVAL_S, liveness=HEARTBEAT_LIVENESS, stats=None,
  initial_credit=None)`` (the liveness constants of ``protocol.messages``):
  ``stats`` is a zero-argument callable whose dict goes into every ``Heartbeat.stats`` (``tick_ms``,
  ``batch_rows``, ``slots_used``...). ``initial_credit`` (default: none) is granted after every (re)registration.
- ``await link.start()`` / ``await link.close()`` (or ``async with``): connect + Ready + heartbeat task /
  Disconnect + close. ``close`` is idempotent.
- ``await link.recv(timeout=None)`` -> one request message (``SessionOpen``, ``Verify``, ``SessionClose``,
  ``Generate``, ``Error``...) or ``None`` on timeout. ``await link.recv_batch(max_n=256, timeout=None)`` -> all
  waiting messages (at least one unless the timeout passed): a verifier wants many chunks per tick.
  Heartbeats are consumed by the link. A ``Disconnect`` is handed to the caller only after the link has
  reconnected and re-registered (broker restart, or the broker forgot us): drop all sessions and jobs.
- ``await link.send(msg)`` / ``link.send_nowait(msg)`` (False when the socket would block) / ``link.grant(n)``.
- ``link.abort()``: vanish without Disconnect (simulates a crash).
- ``link.reconnects``: how many times the link re-registered. ``link.connected_at``: time of the last Ready.
- ``link.incarnation``: the id of the current registration (``Ready.incarnation``), new on every (re)registration.
  Every request the broker forwards carries it (``msg.incarnation``); every answer must echo the incarnation of the
  request it answers (``Result(..., incarnation=verify.incarnation)``), never ``link.incarnation``: the broker drops
  answers of an earlier registration, so a tick that finishes after a reconnect cannot answer for the new one.

Liveness: the link heartbeats every ``heartbeat_interval``; when nothing arrives from the broker for
``liveness`` intervals, or the broker answers ``Disconnect``, it closes the socket, opens a fresh one (new
identity) and sends Ready again, as Majordomo workers do.
"""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from typing import Any, Callable

import structlog
import zmq

from broker.waits import within
from protocol.codec import encode
from protocol.errors import ProtocolError
from protocol.frames import NOBLOCK, parse, raw_recv, raw_send, to_message
from protocol.messages import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, Credit, Disconnect, Heartbeat, Message, Ready

log = structlog.get_logger("worker.link")


def echo_incarnation(request: Message, replies: list[Message]) -> list[Message]:
    """Stamp ``request``'s incarnation on its ``replies`` (in place; returns them): an answer carries the
    registration its request came under, so the broker can drop it if the link has re-registered since."""
    inc = getattr(request, "incarnation", 0)
    for reply in replies:
        reply.incarnation = inc
    return replies


class WorkerLink:
    def __init__(self, broker: str, ready: Ready, *, heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
                 liveness: int = HEARTBEAT_LIVENESS, stats: Callable[[], dict] | None = None,
                 initial_credit: int | None = None,
                 ctx: zmq.Context | None = None, max_frame: int = 1 << 24) -> None:
        self.broker = broker
        self.ready = ready
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.stats = stats
        self.initial_credit = initial_credit
        self.ctx = ctx or zmq.Context.instance()
        self.max_frame = max_frame
        self.reconnects = 0
        self.connected_at = 0.0
        self.incarnation = 0  # picked afresh by every _connect
        self.sock: zmq.Socket | None = None
        self._last_heard = 0.0
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._beat_task: asyncio.Task | None = None
        self._pending: list[Message] = []
        self._closed = False
        self.log = log.bind(kind=ready.kind, worker=ready.worker)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> "WorkerLink":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._connect()
        self._beat_task = asyncio.create_task(self._heartbeat_loop())

    async def close(self, reason: str = "stopping") -> None:
        if self._closed:
            return
        self._closed = True
        if self._beat_task is not None:
            self._beat_task.cancel()
            try:
                await self._beat_task
            except (asyncio.CancelledError, Exception):
                pass
        if self.sock is not None:
            try:
                self.sock.send(encode(Disconnect(reason=reason)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._disconnect_socket(linger=500)

    def abort(self) -> None:
        """Vanish without Disconnect, as a crashed worker would (tests: heartbeat expiry, redelivery)."""
        self._closed = True
        if self._beat_task is not None:
            self._beat_task.cancel()
        self._disconnect_socket()

    def _connect(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(self.broker)
        self.sock = sock
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._wake.set)
        self._wake.set()
        self._last_heard = time.monotonic()
        self.connected_at = self._last_heard
        self.incarnation = secrets.randbits(62) or 1
        sock.send(encode(dataclasses.replace(self.ready, incarnation=self.incarnation)))  # queued until connected
        if self.initial_credit:
            sock.send(encode(Credit(n=self.initial_credit)))
        self.log.info("link.ready", broker=self.broker, reconnects=self.reconnects, incarnation=self.incarnation)

    def _disconnect_socket(self, linger: int = 0) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            self._loop.remove_reader(sock.getsockopt(zmq.FD))
        except Exception:
            pass
        sock.close(linger=linger)

    def _reconnect(self, why: str) -> None:
        self.log.warning("link.reconnect", why=why)
        self._disconnect_socket()
        self.reconnects += 1
        self._connect()
        self._pending.append(Disconnect(reason=f"reconnected: {why}"))

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.heartbeat_interval)
            # read what the broker sent even while the worker's own coroutine is busy (a long forward in a
            # thread): its heartbeats sitting unread in our socket mean it is alive. Without this, one slow step
            # (a first prefill of 64 jobs) made the worker call the broker silent, reconnect, and lose its jobs
            # to redelivery.
            self._drain(1 << 30)
            if time.monotonic() - self._last_heard > self.heartbeat_interval * self.liveness:
                self._reconnect("broker silent")
                continue
            stats = self.stats() if self.stats is not None else {}
            self.send_nowait(Heartbeat(stats=stats))

    # ------------------------------------------------------------------ receive
    def _drain(self, max_n: int) -> None:
        """Read every waiting frame without blocking; handle liveness messages here."""
        sock = self.sock
        while sock is not None and len(self._pending) < max_n:
            try:
                frame = raw_recv(sock, NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            try:
                msg = to_message(parse(frame, self.max_frame))  # same verdicts as codec.decode, faster
            except ProtocolError as exc:
                self.log.warning("link.bad_frame", code=exc.code, reason=exc.message)
                continue
            if isinstance(msg, Heartbeat):
                continue
            if isinstance(msg, Disconnect):
                self._reconnect(f"broker said: {msg.reason}")
                return
            self._pending.append(msg)

    async def recv_batch(self, max_n: int = 256, timeout: float | None = None) -> list[Message]:
        """Every waiting message (up to ``max_n``); waits for at least one unless ``timeout`` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._drain(max_n)
            if self._pending:
                out, self._pending = self._pending[:max_n], self._pending[max_n:]
                return out
            if self.sock is not None and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                continue
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                try:
                    await within(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    return []

    async def recv(self, timeout: float | None = None) -> Message | None:
        """One message, or None when ``timeout`` passes."""
        got = await self.recv_batch(1, timeout)
        return got[0] if got else None

    # ------------------------------------------------------------------ send
    def send_nowait(self, msg: Message) -> bool:
        return self.send_raw_nowait(encode(msg))

    def send_raw_nowait(self, body: bytes) -> bool:
        if self.sock is None:
            return False
        try:
            raw_send(self.sock, body, NOBLOCK)
            return True
        except zmq.Again:
            return False

    async def send(self, msg: Message, timeout: float = 5.0) -> bool:
        """Send, waiting (politely) while the socket is full or not yet connected. False after ``timeout``."""
        body = encode(msg)
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while not self.send_raw_nowait(body):
            if time.monotonic() >= deadline:
                self.log.warning("link.send_timeout", type=msg.TYPE)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    def grant(self, n: int) -> None:
        """Tell the broker it may forward ``n`` more requests."""
        if n > 0:
            self.send_nowait(Credit(n=n))

"""Async DEALER client of the broker's frontend, for draft workers and generate clients (no torch).

    async with BrokerClient("tcp://127.0.0.1:5555") as client:
        opened = await client.request(SessionOpen(session="s1", prompt_ids=[1, 2, 3]))
        result = await client.request(Verify(session="s1", seq=0, pos=3, tokens=[7, 8]))
        async for msg in client.generate(Generate(job="j1", prompt="hello")):
            ...  # Tokens..., then Done (or Error)

``request`` matches the reply by (session, seq) or job, waits out ``Busy`` (sleeping its retry hint) and resends
on timeout (safe: the broker answers a retried chunk from its cache). ``Reopen`` for a session is returned to the
caller, who re-sends ``SessionOpen`` with every committed token. Replies nobody waits for land in ``recv()``.

``request_stats(frontend, timeout_s)`` is the one-shot, synchronous stats request (no event loop): readiness
checks of local clusters and benchmarks, and ``specmq replay``'s probe; ``BrokerClient.stats`` is the same
question on a client that is already connected.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import structlog
import zmq
import zmq.asyncio

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.frames import NOBLOCK, parse, raw_recv, to_message
from protocol.messages import (Busy, Cancel, Done, Error, Generate, Message, Reopen, SessionOpen, Stats, StatsRequest,
                               Verify)

log = structlog.get_logger("broker.client")

READ_BATCH = 256  # most frames handled per wakeup of the reader
STATS_MAX_FRAME = 1 << 26  # a snapshot of a big deployment (many workers, many counters) is larger than a request


def reply_key(msg: Any) -> tuple:
    """The waiter a reply belongs to: ('j', job), ('s', session, seq) or ('stats',)."""
    job = getattr(msg, "job", "")
    if job:
        return ("j", job)
    if isinstance(msg, (Stats, StatsRequest)):
        return ("stats",)
    session = getattr(msg, "session", "")
    if isinstance(msg, SessionOpen):
        return ("s", session, -1)
    if isinstance(msg, Verify):
        return ("s", session, msg.seq)
    return ("s", session, getattr(msg, "seq", -1))


class BrokerClient:
    def __init__(self, address: str = "tcp://127.0.0.1:5555", *, identity: bytes | None = None,
                 timeout: float = 5.0, ctx: zmq.asyncio.Context | None = None, curve_secret: str | None = None,
                 curve_server: str | None = None, curve_public: str | None = None) -> None:
        """``curve_secret`` (own NAME.key_secret) + ``curve_server`` (broker's public key file): CURVE-encrypted,
        for a broker started with ``--curve-secret``; a refused handshake shows in ``handshake_error``."""
        self.address = address
        self.curve = (curve_secret, curve_server, curve_public) if curve_secret or curve_server else None
        self.handshake_error = ""
        self._monitor_task: asyncio.Task | None = None
        self.identity = identity
        self.timeout = timeout
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._waiters: dict[tuple, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "BrokerClient":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        if self.identity:
            self.sock.setsockopt(zmq.IDENTITY, self.identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            from broker.curve import CurveError, apply_client

            secret, server, public = self.curve
            if not (secret and server):
                self.sock.close(linger=0)
                self.sock = None
                raise CurveError("CURVE needs both the client's secret key file and the broker's public key file")
            try:
                apply_client(self.sock, secret, server, public)
            except CurveError:
                self.sock.close(linger=0)
                self.sock = None
                raise
            events = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL \
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED
            self._monitor_task = asyncio.create_task(self._watch_handshake(self.sock.get_monitor_socket(events)))
        self.sock.connect(self.address)
        self._reader = asyncio.create_task(self._read_loop())

    async def _watch_handshake(self, mon: zmq.asyncio.Socket) -> None:
        from zmq.utils.monitor import parse_monitor_message

        try:
            while True:
                ev = parse_monitor_message(await mon.recv_multipart())
                if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.handshake_error = ""
                elif ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self.handshake_error = f"the broker refused this client's CURVE key (status {ev['value']})"
                else:
                    self.handshake_error = "CURVE handshake failed (wrong broker public key, or the broker has no CURVE?)"
                if self.handshake_error:
                    log.warning("client.handshake_failed", reason=self.handshake_error)
        finally:
            mon.close(linger=0)

    async def close(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            try:
                await self._monitor_task
            except (asyncio.CancelledError, Exception):
                pass
            self._monitor_task = None
            if self.sock is not None:
                try:
                    self.sock.disable_monitor()
                except zmq.ZMQError:
                    pass
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    async def _read_loop(self) -> None:
        # One awaited recv per wakeup, then every frame already waiting straight off the same socket: a client
        # streaming many jobs (the HTTP gateway) pays the asyncio future machinery once per burst, not per frame.
        direct = zmq.Socket.shadow(self.sock.underlying)
        while True:
            frames = [await self.sock.recv()]
            while len(frames) < READ_BATCH:
                try:
                    frames.append(raw_recv(direct, NOBLOCK))
                except zmq.Again:
                    break
            for frame in frames:
                try:
                    msg = to_message(parse(frame, STATS_MAX_FRAME))  # codec.decode's verdicts, hot types faster
                except ProtocolError as exc:
                    log.warning("client.bad_frame", code=exc.code, reason=exc.message)
                    continue
                self._deliver(msg)

    def _deliver(self, msg: Message) -> None:
        if isinstance(msg, Reopen):  # wakes every waiter of that session
            hit = False
            for key, q in self._waiters.items():
                if key[0] == "s" and key[1] == msg.session:
                    q.put_nowait(msg)
                    hit = True
            if not hit:
                self.inbox.put_nowait(msg)
            return
        q = self._waiters.get(reply_key(msg))
        (q or self.inbox).put_nowait(msg)

    async def send(self, msg: Message) -> None:
        await self.sock.send(encode(msg))

    async def _send_bounded(self, msg: Message, timeout: float) -> None:
        """``send`` that cannot hang: with no connected peer (e.g. a refused CURVE handshake) a DEALER send blocks;
        then give up after ``timeout`` and let the caller's reply timeout and retries decide."""
        # Always bounded: the socket can be writable when checked and lose its only peer a moment later (a CURVE
        # handshake refused), and then a send waits forever.
        try:
            await asyncio.wait_for(self.send(msg), timeout)
        except asyncio.TimeoutError:
            pass

    async def send_raw(self, frames: list[bytes] | bytes) -> None:
        """Send arbitrary frames (tests of bad input)."""
        if isinstance(frames, bytes):
            frames = [frames]
        await self.sock.send_multipart(frames)

    async def recv(self, timeout: float | None = None) -> Message | None:
        """Next reply that no ``request`` waits for; None on timeout."""
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout if timeout is not None else self.timeout)
        except asyncio.TimeoutError:
            return None

    async def request(self, msg: Message, *, timeout: float | None = None, retries: int = 3,
                      busy_retries: int = 100) -> Message:
        """Send ``msg`` and return its reply; retries on Busy (after its hint) and on timeout (resend).

        Raises ``TimeoutError`` when every try timed out.
        """
        key = reply_key(msg)
        q: asyncio.Queue = asyncio.Queue()
        self._waiters[key] = q
        timeout = timeout if timeout is not None else self.timeout
        try:
            tries = busies = 0
            await self._send_bounded(msg, timeout)
            while True:
                try:
                    reply = await asyncio.wait_for(q.get(), timeout)
                except asyncio.TimeoutError:
                    tries += 1
                    if tries > retries:
                        why = f": {self.handshake_error}" if self.handshake_error else ""
                        raise TimeoutError(f"no reply to {msg.TYPE} {key} after {tries} tries{why}") from None
                    await self._send_bounded(msg, timeout)
                    continue
                if isinstance(reply, Busy) and busies < busy_retries:
                    busies += 1
                    await asyncio.sleep(max(reply.retry_ms, 1) / 1000)
                    await self._send_bounded(msg, timeout)
                    continue
                return reply
        finally:
            self._waiters.pop(key, None)

    async def generate(self, job: Generate, timeout: float | None = None, *,
                       retry_busy: bool = True) -> AsyncIterator[Message]:
        """Send a generate job and yield its Tokens, then the final Done or Error.

        ``retry_busy=False`` yields a ``Busy`` and stops (the caller passes the backpressure on, as an HTTP 429)
        instead of waiting out its retry hint and resending."""
        key = reply_key(job)
        q: asyncio.Queue = asyncio.Queue()
        self._waiters[key] = q
        timeout = timeout if timeout is not None else self.timeout
        try:
            await self.send(job)
            while True:
                try:
                    msg = q.get_nowait()  # a streaming job usually has its next message waiting: no timer needed
                except asyncio.QueueEmpty:
                    try:
                        msg = await _get(q, timeout)
                    except asyncio.TimeoutError:
                        raise TimeoutError(f"job {job.job!r}: nothing for {timeout}s") from None
                if isinstance(msg, Busy) and retry_busy:
                    await asyncio.sleep(max(msg.retry_ms, 1) / 1000)
                    await self.send(job)
                    continue
                yield msg
                if isinstance(msg, (Done, Error, Busy)):
                    return
        finally:
            self._waiters.pop(key, None)

    async def cancel(self, job: str, reason: str = "") -> None:
        """Tell the broker nobody waits for ``job`` any more (it frees the job's worker slot); no answer comes."""
        await self._send_bounded(Cancel(job=job, reason=reason), min(self.timeout, 1.0))

    def fail_jobs(self, code: str, message: str) -> int:
        """End every ``generate`` waiting on this client with a local ``Error(code)`` (the broker is gone, say);
        returns how many were waiting."""
        keys = [k for k in self._waiters if k[0] == "j"]
        for key in keys:
            self._waiters[key].put_nowait(Error(code=code, message=message, job=key[1]))
        return len(keys)

    async def stats(self, timeout: float | None = None, retries: int = 3) -> dict:
        """One stats snapshot; ``TimeoutError`` when ``retries + 1`` tries of ``timeout`` each went unanswered."""
        reply = await self.request(StatsRequest(), timeout=timeout, retries=retries)
        if not isinstance(reply, Stats):
            raise ProtocolError("bad_reply", f"expected stats, got {reply.TYPE}")
        return reply.snapshot


def request_stats(frontend: str, timeout_s: float = 0.5, *, curve: dict | None = None) -> dict | None:
    """One stats snapshot from the broker's frontend on a throwaway DEALER, or None when none came within
    ``timeout_s`` (broker down, still starting, or a refused CURVE handshake). ``curve``: ``BrokerClient``'s CURVE
    keyword arguments (``broker.curve.client_kwargs``); empty or None for plain TCP."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if curve:
            from broker.curve import apply_client

            apply_client(sock, curve["curve_secret"], curve["curve_server"], curve.get("curve_public"))
        sock.connect(frontend)
        sock.send(encode(StatsRequest()), zmq.NOBLOCK)  # zmq.Again (no pipe to queue on): no answer
        if not sock.poll(int(timeout_s * 1000)):
            return None
        try:
            msg = decode(sock.recv(), max_frame=STATS_MAX_FRAME)
        except ProtocolError:
            return None
        return msg.snapshot if isinstance(msg, Stats) else None
    except zmq.Again:
        return None
    finally:
        sock.close(linger=0)


async def _get(q: asyncio.Queue, timeout: float) -> Any:
    """``q.get()`` within ``timeout``: ``asyncio.timeout`` (one timer) where Python has it, else ``wait_for`` (a task
    per call, which a stream of thousands of messages a second feels)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            return await q.get()
    return await asyncio.wait_for(q.get(), timeout)


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; helper for tests and scripts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())

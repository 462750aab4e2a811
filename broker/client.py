"""Async DEALER client of the broker's frontend, for draft workers and generate clients (no torch).

    async with BrokerClient("tcp://127.0.0.1:5555") as client:
        opened = await client.request(SessionOpen(session="s1", prompt_ids=[1, 2, 3]))
        result = await client.request(Verify(session="s1", seq=0, pos=3, tokens=[7, 8]))
        async for msg in client.generate(Generate(job="j1", prompt="hello")):
            ...  # Tokens..., then Done (or Error)

``request`` matches the reply by (session, seq) or job, waits out ``Busy`` (sleeping its retry hint) and resends
on timeout (safe: the broker answers a retried chunk from its cache). ``Reopen`` for a session is returned to the
caller, who re-sends ``SessionOpen`` with every committed token. Replies nobody waits for land in ``recv()``.

Liveness (protocol/FLOW.md, "Clients"): while anything waits for an answer the client heartbeats the broker every
``heartbeat_interval``; every reply and heartbeat answer carries the broker's instance id (``broker_id``). A new id
means a restarted broker that knows none of our sessions: every waiting ``Verify`` gets a ``Reopen`` (the caller
re-opens from its committed tokens) and every other request or job is sent again. Silence for ``liveness`` beats
marks the broker lost; when the same instance answers again, whatever is in flight is sent again (idempotent).
With a ``deadline`` (``request``) or ``queue_timeout`` (``generate``), ``Busy`` and transient errors
(``protocol.errors.RETRYABLE``: a draining or just-restarted broker) are retried with jittered exponential back-off
until it passes: overload and restarts cost time, only a passed deadline fails a request.

``request_stats(frontend, timeout_s)`` is the one-shot, synchronous stats request (no event loop): readiness
checks of local clusters and benchmarks, and ``specmq replay``'s probe; ``BrokerClient.stats`` is the same
question on a client that is already connected.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Any, AsyncIterator

import structlog
import zmq
import zmq.asyncio

from broker.curve import HANDSHAKE_EVENTS, HandshakeRefused, client_handshake_failure
from broker.waits import within
from protocol import errors as E
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.frames import NOBLOCK, parse, raw_recv, to_message
from protocol.messages import (HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, Busy, Cancel, Done, Error, Generate,
                               Heartbeat, Message, Reopen, SessionOpen, Stats, StatsRequest, Tokens, Verify)

log = structlog.get_logger("broker.client")

READ_BATCH = 256  # most frames handled per wakeup of the reader
STATS_MAX_FRAME = 1 << 26  # a snapshot of a big deployment (many workers, many counters) is larger than a request
FIRST_BACKOFF_S = 0.05  # first wait after a transient error (Busy brings its own hint)


class _Signal:
    """A local wake-up put in a waiter's queue; never on the wire."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


BROKER_RESTARTED = _Signal("broker_restarted")  # a new broker instance answered: it knows nothing in flight
BROKER_BACK = _Signal("broker_back")  # the same broker answered after a silence: what was in flight may be lost


def backoff_s(attempt: int, first_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Jittered exponential back-off: ``first_s * 2**attempt`` capped at ``cap_s``, times a uniform factor in
    [0.5, 1.5), so that many clients refused at the same moment do not all come back at the same moment."""
    base = min(cap_s, first_s * 2.0 ** min(attempt, 30))
    return base * (0.5 + (rng or random).random())


def transient(reply: Any) -> bool:
    """A refusal worth retrying later: ``Busy`` or an error in ``protocol.errors.RETRYABLE``."""
    return isinstance(reply, Busy) or (isinstance(reply, Error) and reply.code in E.RETRYABLE)


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
                 curve_server: str | None = None, curve_public: str | None = None,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL_S, liveness: int = HEARTBEAT_LIVENESS) -> None:
        """``heartbeat_interval`` / ``liveness``: how often to heartbeat the broker while requests wait, and after
        how many silent beats it counts as lost (see the module docstring).

        ``curve_secret`` (own NAME.key_secret) + ``curve_server`` (broker's public key file): CURVE-encrypted,
        for a broker started with ``--curve-secret``. With or without CURVE, a refused handshake shows in
        ``handshake_error`` (``broker.curve.client_handshake_failure``: why, in words) and sets ``handshake_refused``.
        """
        self.address = address
        self.curve = (curve_secret, curve_server, curve_public) if curve_secret or curve_server else None
        self.handshake_error = ""
        self.handshake_refused = asyncio.Event()  # set while the last handshake failed (``probe`` ends at once)
        self._monitor_task: asyncio.Task | None = None
        self.identity = identity
        self.timeout = timeout
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._waiters: dict[tuple, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.broker_id = ""  # instance id of the broker last heard from
        self.restarts = 0  # times a new broker instance answered
        self.silences = 0  # times the broker went silent for ``liveness`` beats while requests waited
        self.broker_silent = False
        self.last_heard = 0.0  # monotonic time of the last frame from the broker
        self._beat_task: asyncio.Task | None = None

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
        # plain clients too: a broker that requires CURVE refuses them, and they should say so
        self._monitor_task = asyncio.create_task(self._watch_handshake(self.sock.get_monitor_socket(HANDSHAKE_EVENTS)))
        self.sock.connect(self.address)
        self._reader = asyncio.create_task(self._read_loop())
        self._beat_task = asyncio.create_task(self._beat_loop())

    async def _watch_handshake(self, mon: zmq.asyncio.Socket) -> None:
        from zmq.utils.monitor import parse_monitor_message

        try:
            while True:
                ev = parse_monitor_message(await mon.recv_multipart())
                why = client_handshake_failure(ev["event"], ev["value"], self.curve is not None)
                if why and why != self.handshake_error:  # a refused client retries every 100 ms: log changes only
                    log.warning("client.handshake_failed", broker=self.address, reason=why)
                self.handshake_error = why
                if why:
                    self.handshake_refused.set()
                else:
                    self.handshake_refused.clear()
        finally:
            mon.close(linger=0)

    async def close(self) -> None:
        if self._beat_task is not None:
            self._beat_task.cancel()
            await asyncio.gather(self._beat_task, return_exceptions=True)
            self._beat_task = None
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
        self.last_heard = time.monotonic()
        instance = getattr(msg, "broker", "")
        if instance and instance != self.broker_id:
            old, self.broker_id, self.broker_silent = self.broker_id, instance, False
            if old:
                self.restarts += 1
                log.warning("client.broker_restarted", broker=self.address, old=old, new=instance,
                            waiting=len(self._waiters))
                self._signal(BROKER_RESTARTED, msg)
        elif self.broker_silent:
            self.broker_silent = False
            log.info("client.broker_back", broker=self.address, waiting=len(self._waiters))
            self._signal(BROKER_BACK, msg)
        if isinstance(msg, Heartbeat):
            return
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

    def _signal(self, signal: _Signal, heard: Message) -> None:
        """Wake every waiter with ``signal``, except those that ``heard`` answers: the broker that sent it has
        their request (a re-send would only repeat it there)."""
        if isinstance(heard, Reopen):
            answered = lambda key: key[0] == "s" and key[1] == heard.session  # noqa: E731
        else:
            mine = reply_key(heard) if not isinstance(heard, Heartbeat) else None
            answered = lambda key: key == mine  # noqa: E731
        for key, q in self._waiters.items():
            if not answered(key):
                q.put_nowait(signal)

    async def _beat_loop(self) -> None:
        """Heartbeat the broker while anything waits for an answer, and notice when it goes silent."""
        busy_since: float | None = None
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if not self._waiters:
                busy_since = None
                continue
            now = time.monotonic()
            if busy_since is None:
                busy_since = now - self.heartbeat_interval  # a waiter is at most one beat old
            silent_s = now - max(self.last_heard, busy_since)
            if not self.broker_silent and silent_s > self.heartbeat_interval * self.liveness:
                self.broker_silent = True
                self.silences += 1
                log.warning("client.broker_silent", broker=self.address, silent_s=round(silent_s, 3),
                            waiting=len(self._waiters))
            await self._send_bounded(Heartbeat(), self.heartbeat_interval)

    async def send(self, msg: Message) -> None:
        await self.sock.send(encode(msg))

    async def _send_bounded(self, msg: Message, timeout: float) -> None:
        """``send`` that cannot hang: with no connected peer (e.g. a refused CURVE handshake) a DEALER send blocks;
        then give up after ``timeout`` and let the caller's reply timeout and retries decide."""
        # Always bounded: the socket can be writable when checked and lose its only peer a moment later (a CURVE
        # handshake refused), and then a send waits forever.
        try:
            await within(self.send(msg), timeout)
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
            return await _get(self.inbox, timeout if timeout is not None else self.timeout)
        except asyncio.TimeoutError:
            return None

    async def request(self, msg: Message, *, timeout: float | None = None, retries: int = 3,
                      busy_retries: int = 100, deadline: float | None = None) -> Message:
        """Send ``msg`` and return its reply; retries on Busy and on timeout (resend).

        Without ``deadline``: Busy is retried ``busy_retries`` times after its hint, errors are returned at once, and
        ``TimeoutError`` is raised when ``retries + 1`` tries of ``timeout`` each went unanswered. With ``deadline``
        (a ``time.monotonic()`` time): Busy and transient errors are retried with jittered exponential back-off and
        unanswered tries resent until the deadline, each send telling the broker how long it may queue the request
        (``queue_timeout_s``, when the message has it); past the deadline the last refusal is returned, and a request
        still unanswered gets ``verdict_grace_s`` more for the broker's own verdict before ``TimeoutError``. A
        restarted broker turns a waiting ``Verify`` into ``Reopen``; anything else is sent again to it.
        """
        key = reply_key(msg)
        q: asyncio.Queue = asyncio.Queue()
        self._waiters[key] = q
        timeout = timeout if timeout is not None else self.timeout
        give_up = None if deadline is None else deadline + self.verdict_grace_s

        def next_try(after: float) -> float:
            at = time.monotonic() + after
            return at if give_up is None else min(at, give_up)

        try:
            tries = busies = attempt = 0
            refused: Message | None = None  # while backing off: the refusal to return if the deadline passes
            await self._send_bounded(self._timed(msg, deadline), timeout)
            resend_at = next_try(timeout)
            while True:
                try:
                    reply = await _get(q, max(0.0, resend_at - time.monotonic()))
                except asyncio.TimeoutError:
                    now = time.monotonic()
                    if refused is not None:  # back-off over: try again, or report the refusal
                        if now >= deadline:
                            return refused
                    else:
                        tries += 1
                        if (give_up is not None and now >= give_up) or (give_up is None and tries > retries):
                            why = f": {self.handshake_error}" if self.handshake_error else ""
                            raise TimeoutError(f"no reply to {msg.TYPE} {key} after {tries} tries{why}") from None
                    refused = None
                    await self._send_bounded(self._timed(msg, deadline), timeout)
                    resend_at = next_try(timeout)
                    continue
                if reply is BROKER_RESTARTED and isinstance(msg, Verify):
                    return Reopen(session=msg.session, reason="broker_restarted", broker=self.broker_id)
                if reply is BROKER_RESTARTED or reply is BROKER_BACK:
                    refused, attempt = None, 0
                    await self._send_bounded(self._timed(msg, deadline), timeout)
                    resend_at = next_try(timeout)
                    continue
                if deadline is not None and transient(reply):
                    if time.monotonic() >= deadline:
                        return reply
                    first = reply.retry_ms / 1000 if isinstance(reply, Busy) else FIRST_BACKOFF_S
                    refused = reply
                    resend_at = min(deadline, next_try(backoff_s(attempt, max(first, 0.001), self.heartbeat_interval)))
                    attempt += 1
                    continue
                if isinstance(reply, Busy) and busies < busy_retries:
                    busies += 1
                    await asyncio.sleep(max(reply.retry_ms, 1) / 1000)
                    await self._send_bounded(msg, timeout)
                    resend_at = next_try(timeout)
                    continue
                return reply
        finally:
            self._waiters.pop(key, None)

    @property
    def verdict_grace_s(self) -> float:
        """How long past its deadline a queued request waits for the broker's own verdict (it checks deadlines on
        its heartbeat tick)."""
        return 2 * self.heartbeat_interval

    @staticmethod
    def _timed(msg: Any, deadline: float | None) -> Any:
        """``msg`` telling the broker how long it may wait for a slot: what is left until ``deadline``."""
        if deadline is None or not hasattr(msg, "queue_timeout_s"):
            return msg
        return replace(msg, queue_timeout_s=max(0.001, deadline - time.monotonic()))

    async def generate(self, job: Generate, timeout: float | None = None, *, retry_busy: bool = True,
                       queue_timeout: float | None = None) -> AsyncIterator[Message]:
        """Send a generate job and yield its Tokens, then the final Done or Error.

        ``timeout``: longest silence of a running job. ``retry_busy=False`` yields a ``Busy`` and stops (the caller
        passes the backpressure on, as an HTTP 429) instead of waiting out its retry hint and resending.
        ``queue_timeout`` (seconds): how long the job may take to get a fused worker, counted from its send (again
        from a restart of the broker, or a refusal of a running job): meanwhile Busy and transient errors are
        retried with jittered back-off and an unanswered job is resent (the broker ignores a duplicate), each send
        telling the broker what is left (``queue_timeout_s``); then the refusal is yielded, a Busy or a silent
        queue as ``Error(overloaded)``. A restarted broker gets the job again: it streams again from its first token
        (``Tokens.index`` says where each piece belongs).
        """
        key = reply_key(job)
        q: asyncio.Queue = asyncio.Queue()
        self._waiters[key] = q
        timeout = timeout if timeout is not None else self.timeout
        deadline = None if queue_timeout is None else time.monotonic() + queue_timeout
        started = False  # Tokens or Done came: the job has a worker
        attempt = 0
        pending: Any = None  # a message that arrived during a back-off, handled next

        def overloaded(why: str) -> Error:
            return Error(code=E.OVERLOADED, message=f"no fused worker slot within {queue_timeout:g} s ({why})",
                         job=job.job, broker=self.broker_id)

        try:
            await self._send_bounded(self._timed(job, deadline), timeout)
            while True:
                msg, pending = pending, None
                if msg is None and not q.empty():  # a streaming job usually has its next message waiting: no timer
                    msg = q.get_nowait()
                if msg is None:
                    queued = deadline is not None and not started
                    wait = min(timeout, deadline + self.verdict_grace_s - time.monotonic()) if queued else timeout
                    try:
                        msg = await _get(q, max(0.0, wait))
                    except asyncio.TimeoutError:
                        if not queued:
                            raise TimeoutError(f"job {job.job!r}: nothing for {timeout}s") from None
                        if time.monotonic() < deadline:
                            await self._send_bounded(self._timed(job, deadline), timeout)  # queued, or lost
                            continue
                        if self.broker_silent:
                            raise TimeoutError(f"job {job.job!r}: the broker is silent") from None
                        msg = overloaded("the job was never started")
                if msg is BROKER_RESTARTED or msg is BROKER_BACK:
                    started, attempt = False, 0
                    if queue_timeout is not None:
                        deadline = time.monotonic() + queue_timeout
                    await self._send_bounded(self._timed(job, deadline), timeout)
                    continue
                if deadline is not None and transient(msg) and (retry_busy or not isinstance(msg, Busy)):
                    now = time.monotonic()
                    if started:  # a running job refused (its broker drains): it waits for service again
                        started, deadline = False, now + queue_timeout
                    if now < deadline:
                        first = msg.retry_ms / 1000 if isinstance(msg, Busy) else FIRST_BACKOFF_S
                        delay = min(backoff_s(attempt, max(first, 0.001), self.heartbeat_interval), deadline - now)
                        attempt += 1
                        pending = await self._wait_one(q, delay)
                        if pending is None:
                            await self._send_bounded(self._timed(job, deadline), timeout)
                        continue  # else something came during the back-off (a restart, say): handle it first
                    if isinstance(msg, Busy):
                        msg = overloaded("the generate queue stayed full")
                elif isinstance(msg, Busy) and retry_busy:
                    await asyncio.sleep(max(msg.retry_ms, 1) / 1000)
                    await self.send(job)
                    continue
                elif isinstance(msg, (Tokens, Done)):
                    started, attempt = True, 0
                yield msg
                if isinstance(msg, (Done, Error, Busy)):
                    return
        finally:
            self._waiters.pop(key, None)

    @staticmethod
    async def _wait_one(q: asyncio.Queue, delay: float) -> Any:
        """The next item of ``q`` if one comes within ``delay`` seconds, else None."""
        try:
            return await _get(q, max(0.0, delay))
        except asyncio.TimeoutError:
            return None

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

    async def probe(self, timeout: float) -> dict:
        """One stats snapshot within ``timeout`` (no resends): the start-up check of every frontend client CLI.

        Raises ``HandshakeRefused`` (a ``SpecmqError``: one line in a CLI) the moment the broker refuses this
        client's handshake, saying why (``handshake_error``) instead of waiting out ``timeout``; ``TimeoutError``
        when nothing came back; ``ProtocolError`` when something other than stats did.
        """
        asked = asyncio.ensure_future(self.stats(timeout=timeout, retries=0))
        refused = asyncio.ensure_future(self.handshake_refused.wait())
        try:
            await asyncio.wait({asked, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
            if not asked.done():  # not awaited: a cancel can be lost in wait_for (Python 3.11) and sit out the timeout
                asked.cancel()
                asked.add_done_callback(lambda t: t.cancelled() or t.exception())
        if asked.done() and not asked.cancelled() and asked.exception() is None:
            return asked.result()
        if self.handshake_error or not asked.done() or asked.cancelled():
            raise HandshakeRefused(f"broker at {self.address}: {self.handshake_error or 'handshake failed'}")
        return asked.result()  # its TimeoutError or ProtocolError


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
    """``q.get()`` within ``timeout``, keeping a cancel that lands as the item arrives (see ``broker.waits``)."""
    return await within(q.get(), timeout)


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; helper for tests and scripts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())

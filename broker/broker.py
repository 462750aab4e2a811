"""The specmq broker: one asyncio process, two ROUTER sockets, explicit state, handlers named after messages.

Frontend ROUTER: draft workers and generate clients (SessionOpen, Verify, SessionClose, Generate, StatsRequest).
Backend ROUTER: target and fused workers (Ready, Heartbeat, Credit, Disconnect and their answers).
See ``protocol/FLOW.md`` for the contract. The main loop (``run``) reads: wait for a socket or a timer, drain both
sockets in batches, flush held sends, heartbeat and purge when due.

Every frame in and out passes through ``_recv_batch`` and ``_send``; ``self.taps`` (callables
``tap(direction, side, identity, body)``) see each one there, which is where capture hooks in.
"""
from __future__ import annotations

import asyncio
import errno
import random
import time
import uuid
from typing import Any, Callable

import structlog
import zmq

from broker.curve import HandshakeWatch
from broker.ops import Ops
from broker.routing import make_router
from broker.state import BrokerConfig, BrokerState, Job, Session, Waiting, Worker
from protocol import errors as E
from protocol.codec import encode
from protocol.errors import ProtocolError
from protocol.frames import NOBLOCK, RCVMORE, SNDMORE_NOBLOCK, check_vocab, pack, parse, raw_get, raw_recv, raw_send
from protocol.messages import (
    CLIENT_TYPES,
    VERSION,
    WORKER_TYPES,
    Busy,
    Disconnect,
    Error,
    Heartbeat,
    Reopen,
    Stats,
)

log = structlog.get_logger("broker")

FRONTEND, BACKEND = "frontend", "backend"
BATCH = 512  # most frames read from one socket per wakeup before looking at the other
HEARTBEAT_BODY = encode(Heartbeat())
Tap = Callable[[str, str, bytes, bytes], None]


_PREFIX: dict[bytes, str] = {}


def _secs(s: float) -> str:
    """Seconds for a message: 120, 1.5, 0.04."""
    return f"{round(s, 1) if s >= 0.1 else round(s, 3):g}"


def _key(client: bytes, ident: str) -> str:
    """Namespace a client-chosen id by the client's identity."""
    prefix = _PREFIX.get(client)
    if prefix is None:
        if len(_PREFIX) > 100_000:
            _PREFIX.clear()
        prefix = _PREFIX[client] = client.hex() + "/"
    return prefix + ident


class Broker:
    """State plus handlers. ``run()`` serves until ``stop()``; then it drains within ``grace_s`` and returns."""

    def __init__(self, config: BrokerConfig | None = None, ctx: zmq.Context | None = None) -> None:
        self.config = config or BrokerConfig()
        self.instance = uuid.uuid4().hex[:12]  # on every reply to a client: a new one tells clients we restarted
        self._beat_reply = encode(Heartbeat(broker=self.instance))  # the answer to a client's heartbeat
        self.state = BrokerState()
        self.counters = self.state.counters
        self.router = make_router(self.config.router)
        self.rng = random.Random(self.config.seed)
        self.taps: list[Tap] = []
        self.curve = None  # broker.curve.CurveServer when the frontend is encrypted (own context: one ZAP per context)
        if self.config.curve_secret:
            from broker.curve import CurveServer

            self.ctx = ctx or zmq.Context()
            self.curve = CurveServer(self.ctx, self.config.curve_secret, self.config.allow, self._auth_refused)
        else:
            self.ctx = ctx or zmq.Context.instance()
        self.ops: Ops | None = None  # capture, stats PUB, Prometheus (broker.ops), started by run()
        self.frontend = self._router_socket(self.config.frontend, curve=self.curve is not None)
        self.backend = self._router_socket(self.config.backend)
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        # every refused frontend handshake (key not allowed, wrong broker key, CURVE on one side only), counted
        self.handshakes = HandshakeWatch(self.frontend, self.curve is not None, self._handshake_refused)
        self.outbox: list[tuple[zmq.Socket, str, bytes, bytes, str]] = []  # sends held by EAGAIN, in order
        self._deferred: list[tuple[zmq.Socket, str, bytes, bytes, str]] = []  # sends held until the batch ends
        self.accepting = True
        self._stop_requested = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_beat = 0.0

    def _auth_refused(self) -> None:
        self.counters.auth_failures += 1  # from the ZAP thread: a lone int increment

    def _handshake_refused(self, reason: str) -> None:
        self.counters.refused_handshakes += 1  # on the loop thread (HandshakeWatch.drain); logged there

    def _router_socket(self, endpoint: str, curve: bool = False) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        if curve:
            self.curve.apply(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown or full peer raises instead of silently dropping
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        return sock

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.ops = Ops(self.config, self._loop, snapshot=self.stats_snapshot, ctx=self.ctx,
                       frontend=self.frontend_endpoint, taps=self.taps, curve=self.curve)
        for sock in (self.frontend, self.backend):
            self._loop.add_reader(sock.getsockopt(zmq.FD), self.pump)
        self._loop.add_reader(self.handshakes.fd, self.handshakes.drain)
        self.handshakes.drain()  # edge-triggered FD: read once so that the next event raises an edge
        self._schedule_beat()
        log.info("broker.started", frontend=self.frontend_endpoint, backend=self.backend_endpoint,
                 router=self.config.router)
        deadline = None
        try:
            while True:  # frames are handled in pump(), straight from the reader callback; this loop keeps time
                self.pump()
                now = time.monotonic()
                if now >= self._next_beat:
                    self.send_heartbeats()
                    self.purge_workers()
                    self.expire_sessions(now)
                    self.expire_waiting(now)
                    self._next_beat = now + self.config.heartbeat_interval
                if self._stop_requested and deadline is None:
                    deadline = self.begin_shutdown()
                if deadline is not None and (self.state.inflight() == 0 or now >= deadline):
                    break
                self._wake.clear()
                await self._wake.wait()
        finally:
            self.finish_shutdown()

    def pump(self) -> None:
        """Drain both sockets in batches (no await between frames); yield to the loop when work remains."""
        for _ in range(8):
            busy = self._recv_batch(self.frontend, FRONTEND) | self._recv_batch(self.backend, BACKEND)
            if self.outbox:
                self.flush_outbox()
            if not busy and not self._readable():
                break
        else:
            self._loop.call_soon(self.pump)
        if not self.accepting and self.state.inflight() == 0:
            self._wake.set()  # shutdown waits on this

    def _readable(self) -> bool:
        """Edge-triggered FDs: a send may have consumed the edge, so ask the sockets themselves."""
        return bool(self.frontend.getsockopt(zmq.EVENTS) & zmq.POLLIN
                    or self.backend.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def _schedule_beat(self) -> None:
        self._wake.set()
        self._loop.call_later(self.config.heartbeat_interval / 2, self._schedule_beat)

    def stop(self) -> None:
        """Ask the loop to shut down gracefully. Safe from any thread or a signal handler."""
        self._stop_requested = True
        if self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # loop already closed: the broker has stopped
                pass

    # ------------------------------------------------------------------ frames in and out (the one place)
    def _recv_batch(self, sock: zmq.Socket, side: str) -> bool:
        handler = self.process_client if side == FRONTEND else self.process_worker
        recv, taps = raw_recv, self.taps
        n = 0
        while n < BATCH:
            if side == FRONTEND and len(self.outbox) > self.config.hwm:
                if self._deferred:
                    self.flush_deferred()
                return False  # backpressure: stop reading clients until held sends drain
            try:
                ident = recv(sock, NOBLOCK)
            except zmq.Again:
                if self._deferred:
                    self.flush_deferred()
                return False
            n += 1
            frame = recv(sock, NOBLOCK)  # a ROUTER message has identity + at least one part, delivered whole
            if raw_get(sock, RCVMORE):
                frames = [ident, frame]
                while raw_get(sock, RCVMORE):
                    frames.append(recv(sock, NOBLOCK))
                self._bad_frames(sock, side, frames)
                continue
            if taps:
                for tap in taps:
                    tap("in", side, ident, frame)
            handler(ident, frame)
        if self._deferred:
            self.flush_deferred()
        return True

    def _send(self, sock: zmq.Socket, side: str, ident: bytes, body: bytes, mtype: str, defer: bool = False) -> bool:
        """Send ``[ident, body]`` without blocking. False when the peer is gone (EHOSTUNREACH).

        ``defer`` (hot path: forwarded chunks, results) holds the frame until the current batch ends, so frames
        leave in bursts and ZeroMQ's I/O thread writes many per syscall instead of waking once per frame.
        """
        if self.taps:
            for tap in self.taps:
                tap("out", side, ident, body)
        if defer:
            self._deferred.append((sock, side, ident, body, mtype))
            return True
        if self._deferred:  # keep order behind deferred frames
            self.flush_deferred()
        return self._send_now(sock, side, ident, body, mtype)

    def flush_deferred(self) -> None:
        held, self._deferred = self._deferred, []
        for sock, side, ident, body, mtype in held:
            self._send_now(sock, side, ident, body, mtype)

    def _send_now(self, sock: zmq.Socket, side: str, ident: bytes, body: bytes, mtype: str) -> bool:
        if self.outbox:  # keep order behind held sends
            self.outbox.append((sock, side, ident, body, mtype))
            return True
        try:
            raw_send(sock, ident, SNDMORE_NOBLOCK)  # routing happens on the identity frame: it fails or all goes
            raw_send(sock, body, NOBLOCK)
        except zmq.Again:
            self.counters.send_blocked += 1
            self.outbox.append((sock, side, ident, body, mtype))
            return True
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                self._unreachable(side, ident, mtype)
                return False
            raise
        self.counters.msgs_out[mtype] += 1
        return True

    def flush_outbox(self) -> None:
        held, self.outbox = self.outbox, []
        for i, (sock, side, ident, body, mtype) in enumerate(held):
            try:
                sock.send_multipart((ident, body), zmq.NOBLOCK)
                self.counters.msgs_out[mtype] += 1
            except zmq.Again:
                self.outbox = held[i:] + self.outbox
                return
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                self._unreachable(side, ident, mtype)

    def _unreachable(self, side: str, ident: bytes, mtype: str) -> None:
        self.counters.unreachable += 1
        log.warning("send.unreachable", side=side, peer=ident.hex(), type=mtype)
        if side == BACKEND and ident in self.state.workers:
            self.worker_dead(self.state.workers[ident], "unreachable")

    def reply(self, side: str, ident: bytes, msg: Any) -> bool:
        if side == FRONTEND:
            msg.broker = self.instance  # every reply to a client names this broker instance
            return self._send(self.frontend, side, ident, encode(msg), msg.TYPE)
        return self._send(self.backend, side, ident, encode(msg), msg.TYPE)

    def error(self, side: str, ident: bytes, code: str, message: str, **about: Any) -> None:
        self.counters.errors[code] += 1
        log.info("request.rejected", side=side, peer=ident.hex(), code=code, reason=message)
        self.reply(side, ident, Error(code=code, message=message, **about))

    def _bad_frames(self, sock: zmq.Socket, side: str, frames: list[bytes]) -> None:
        self.counters.msgs_in["?"] += 1
        if self.taps:
            for tap in self.taps:
                tap("in", side, frames[0] if frames else b"", b"".join(frames[1:]))
        if len(frames) >= 1 and frames[0]:
            self.error(side, frames[0], E.BAD_FRAMES, f"expected 1 body frame, got {len(frames) - 1}")
        else:
            self.counters.errors[E.BAD_FRAMES] += 1
            self.counters.dropped += 1

    def _decode(self, side: str, ident: bytes, frame: bytes) -> dict | None:
        try:
            body = parse(frame, self.config.max_frame)
        except ProtocolError as exc:
            self.counters.msgs_in["?"] += 1
            self.error(side, ident, exc.code, exc.message)
            return None
        self.counters.msgs_in[body["type"]] += 1
        return body

    # ------------------------------------------------------------------ clients (frontend)
    def process_client(self, ident: bytes, frame: bytes) -> None:
        body = self._decode(FRONTEND, ident, frame)
        if body is None:
            return
        mtype = body["type"]
        if mtype not in CLIENT_TYPES:
            self.error(FRONTEND, ident, E.NOT_ALLOWED, f"{mtype} is not a client message (frontend)")
            return
        if mtype == "verify":
            self.client_verify(ident, body)
        elif mtype == "stats_request":
            self.reply(FRONTEND, ident, Stats(snapshot=self.stats_snapshot()))
        elif mtype == "cancel":  # honoured while shutting down too: it frees a worker sooner
            self.client_cancel(ident, body)
        elif mtype == "heartbeat":  # answered while draining too: the client learns this instance is still here
            self._send(self.frontend, FRONTEND, ident, self._beat_reply, "heartbeat")
        elif not self.accepting:
            self.error(FRONTEND, ident, E.SHUTTING_DOWN, "broker is shutting down",
                       session=body.get("session", ""), job=body.get("job", ""))
        elif mtype == "session_open":
            self.client_open(ident, body)
        elif mtype == "session_close":
            self.client_close(ident, body)
        elif mtype == "generate":
            self.client_generate(ident, body)

    def client_open(self, ident: bytes, body: dict) -> None:
        """A session that holds a slot re-opens there at once; a new one (or one whose target died) takes a free
        slot, or waits its turn in the admission queue (FIFO, ``max_queue`` long, then Busy) until one frees or
        its deadline passes (``Error(overloaded)``)."""
        sid = body["session"]
        key = _key(ident, sid)
        now = time.monotonic()
        sess = self.state.sessions.get(key)
        if sess is not None:
            sess.last_active = now
            worker = self.state.workers.get(sess.worker) if sess.worker else None
            if worker is not None and sess.opening:  # a resend of the open on its way: its answer is coming
                self.counters.duplicates += 1
                return
            if worker is not None:
                self.forward_open(sess, worker, body, placed_now=False)
                return
        waiting = self.state.admission.get(key)
        if waiting is not None:  # a resend while it waits: it keeps its place
            waiting.body = body
            self.counters.duplicates += 1
            return
        model = body.get("model", "")
        if not any(not model or w.model == model for w in self.state.targets()):
            if sess is not None and sess.worker is None:
                del self.state.sessions[key]
            self.error(FRONTEND, ident, E.NO_WORKERS, "no live target worker can take this session", session=sid)
            return
        if not self.state.admission and self._roomy(model):
            self.admit_open(ident, key, sid, body)
            return
        if len(self.state.admission) >= self.config.max_queue:
            self.busy(ident, "admission", session=sid)
            return
        self.state.admission[key] = Waiting(key=key, client=ident, session=sid, body=body,
                                            deadline=now + self._wait_s(body), since=now)
        self.admit()  # the queue may hold only opens for other models

    def _wait_s(self, body: dict) -> float:
        """How long a request may wait for a slot: the client's ``queue_timeout_s``, else the broker's default."""
        wait = body.get("queue_timeout_s") or 0.0
        return wait if wait > 0 else self.config.queue_timeout_s

    def _roomy(self, model: str = "") -> list[Worker]:
        """Targets (of ``model``, when named) with a free session slot."""
        return [w for w in self.state.targets() if len(w.sessions) < w.capacity and (not model or w.model == model)]

    def admit(self) -> None:
        """Give free target slots to waiting opens, first come first served (an open for a model with no free
        slot lets later ones for other models pass)."""
        queue = self.state.admission
        while queue:
            roomy = self._roomy()
            if not roomy:
                return
            models = {w.model for w in roomy}
            head = next((w for w in queue.values() if not w.body.get("model") or w.body["model"] in models), None)
            if head is None:
                return
            del queue[head.key]
            self.counters.admitted += 1
            self.admit_open(head.client, head.key, head.session, head.body)

    def admit_open(self, ident: bytes, key: str, sid: str, body: dict) -> None:
        """Place a session on a target with a free slot and forward its open."""
        sess = self.state.sessions.get(key)
        if sess is None:
            sess = self.state.sessions[key] = Session(key=key, client=ident, session=sid)
        worker = self.place_session(sess, body.get("model", ""))
        if worker is None:
            if sess.worker is None and not sess.opening and sess.last_seq < 0:
                del self.state.sessions[key]
            self.error(FRONTEND, ident, E.NO_WORKERS, "no live target worker can take this session", session=sid)
            return
        self.forward_open(sess, worker, body, placed_now=True)

    def forward_open(self, sess: Session, worker: Worker, body: dict, placed_now: bool) -> None:
        key, ident, sid = sess.key, sess.client, sess.session
        bad = check_vocab(body, "prompt_ids", worker.vocab_size)
        if bad is not None or len(worker.queue) >= self.config.max_queue:
            if placed_now:  # nothing was sent: forget the placement (and a session that never opened)
                worker.sessions.discard(key)
                sess.worker = None
                if sess.last_seq < 0 and not sess.opening:
                    del self.state.sessions[key]
            if bad is not None:
                self.error(FRONTEND, ident, E.TOKEN_OUT_OF_RANGE,
                           f"prompt_ids holds token id {bad}, outside [0, {worker.vocab_size})", session=sid)
            else:
                self.busy(ident, f"verify:{worker.label}", session=sid)
            return
        sess.last_seq, sess.last_result, sess.opening = -1, None, True
        sess.inflight.clear()
        body["session"] = key
        self.enqueue(worker, key, -1, body)
        self.dispatch(worker)

    def expire_waiting(self, now: float) -> None:
        """Refuse opens and queued jobs whose deadline passed: the only way overload fails a request."""
        late = [w for w in self.state.admission.values() if w.deadline <= now]
        for w in late:
            waiting = len(self.state.admission)
            del self.state.admission[w.key]
            sess = self.state.sessions.get(w.key)
            if sess is not None and sess.worker is None and not sess.inflight:
                del self.state.sessions[w.key]
            self.counters.overloaded += 1
            self.error(FRONTEND, w.client, E.OVERLOADED, f"no target slot within {_secs(w.deadline - w.since)} s; "
                       f"{waiting} sessions waiting", session=w.session)
        queue = self.state.generate_queue
        if any(job.deadline <= now for job in queue):
            waiting = len(queue)
            late_jobs = [job for job in queue if job.deadline <= now]
            self.state.generate_queue = type(queue)(job for job in queue if job.deadline > now)
            for job in late_jobs:
                self.state.jobs.pop(job.key, None)
                self.counters.overloaded += 1
                self.error(FRONTEND, job.client, E.OVERLOADED, f"no fused worker slot within "
                           f"{_secs(self._wait_s(job.body))} s; {waiting} jobs waiting", job=job.job)

    def client_verify(self, ident: bytes, body: dict) -> None:
        sid, seq = body["session"], body["seq"]
        sess = self.state.sessions.get(_key(ident, sid))
        if sess is None:
            self.error(FRONTEND, ident, E.UNKNOWN_SESSION, f"session {sid!r} is not open", session=sid, seq=seq)
            return
        sess.last_active = time.monotonic()
        if seq == sess.last_seq and sess.last_result is not None:  # a retry of the last answered chunk
            self.counters.duplicates += 1
            self._send(self.frontend, FRONTEND, ident, sess.last_result, "result", defer=True)
            return
        if seq in sess.inflight:  # the answer is on its way
            self.counters.duplicates += 1
            return
        if not self.accepting:
            self.error(FRONTEND, ident, E.SHUTTING_DOWN, "broker is shutting down", session=sid, seq=seq)
            return
        worker = self.state.workers.get(sess.worker) if sess.worker else None
        if worker is None:
            self.counters.reopens += 1
            self.reply(FRONTEND, ident, Reopen(session=sid, reason="target_gone"))
            return
        if seq <= sess.last_seq:
            self.error(FRONTEND, ident, E.BAD_SEQUENCE, f"seq {seq} is behind the last answered {sess.last_seq}",
                       session=sid, seq=seq)
            return
        if worker.max_gamma and len(body["tokens"]) > worker.max_gamma:
            self.error(FRONTEND, ident, E.GAMMA_TOO_LARGE,
                       f"chunk of {len(body['tokens'])} tokens exceeds the target's max_gamma {worker.max_gamma}",
                       session=sid, seq=seq)
            return
        bad = check_vocab(body, "tokens", worker.vocab_size)
        if bad is not None:
            self.error(FRONTEND, ident, E.TOKEN_OUT_OF_RANGE,
                       f"tokens holds token id {bad}, outside [0, {worker.vocab_size})", session=sid, seq=seq)
            return
        if len(worker.queue) >= self.config.max_queue:
            self.busy(ident, f"verify:{worker.label}", session=sid, seq=seq)
            return
        body["session"] = sess.key
        sess.inflight.add(seq)
        self.enqueue(worker, sess.key, seq, body)
        if worker.credit:
            self.dispatch(worker)

    def client_close(self, ident: bytes, body: dict) -> None:
        key = _key(ident, body["session"])
        self.state.admission.pop(key, None)  # given up while waiting for a slot
        sess = self.state.sessions.pop(key, None)
        if sess is None:
            return  # closing an unknown session is harmless; no answer is expected
        self.close_on_target(sess)

    def close_on_target(self, sess: Session) -> None:
        """Forward a SessionClose so the target frees the session's slot (the session is already forgotten)."""
        worker = self.state.workers.get(sess.worker) if sess.worker else None
        if worker is not None:
            worker.sessions.discard(sess.key)
            self.enqueue(worker, sess.key, None, {"v": VERSION, "type": "session_close", "session": sess.key})
            self.dispatch(worker)
            self.admit()  # its slot goes to the next waiting open (queued behind the close: the slot is free first)

    def expire_sessions(self, now: float) -> None:
        """Close sessions whose client went silent (a crashed drafter), so their target slots do not leak.

        Clients have no heartbeat of their own; a session with nothing in flight and no message for
        ``session_idle_s`` is closed on its target. A drafter that comes back gets ``unknown_session`` and re-opens.
        """
        idle = self.config.session_idle_s
        if idle <= 0:
            return
        cutoff = now - idle
        stale = [s for s in self.state.sessions.values() if s.last_active < cutoff and not s.inflight
                 and not s.opening]
        for sess in stale:
            del self.state.sessions[sess.key]
            self.counters.sessions_expired += 1
            self.close_on_target(sess)
        if stale:
            log.info("sessions.expired", count=len(stale), idle_s=idle)

    def client_generate(self, ident: bytes, body: dict) -> None:
        jid = body["job"]
        key = _key(ident, jid)
        if key in self.state.jobs:
            self.counters.duplicates += 1
            return  # already queued or running: its tokens will come
        if not self.state.fused():
            self.error(FRONTEND, ident, E.NO_WORKERS, "no live fused worker", job=jid)
            return
        if len(self.state.generate_queue) >= self.config.max_queue:
            self.busy(ident, "generate", job=jid)
            return
        body["job"] = key
        job = self.state.jobs[key] = Job(key=key, client=ident, job=jid, body=body,
                                         deadline=time.monotonic() + self._wait_s(body))
        self.state.generate_queue.append(job)
        self.dispatch_generate()

    def client_cancel(self, ident: bytes, body: dict) -> None:
        """Forget a job nobody waits for: out of the queue, or forwarded to its fused worker to free its slots."""
        job = self.state.jobs.pop(_key(ident, body["job"]), None)
        if job is None:
            return  # over already (Done, Error) or never seen: no answer is expected
        self.counters.cancelled += 1
        worker = self.state.workers.get(job.worker) if job.worker else None
        if worker is None:
            try:
                self.state.generate_queue.remove(job)
            except ValueError:
                pass
            return
        worker.jobs.pop(job.key, None)  # its late Tokens/Done are dropped; the worker returns the credit
        self._send(self.backend, BACKEND, worker.identity,
                   pack({"v": VERSION, "type": "cancel", "job": job.key, "reason": body.get("reason", ""),
                         "incarnation": worker.incarnation}), "cancel")

    def busy(self, ident: bytes, queue: str, **about: Any) -> None:
        self.counters.busy += 1
        self.reply(FRONTEND, ident, Busy(retry_ms=self.config.retry_ms, queue=queue, **about))

    # ------------------------------------------------------------------ placement and dispatch
    def place_session(self, sess: Session, model: str = "") -> Worker | None:
        """Choose a target by the routing policy; the session stays there (affinity) until it dies."""
        targets = [w for w in self.state.targets() if not model or w.model == model]
        if not targets:
            return None
        loads = self.state.loads(targets)
        chosen = self.router.place(loads, self.rng)
        if chosen is None:
            return None
        worker = targets[loads.index(chosen)]
        sess.worker = worker.identity
        worker.sessions.add(sess.key)
        self.counters.sessions_placed += 1
        return worker

    def _unplace(self, sess: Session) -> None:
        worker = self.state.workers.get(sess.worker) if sess.worker else None
        if worker is not None:
            worker.sessions.discard(sess.key)
        if not sess.opening and sess.last_seq < 0:
            self.state.sessions.pop(sess.key, None)
        sess.worker = None
        if worker is not None:
            self.admit()

    def enqueue(self, worker: Worker, key: str, seq: int | None, body: dict) -> None:
        """Queue a request for target ``worker`` (seq: -1 open, >= 0 verify, None close), stamped with the worker's
        incarnation: its answer must echo it (fencing, protocol/FLOW.md). Every request for a target goes through here.
        """
        body["incarnation"] = worker.incarnation
        worker.queue.append((key, seq, pack(body)))

    def dispatch(self, worker: Worker) -> None:
        """Forward queued requests to a target while it has credit."""
        queue = worker.queue
        while worker.credit > 0 and queue:
            key, seq, body = queue.popleft()
            mtype = "verify" if seq is not None and seq >= 0 else ("session_open" if seq == -1 else "session_close")
            if seq is not None:  # skip work nobody waits for any more (closed, re-opened, re-placed)
                sess = self.state.sessions.get(key)
                if sess is None or sess.worker != worker.identity or (seq >= 0 and seq not in sess.inflight):
                    continue
            if not self._send(self.backend, BACKEND, worker.identity, body, mtype, defer=True):
                return  # worker unreachable: worker_dead re-placed its sessions
            worker.credit -= 1

    def dispatch_generate(self) -> None:
        """Hand queued jobs to fused workers with credit, most credit first."""
        queue = self.state.generate_queue
        while queue:
            workers = [w for w in self.state.fused() if w.credit > 0]
            if not workers:
                return
            worker = max(workers, key=lambda w: w.credit)
            job = queue.popleft()
            job.body["delivery"] = job.deliveries
            job.body["incarnation"] = worker.incarnation
            if not self._send(self.backend, BACKEND, worker.identity, pack(job.body), "generate"):
                queue.appendleft(job)
                continue
            job.deliveries += 1
            job.worker = worker.identity
            worker.jobs[job.key] = job
            worker.credit -= 1

    # ------------------------------------------------------------------ workers (backend)
    def process_worker(self, ident: bytes, frame: bytes) -> None:
        worker = self.state.workers.get(ident)
        if worker is not None:
            worker.last_seen = time.monotonic()
        body = self._decode(BACKEND, ident, frame)
        if body is None:
            return
        mtype = body["type"]
        if mtype not in WORKER_TYPES:
            self.error(BACKEND, ident, E.NOT_ALLOWED, f"{mtype} is not a worker message (backend)")
            return
        if mtype == "ready":
            self.worker_ready(ident, body)
            return
        if worker is None:
            if mtype != "disconnect":
                self.counters.errors["unknown_worker"] += 1
                self.reply(BACKEND, ident, Disconnect(reason="unknown worker: send ready"))
            return
        if mtype == "result" or mtype == "session_opened":
            self.worker_answer(worker, body)
        elif mtype == "credit":
            n = body["n"]
            if n < 0:
                self.error(BACKEND, ident, E.BAD_FIELD, "credit: n must be >= 0")
                return
            worker.credit = min(worker.credit + n, self.config.max_credit)
            if worker.kind == "target":
                self.dispatch(worker)
            else:
                self.dispatch_generate()
        elif mtype == "heartbeat":
            if body.get("stats"):
                worker.stats = body["stats"]
        elif mtype == "tokens" or mtype == "done":
            self.worker_job_message(worker, body)
        elif mtype == "error" or mtype == "busy":
            if body.get("job"):
                self.worker_job_message(worker, body)
            elif body.get("session"):
                self.worker_answer(worker, body)
            else:
                self.counters.errors["worker_" + str(body.get("code", "busy"))] += 1
                log.warning("worker.error", worker=worker.label, code=body.get("code"), reason=body.get("message"))
        elif mtype == "disconnect":
            self.worker_dead(worker, "disconnect: " + str(body.get("reason", "")))

    def worker_ready(self, ident: bytes, body: dict) -> None:
        old = self.state.workers.get(ident)
        if old is not None:
            self.worker_dead(old, "re-registered")
        if body["kind"] not in ("target", "fused") or body["capacity"] < 0 or body.get("vocab_size", 0) < 0:
            self.error(BACKEND, ident, E.BAD_FIELD, "ready: kind must be target|fused and capacity >= 0")
            return
        worker = Worker(identity=ident, kind=body["kind"], model=body["model"], capacity=body["capacity"],
                        vocab_size=body.get("vocab_size", 0), tokenizer=body.get("tokenizer", ""),
                        max_gamma=body.get("max_gamma", 16), max_context=body.get("max_context", 0),
                        name=body.get("worker", "") or ident.hex(), incarnation=body.get("incarnation", 0))
        if any(w.name == worker.name for w in self.state.workers.values()):
            worker.name = f"{worker.name}#{ident.hex()[:8]}"
        self.state.workers[ident] = worker
        log.info("worker.ready", worker=worker.label, kind=worker.kind, model=worker.model, capacity=worker.capacity,
                 incarnation=worker.incarnation)
        if worker.kind == "target":
            self.admit()  # its open requests wait in its queue until its first Credit

    def stale(self, worker: Worker, body: dict) -> bool:
        """Is this answer from an earlier registration of ``worker`` (a tick that finished after its link reconnected)?
        Answers must echo the incarnation of the request they answer; the field is removed on the way (clients never
        see it)."""
        if body.pop("incarnation", 0) == worker.incarnation:
            return False
        self.counters.stale_answers += 1
        log.info("answer.stale", worker=worker.label, type=body["type"], session=str(body.get("session", ""))[:80],
                 job=str(body.get("job", ""))[:80], seq=body.get("seq", -1))
        return True

    def worker_answer(self, worker: Worker, body: dict) -> None:
        """Result / SessionOpened / Error / Busy about a session: map the id back and pass it to the client."""
        if self.stale(worker, body):
            return
        key = body["session"]
        sess = self.state.sessions.get(key)
        seq = body.get("seq", -1)
        if body["type"] == "session_opened" or (sess is not None and sess.opening and seq == -1):
            if sess is not None and sess.opening and sess.worker == worker.identity:
                sess.opening = False
                if body["type"] != "session_opened":
                    self._unplace(sess)
            else:
                sess = None
        elif sess is not None and sess.worker == worker.identity and seq in sess.inflight:
            sess.inflight.discard(seq)
        else:
            sess = None
        if sess is None:  # closed, re-placed, or a worker answering what it was never sent
            self.counters.dropped += 1
            log.info("answer.dropped", worker=worker.label, type=body["type"], session=str(key)[:80], seq=seq)
            return
        if body["type"] == "result":
            bad = check_vocab(body, "tokens", worker.vocab_size)
            if bad is not None:
                self.counters.errors[E.WORKER_ERROR] += 1
                body = {"v": VERSION, "type": "error", "code": E.WORKER_ERROR, "seq": seq,
                        "message": f"target answered token id {bad} outside its vocab"}
        body["session"] = sess.session
        body["broker"] = self.instance
        out = pack(body)
        if body["type"] == "result":
            sess.last_seq, sess.last_result = seq, out
        self._send(self.frontend, FRONTEND, sess.client, out, body["type"], defer=True)

    def worker_job_message(self, worker: Worker, body: dict) -> None:
        """Tokens / Done / Error / Busy about a generate job."""
        if self.stale(worker, body):
            return
        job = worker.jobs.get(body["job"])
        if job is None:
            self.counters.dropped += 1
            log.info("answer.dropped", worker=worker.label, type=body["type"], job=str(body["job"])[:80])
            return
        mtype = body["type"]
        if mtype == "busy":  # the worker refused it: back to the head of the queue, not a delivery
            del worker.jobs[job.key]
            job.deliveries -= 1
            job.worker = None
            self.state.generate_queue.appendleft(job)
            return
        if mtype != "tokens":  # done or error: the job is over
            del worker.jobs[job.key]
            self.state.jobs.pop(job.key, None)
        body["job"] = job.job
        body["broker"] = self.instance
        self._send(self.frontend, FRONTEND, job.client, pack(body), mtype)

    # ------------------------------------------------------------------ liveness
    def send_heartbeats(self) -> None:
        for worker in list(self.state.workers.values()):
            self._send(self.backend, BACKEND, worker.identity, HEARTBEAT_BODY, "heartbeat")

    def purge_workers(self) -> None:
        expiry = time.monotonic() - self.config.heartbeat_interval * self.config.liveness
        for worker in list(self.state.workers.values()):
            if worker.last_seen < expiry:
                self.worker_dead(worker, "heartbeat_expired")

    def worker_dead(self, worker: Worker, reason: str) -> None:
        """Forget a worker: its sessions' clients get Reopen, its queued chunks are dropped, its jobs redelivered."""
        if self.state.workers.pop(worker.identity, None) is None:
            return
        self.counters.dead_workers += 1
        log.warning("worker.dead", worker=worker.label, reason=reason, sessions=len(worker.sessions),
                    jobs=len(worker.jobs))
        for key in list(worker.sessions):
            sess = self.state.sessions.get(key)
            if sess is None:
                continue
            sess.worker, sess.opening, sess.last_seq, sess.last_result = None, False, -1, None
            sess.inflight.clear()
            self.counters.reopens += 1
            self.reply(FRONTEND, sess.client, Reopen(session=sess.session, reason=reason))
        worker.queue.clear()
        for job in sorted(worker.jobs.values(), key=lambda j: j.key, reverse=True):
            job.worker = None
            if job.deliveries >= self.config.max_deliveries:
                self.state.jobs.pop(job.key, None)
                self.counters.poison_jobs += 1
                self.error(FRONTEND, job.client, E.POISON_JOB,
                           f"job was handed out {job.deliveries} times and its worker died each time", job=job.job)
            else:
                self.counters.redeliveries += 1
                job.deadline = time.monotonic() + self._wait_s(job.body)  # it waits for a slot again
                self.state.generate_queue.appendleft(job)
        worker.jobs.clear()
        self.dispatch_generate()

    # ------------------------------------------------------------------ shutdown and stats
    def begin_shutdown(self) -> float:
        """Stop accepting; hand back queued work that no worker has yet; return the grace deadline."""
        self.accepting = False
        log.info("broker.stopping", inflight=self.state.inflight(), grace_s=self.config.grace_s)
        for worker in self.state.workers.values():
            for key, seq, _ in worker.queue:
                sess = self.state.sessions.get(key)
                if sess is not None and seq is not None:
                    sess.inflight.discard(seq)
                    sess.opening = False
                    self.error(FRONTEND, sess.client, E.SHUTTING_DOWN, "broker is shutting down",
                               session=sess.session, seq=seq)
            worker.queue.clear()
        while self.state.generate_queue:
            job = self.state.generate_queue.popleft()
            self.state.jobs.pop(job.key, None)
            self.error(FRONTEND, job.client, E.SHUTTING_DOWN, "broker is shutting down", job=job.job)
        for w in self.state.admission.values():  # waiting for a slot: try again later (or on the next broker)
            self.error(FRONTEND, w.client, E.SHUTTING_DOWN, "broker is shutting down", session=w.session)
        self.state.admission.clear()
        return time.monotonic() + self.config.grace_s

    def finish_shutdown(self) -> None:
        self.flush_deferred()
        for job in list(self.state.jobs.values()):
            self.error(FRONTEND, job.client, E.SHUTTING_DOWN, "broker stopped before the job finished", job=job.job)
        for worker in list(self.state.workers.values()):
            self.reply(BACKEND, worker.identity, Disconnect(reason="broker shutting down"))
        if self.outbox:
            self.flush_outbox()
        if self._loop is not None:
            for sock in (self.frontend, self.backend):
                try:
                    self._loop.remove_reader(sock.getsockopt(zmq.FD))
                except Exception:  # loop already closed
                    pass
            try:
                self._loop.remove_reader(self.handshakes.fd)
            except Exception:  # loop already closed
                pass
        self.handshakes.drain()
        self.handshakes.close()
        self.frontend.close(linger=200)
        self.backend.close(linger=200)
        if self.ops is not None:
            self.ops.close()
        if self.curve is not None:
            self.curve.stop()
            self.ctx.destroy(linger=0)  # the broker's own context (CURVE gets one per broker)
        log.info("broker.stopped", counters=self.counters.as_dict())

    def stats_snapshot(self) -> dict[str, Any]:
        snap = self.state.stats_snapshot()
        snap["router"] = self.config.router
        snap["accepting"] = self.accepting
        snap["instance"] = self.instance
        if self.ops is not None:
            snap.update(self.ops.extra())
        return snap


def run_broker(config: BrokerConfig, install_signals: bool = True, ready: Callable[[Broker], None] | None = None) -> int:
    """Run a broker until SIGINT/SIGTERM (or ``broker.stop()``); uvloop when present. Returns the exit code."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    async def main() -> None:
        broker = Broker(config)
        if install_signals:
            import signal

            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, broker.stop)
        if ready is not None:
            ready(broker)
        await broker.run()

    runner(main())
    return 0

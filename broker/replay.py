"""Replay a capture's client side against a broker, with the recorded timing scaled by ``speed``.

Only frontend "in" records are sent (what drafters and generate clients sent), less the client library's heartbeats
(its liveness, not its workload); each recorded client gets its own DEALER socket; session and job ids are replaced
by fresh ones (per loop) so a replay never collides with live sessions or with itself.

Causal (the default): each session (and each generate job) is a chain that starts at its recorded time / speed;
its next request leaves once the answer to the previous one is back, plus the recorded think time (recorded send of
the next request - recorded answer to the previous one) / speed. A target's state therefore sees every session's
requests in the order and spacing a real drafter produces at that speed: a chunk never overtakes its predecessor
(which a target refuses with bad_sequence) and a close never overtakes the last result. A ``cancel`` keeps its
recorded distance to its job's request instead (it is sent while the job runs).

Open loop (``open_loop=True``): every request at its recorded time / speed, whatever the answers; at a speed the
recorded system never ran at, targets refuse chunks whose seq/pos no longer match (counted as errors).

Schedule drift = actual send time - scheduled time (causal: scheduled after the answer it waits for).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from broker.capture import CaptureRead, iter_records
from broker.client import request_stats
from broker.waits import within
from protocol.errors import SpecmqError
from protocol.messages import CLIENT_TYPES

FINAL = frozenset(("result", "session_opened", "error", "busy", "done", "stats", "reopen"))  # one per request
NO_ANSWER = frozenset(("session_close", "cancel"))  # client messages that get no answer
SPIN_S = 0.001  # sleep until this close to a send time, then yield-spin (timers are only ms-accurate)


class ReplayError(SpecmqError):
    """Nothing to replay, or the broker never answered."""


@dataclass
class Step:
    """A planned message ready to send in one loop: ``key`` names the answer it waits for (``Replayer._resolve``)."""

    planned: "Planned"
    sock: zmq.asyncio.Socket
    frame: bytes
    mtype: str
    key: tuple


@dataclass
class Planned:
    t: float  # seconds from the first client message
    peer: bytes
    msg: dict
    answered_at: float | None = None  # when the broker sent its final answer in the recording (same clock as t)

    @property
    def chain(self) -> tuple:
        """What this message waits on in causal replay: its client's session, or its job, or nothing (stats)."""
        if self.msg.get("session"):
            return (self.peer, "s", str(self.msg["session"]))
        if self.msg.get("job"):
            return (self.peer, "j", str(self.msg["job"]))
        return (self.peer, "t", self.t, id(self))

    @property
    def awaits_answer(self) -> bool:
        return self.msg.get("type") not in NO_ANSWER


@dataclass
class ReplayReport:
    sent: int = 0
    answered: int = 0  # requests whose final answer came back (tokens of a job are not counted)
    errors: int = 0  # Error replies (a chunk whose seq/pos no longer match, ...)
    busy: int = 0
    error_codes: Counter = field(default_factory=Counter)
    replies: Counter = field(default_factory=Counter)
    sent_by_type: Counter = field(default_factory=Counter)
    drifts_ms: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = sorted(self.drifts_ms)

        def pct(q: float) -> float:
            return round(d[min(len(d) - 1, int(q * len(d)))], 3) if d else 0.0

        return {"sent": self.sent, "answered": self.answered, "errors": self.errors, "busy": self.busy,
                "error_codes": dict(self.error_codes),
                "drift_p50_ms": pct(0.5), "drift_p99_ms": pct(0.99), "drift_max_ms": round(d[-1], 3) if d else 0.0,
                "duration_s": round(self.duration_s, 3), "sent_by_type": dict(self.sent_by_type),
                "replies": dict(self.replies), "warnings": self.warnings}


def load_plan(path: str | Path, sessions: str = "") -> tuple[list[Planned], list[str]]:
    """The client side of a capture, in time order; ``sessions``: substring filter on the recorded session id.

    Each request also gets ``answered_at``: when the broker sent its final answer in the recording (the first
    final answer to that client about that session and seq, job, or stats request), for causal replay's think
    times. A resend that the broker dropped as a duplicate, or a request cut off by the end of the capture, has none.
    """
    read = CaptureRead(Path(path))
    plan: list[Planned] = []
    waiting: dict[tuple, list[Planned]] = {}  # (peer, session|job|stats) -> requests without their answer yet
    for rec in iter_records(path, read):
        if rec.get("side", "frontend") != "frontend" or rec.get("dir") not in ("in", "out"):
            continue
        try:
            msg = msgpack.unpackb(rec["body"], raw=False, strict_map_key=False)
        except Exception:
            continue
        if not isinstance(msg, dict):
            continue
        peer, mtype = bytes(rec.get("peer", b"")), msg.get("type")
        if rec["dir"] == "out":
            if mtype in FINAL:
                _answered(waiting, peer, msg, float(rec["t"]))
            continue
        if mtype not in CLIENT_TYPES or mtype == "heartbeat":  # a client's liveness beats are not its workload
            continue
        if sessions:
            ident = str(msg.get("session") or msg.get("job") or "")
            if sessions not in ident:
                continue
        p = Planned(float(rec["t"]), peer, msg)
        plan.append(p)
        if p.awaits_answer:
            waiting.setdefault(_about(peer, msg), []).append(p)
    plan.sort(key=lambda p: p.t)
    if plan:
        t0 = plan[0].t
        for p in plan:
            p.t -= t0
            if p.answered_at is not None:
                p.answered_at -= t0
    return plan, read.warnings


def _about(peer: bytes, msg: dict) -> tuple:
    """Which requests of a client a message is about: one session, one job, or its stats requests."""
    if msg.get("session"):
        return (peer, "s", str(msg["session"]))
    if msg.get("job"):
        return (peer, "j", str(msg["job"]))
    return (peer, "stats")


def _seq_of(msg: dict) -> int:
    """A session request's or answer's seq: a verify's own, -1 for opens (and answers that carry none)."""
    seq = msg.get("seq", -1)
    return seq if isinstance(seq, int) and msg.get("type") != "session_open" else -1


def _answered(waiting: dict[tuple, list[Planned]], peer: bytes, answer: dict, t: float) -> None:
    """Mark the request ``answer`` (a final answer recorded at ``t``) answers: the oldest one waiting with its seq;
    a Reopen answers everything its session had in flight."""
    key = _about(peer, answer)
    queue = waiting.get(key)
    if not queue:
        return
    if answer.get("type") == "reopen":
        for p in queue:
            p.answered_at = t
        queue.clear()
        return
    seq = _seq_of(answer) if key[1] == "s" else None
    for i, p in enumerate(queue):
        if seq is None or _seq_of(p.msg) == seq:
            p.answered_at = t
            del queue[i]
            return


class Replayer:
    def __init__(self, address: str, plan: list[Planned], *, speed: float = 1.0, loops: int = 1,
                 drain_s: float = 2.0, connect_timeout: float = 3.0, curve: dict | None = None,
                 open_loop: bool = False, answer_timeout_s: float = 10.0) -> None:
        self.address = address
        self.plan = plan
        self.speed = speed
        self.loops = loops
        self.drain_s = drain_s
        self.connect_timeout = connect_timeout
        self.curve = curve or {}
        self.open_loop = open_loop
        self.answer_timeout_s = answer_timeout_s  # causal: longest a chain waits for an answer before going on
        self.report = ReplayReport()
        self.ctx = zmq.asyncio.Context()
        self.socks: dict[bytes, zmq.asyncio.Socket] = {}
        self.pending = 0  # requests sent whose final answer has not come
        self.late = 0  # causal: answers that did not come within answer_timeout_s (their chain went on)
        self.tag = uuid.uuid4().hex[:8]
        self._waiters: dict[tuple, asyncio.Future] = {}  # (about, seq) -> when its final answer arrived
        self._cancelled: set[tuple] = set()  # jobs cancelled before their answer: no answer is owed any more

    def _socket(self, peer: bytes) -> zmq.asyncio.Socket:
        sock = self.socks.get(peer)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            if self.curve:
                from broker.curve import apply_client

                apply_client(sock, self.curve["curve_secret"], self.curve["curve_server"],
                             self.curve.get("curve_public"))
            sock.connect(self.address)
            self.socks[peer] = sock
            self._readers.append(asyncio.create_task(self._read(sock, peer)))
        return sock

    async def _read(self, sock: zmq.asyncio.Socket, peer: bytes) -> None:
        while True:
            frame = await sock.recv()
            now = time.perf_counter()
            try:
                msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
                mtype = str(msg.get("type", "?"))
            except Exception:
                msg, mtype = {}, "?"
            self.report.replies[mtype] += 1
            if mtype in FINAL:
                self.report.answered += 1
                if mtype == "error":
                    self.report.errors += 1
                    self.report.error_codes[str(msg.get("code", "?"))] += 1
                elif mtype == "busy":
                    self.report.busy += 1
                if _about(peer, msg) not in self._cancelled:
                    self.pending -= 1
                self._resolve(peer, msg, now)
            if self.pending <= 0 and self._sending_done:
                self._idle.set()

    def _resolve(self, peer: bytes, msg: dict, now: float) -> None:
        """Wake whoever waits for this answer: the request it answers (a Reopen: all its session had in flight)."""
        about = _about(peer, msg)
        if msg.get("type") == "reopen":
            keys = [k for k in self._waiters if k[0] == about]
        else:
            keys = [(about, _seq_of(msg) if about[1] == "s" else None)]
        for k in keys:
            fut = self._waiters.pop(k, None)
            if fut is not None and not fut.done():
                fut.set_result(now)

    async def probe(self) -> None:
        """One stats request on a throwaway socket: a dead broker fails here, fast and clearly."""
        snap = await asyncio.to_thread(request_stats, self.address, self.connect_timeout, curve=self.curve)
        if snap is None:
            raise ReplayError(f"broker at {self.address} did not answer within {self.connect_timeout:g}s")

    def _rewrite(self, msg: dict, loop: int) -> dict:
        out = dict(msg)
        if out.get("session"):
            out["session"] = f"r{self.tag}.{loop}.{out['session']}"
        if out.get("job"):
            out["job"] = f"r{self.tag}.{loop}.{out['job']}"
        return out

    def _step(self, p: Planned, loop: int, pack) -> Step:
        """A planned message made ready to send: its socket, its frame (ids rewritten), what its answer will be."""
        msg = self._rewrite(p.msg, loop)
        about = _about(p.peer, msg)
        key = (about, _seq_of(msg) if about[1] == "s" else None)
        return Step(p, self._socket(p.peer), pack(msg), msg["type"], key)

    async def _send_at(self, due: float, step: Step) -> asyncio.Future | None:
        """Send ``step`` at ``due`` (perf_counter); returns the future of its answer's arrival time (None: none)."""
        wait = due - time.perf_counter()
        if wait > SPIN_S:
            await asyncio.sleep(wait - SPIN_S)
        while time.perf_counter() < due:
            await asyncio.sleep(0)
        answer = None
        if step.mtype == "cancel":  # the job it cancels owes no answer any more
            owed = self._waiters.pop((step.key[0], None), None)
            if owed is not None and not owed.done():
                self.pending -= 1
                self._cancelled.add(step.key[0])
        elif step.planned.awaits_answer:  # registered before the send: the answer may overtake our next line
            answer = self._waiters[step.key] = asyncio.get_running_loop().create_future()
            self.pending += 1
        try:
            step.sock.send(step.frame, zmq.NOBLOCK)
        except zmq.Again:  # no connected peer yet / HWM: wait for it (counts as drift)
            await step.sock.send(step.frame)
        self.report.drifts_ms.append((time.perf_counter() - due) * 1000)
        self.report.sent += 1
        self.report.sent_by_type[step.mtype] += 1
        return answer

    async def _answer(self, answer: asyncio.Future) -> float:
        """When ``answer`` came back; after ``answer_timeout_s`` without it, now (counted in ``late``)."""
        try:
            return await within(answer, self.answer_timeout_s)
        except asyncio.TimeoutError:
            self.late += 1
            return time.perf_counter()

    async def _play_open_loop(self, loops: list[list[Step]], start: float) -> None:
        """Every message at its recorded time / speed, whatever the answers; loops back to back."""
        span, loop_start = self.plan[-1].t, 0.0
        for steps in loops:
            for step in steps:
                await self._send_at(start + (loop_start + step.planned.t) / self.speed, step)
            loop_start += span + 0.001

    async def _play_causal(self, loops: list[list[Step]]) -> None:
        """Each session and job is a chain started at its recorded time / speed; loops one after another."""
        for steps in loops:
            chains: dict[tuple, list[Step]] = {}
            for step in steps:
                chains.setdefault(step.planned.chain, []).append(step)
            base = time.perf_counter()
            await asyncio.gather(*(self._play_chain(base, chain) for chain in chains.values()))

    async def _play_chain(self, base: float, chain: list[Step]) -> None:
        """A session's (or job's) messages in order: the next leaves after the previous one's answer plus the
        recorded think time / speed; one that gets no answer (close) is followed at the recorded gap / speed."""
        prev: Step | None = None
        sent_at = 0.0
        answer: asyncio.Future | None = None
        for step in chain:
            p = step.planned
            if prev is None:
                due = base + p.t / self.speed
            elif answer is None or step.mtype == "cancel":  # a cancel does not wait for its job
                due = sent_at + max(0.0, p.t - prev.planned.t) / self.speed
            else:
                got = await self._answer(answer)
                q = prev.planned
                think = p.t - (q.answered_at if q.answered_at is not None else q.t)
                due = got + max(0.0, think) / self.speed
            answer = await self._send_at(due, step)
            sent_at, prev = time.perf_counter(), step
        if answer is not None:
            await self._answer(answer)

    async def run(self) -> ReplayReport:
        if not self.plan:
            raise ReplayError("the capture holds no client messages to replay")
        self._readers: list[asyncio.Task] = []
        self._idle = asyncio.Event()
        self._sending_done = False
        try:
            await self.probe()
            pack = msgpack.Packer(use_bin_type=True).pack
            # rewrite and pack everything ahead, so the timed path is one non-blocking send
            loops = [[self._step(p, loop, pack) for p in self.plan] for loop in range(self.loops)]
            await asyncio.sleep(0.05)  # let the DEALERs connect before the clock starts
            start = time.perf_counter()
            if self.open_loop:
                await self._play_open_loop(loops, start)
            else:
                await self._play_causal(loops)
            self._sending_done = True
            if self.pending > 0:
                try:
                    await within(self._idle.wait(), self.drain_s)
                except asyncio.TimeoutError:
                    self.report.warnings.append(f"{self.pending} requests unanswered after {self.drain_s:g}s drain")
            if self.late:
                self.report.warnings.append(f"{self.late} answers did not come within {self.answer_timeout_s:g}s; "
                                            "their sessions went on without them")
            self.report.duration_s = time.perf_counter() - start
            return self.report
        finally:
            for t in self._readers:
                t.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)
            for s in self.socks.values():
                s.close(linger=0)
            self.ctx.term()


async def replay(path: str | Path, address: str, *, speed: float = 1.0, loops: int = 1, sessions: str = "",
                 drain_s: float = 2.0, connect_timeout: float = 3.0, curve: dict | None = None,
                 open_loop: bool = False, answer_timeout_s: float = 10.0) -> dict[str, Any]:
    """Replay ``path``'s client side against the broker at ``address``: causal per session unless ``open_loop``."""
    plan, warnings = load_plan(path, sessions)
    r = Replayer(address, plan, speed=speed, loops=loops, drain_s=drain_s, connect_timeout=connect_timeout,
                 curve=curve, open_loop=open_loop, answer_timeout_s=answer_timeout_s)
    report = await r.run()
    report.warnings = warnings + report.warnings
    out = report.as_dict()
    out["mode"] = "open_loop" if open_loop else "causal"
    return out

"""Replay a capture's client side against a broker, open loop, with the recorded timing scaled by ``speed``.

Only frontend "in" records are sent (what drafters and generate clients sent); each recorded client gets its own
DEALER socket; session and job ids are replaced by fresh ones (per loop) so a replay never collides with live
sessions or with itself. Chunks go at their recorded times whatever the answers: a target may refuse ones whose
seq/pos no longer match, and those are counted as errors. Schedule drift = actual send time - scheduled time.
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
from protocol.errors import SpecmqError
from protocol.messages import CLIENT_TYPES

FINAL = frozenset(("result", "session_opened", "error", "busy", "done", "stats", "reopen"))  # one per request
SPIN_S = 0.001  # sleep until this close to a send time, then yield-spin (timers are only ms-accurate)


class ReplayError(SpecmqError):
    """Nothing to replay, or the broker never answered."""


@dataclass
class Planned:
    t: float  # seconds from the first client message
    peer: bytes
    msg: dict


@dataclass
class ReplayReport:
    sent: int = 0
    answered: int = 0  # requests whose final answer came back (tokens of a job are not counted)
    errors: int = 0  # Error replies (a chunk whose seq/pos no longer match, ...)
    busy: int = 0
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
                "drift_p50_ms": pct(0.5), "drift_p99_ms": pct(0.99), "drift_max_ms": round(d[-1], 3) if d else 0.0,
                "duration_s": round(self.duration_s, 3), "sent_by_type": dict(self.sent_by_type),
                "replies": dict(self.replies), "warnings": self.warnings}


def load_plan(path: str | Path, sessions: str = "") -> tuple[list[Planned], list[str]]:
    """The client side of a capture, in time order; ``sessions``: substring filter on the recorded session id."""
    read = CaptureRead(Path(path))
    plan: list[Planned] = []
    for rec in iter_records(path, read):
        if rec.get("dir") != "in" or rec.get("side", "frontend") != "frontend":
            continue
        try:
            msg = msgpack.unpackb(rec["body"], raw=False, strict_map_key=False)
        except Exception:
            continue
        if not isinstance(msg, dict) or msg.get("type") not in CLIENT_TYPES:
            continue
        if sessions:
            ident = str(msg.get("session") or msg.get("job") or "")
            if sessions not in ident:
                continue
        plan.append(Planned(float(rec["t"]), bytes(rec.get("peer", b"")), msg))
    plan.sort(key=lambda p: p.t)
    if plan:
        t0 = plan[0].t
        for p in plan:
            p.t -= t0
    return plan, read.warnings


class Replayer:
    def __init__(self, address: str, plan: list[Planned], *, speed: float = 1.0, loops: int = 1,
                 drain_s: float = 2.0, connect_timeout: float = 3.0, curve: dict | None = None) -> None:
        self.address = address
        self.plan = plan
        self.speed = speed
        self.loops = loops
        self.drain_s = drain_s
        self.connect_timeout = connect_timeout
        self.curve = curve or {}
        self.report = ReplayReport()
        self.ctx = zmq.asyncio.Context()
        self.socks: dict[bytes, zmq.asyncio.Socket] = {}
        self.pending = 0  # requests sent whose final answer has not come
        self.tag = uuid.uuid4().hex[:8]

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
            self._readers.append(asyncio.create_task(self._read(sock)))
        return sock

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frame = await sock.recv()
            try:
                mtype = str(msgpack.unpackb(frame, raw=False, strict_map_key=False).get("type", "?"))
            except Exception:
                mtype = "?"
            self.report.replies[mtype] += 1
            if mtype in FINAL:
                self.report.answered += 1
                self.pending -= 1
                if mtype == "error":
                    self.report.errors += 1
                elif mtype == "busy":
                    self.report.busy += 1
            if self.pending <= 0 and self._sending_done:
                self._idle.set()

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

    async def run(self) -> ReplayReport:
        if not self.plan:
            raise ReplayError("the capture holds no client messages to replay")
        self._readers: list[asyncio.Task] = []
        self._idle = asyncio.Event()
        self._sending_done = False
        try:
            await self.probe()
            pack = msgpack.Packer(use_bin_type=True).pack
            span = self.plan[-1].t
            # rewrite and pack everything ahead, so the timed path is one non-blocking send
            loops = [[(p.t, self._socket(p.peer), pack(self._rewrite(p.msg, loop)), p.msg["type"])
                      for p in self.plan] for loop in range(self.loops)]
            await asyncio.sleep(0.05)  # let the DEALERs connect before the clock starts
            start = time.perf_counter()
            loop_start = 0.0
            for ready in loops:
                for t, sock, frame, mtype in ready:
                    due = start + (loop_start + t) / self.speed
                    wait = due - time.perf_counter()
                    if wait > SPIN_S:
                        await asyncio.sleep(wait - SPIN_S)
                    while time.perf_counter() < due:
                        await asyncio.sleep(0)
                    try:
                        sock.send(frame, zmq.NOBLOCK)
                    except zmq.Again:  # no connected peer yet / HWM: wait for it (counts as drift)
                        await sock.send(frame)
                    self.report.drifts_ms.append((time.perf_counter() - due) * 1000)
                    self.report.sent += 1
                    self.report.sent_by_type[mtype] += 1
                    if mtype != "session_close":
                        self.pending += 1
                loop_start += span + 0.001
            self._sending_done = True
            if self.pending > 0:
                try:
                    await asyncio.wait_for(self._idle.wait(), self.drain_s)
                except asyncio.TimeoutError:
                    self.report.warnings.append(f"{self.pending} requests unanswered after {self.drain_s:g}s drain")
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
                 drain_s: float = 2.0, connect_timeout: float = 3.0, curve: dict | None = None) -> dict[str, Any]:
    plan, warnings = load_plan(path, sessions)
    r = Replayer(address, plan, speed=speed, loops=loops, drain_s=drain_s, connect_timeout=connect_timeout,
                 curve=curve)
    report = await r.run()
    report.warnings = warnings + report.warnings
    return report.as_dict()

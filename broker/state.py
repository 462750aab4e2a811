"""The broker's state, explicit and printable (Majordomo style): workers, sessions, jobs, queues, counters.

Nothing here does I/O. ``broker.broker.Broker`` mutates this state from its handlers; ``stats_snapshot`` turns it
into the plain dict that ``Stats`` carries (and that the monitor, Prometheus and PUB publishers read).
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from broker.routing import WorkerLoad, worker_load
from protocol.messages import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS


@dataclass
class BrokerConfig:
    """Every knob of the broker; ``configs/broker.yaml`` and ``specmq broker`` flags map onto these names."""

    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    router: str = "least_loaded"
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S  # seconds between heartbeats, both ways
    liveness: int = HEARTBEAT_LIVENESS  # a worker silent for this many intervals is dead
    max_queue: int = 10_000  # bound of each verify queue and of the generate queue
    max_frame: int = 1 << 20  # bytes; larger frames get Error(too_large)
    max_deliveries: int = 3  # a generate job handed out this many times without Done is poison
    grace_s: float = 5.0  # on shutdown, how long in-flight work may take to finish
    retry_ms: int = 20  # Busy retry hint
    hwm: int = 100_000  # explicit high-water marks (SNDHWM and RCVHWM) on both ROUTERs
    max_credit: int = 1_000_000  # a worker's credit is clamped here (untrusted input)
    seed: int = 0  # routing policy randomness
    session_idle_s: float = 300.0  # a session silent this long is closed (its target slot freed); 0 = never
    queue_timeout_s: float = 120.0  # longest an open or job waits for a slot when its client names no deadline
    # operations (broker/ops.py, broker/capture.py, broker/curve.py); all off unless set
    metrics_port: int | None = None  # Prometheus HTTP port (0 = any free port); None = off
    metrics_host: str = "127.0.0.1"
    stats_pub: str = "auto"  # PUB address for 1 s stats snapshots; "auto" = frontend port + 2, "" = off
    capture: str = ""  # capture file (every message in and out); "" = off
    capture_max_bytes: int = 0  # rotate the capture file past this size (0 = never)
    curve_secret: str = ""  # the broker's CURVE secret key file: encrypts the frontend
    allow: str = ""  # directory of allowed client public keys (with curve_secret)


@dataclass
class Worker:
    """A registered worker (target or fused) on the backend ROUTER."""

    identity: bytes
    kind: str
    model: str
    capacity: int
    vocab_size: int = 0
    tokenizer: str = ""
    max_gamma: int = 16
    max_context: int = 0
    name: str = ""
    incarnation: int = 0  # its Ready's incarnation: stamped on every request forwarded, required on every answer
    credit: int = 0  # requests we may still forward
    last_seen: float = field(default_factory=time.monotonic)
    sessions: set[str] = field(default_factory=set)  # namespaced session keys placed here (target)
    queue: deque = field(default_factory=deque)  # verify queue (target): (session key, seq, encoded body)
    jobs: dict[str, "Job"] = field(default_factory=dict)  # generate jobs handed to it (fused)
    stats: dict = field(default_factory=dict)  # its own figures from Heartbeat.stats

    @property
    def label(self) -> str:
        return self.name or self.identity.hex()


@dataclass
class Session:
    """A drafter's session, keyed by ``client identity / session id`` so two clients never collide."""

    key: str
    client: bytes
    session: str
    worker: bytes | None = None  # target identity; None while waiting for the client's (re)open
    opening: bool = False  # SessionOpen forwarded, SessionOpened not yet back
    last_seq: int = -1  # last seq answered
    last_result: bytes | None = None  # its encoded answer, resent for a retried chunk
    inflight: set[int] = field(default_factory=set)  # seqs forwarded and not yet answered
    last_active: float = field(default_factory=time.monotonic)  # last message from its client (idle expiry)


@dataclass
class Job:
    """A generate job; forgotten only on Done (the ack) or a final Error."""

    key: str
    client: bytes
    job: str
    body: dict  # the client's Generate map, job id namespaced
    deliveries: int = 0
    worker: bytes | None = None
    deadline: float = float("inf")  # monotonic time after which a job still queued is refused (overloaded)


@dataclass
class Waiting:
    """A session open in the admission queue: every target that could take it is full. FIFO; past ``deadline``
    the client gets ``Error(overloaded)``."""

    key: str
    client: bytes
    session: str
    body: dict  # the client's SessionOpen map, as received
    deadline: float
    since: float = field(default_factory=time.monotonic)


class Counters:
    """Every counter in one object, so the stats snapshot and the Prometheus exporter read one place."""

    def __init__(self) -> None:
        self.msgs_in: Counter[str] = Counter()  # by message type ("?" when undecodable)
        self.msgs_out: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # error replies and drops, by code
        self.busy = 0
        self.dead_workers = 0
        self.sessions_placed = 0
        self.reopens = 0
        self.duplicates = 0  # retried chunks answered from cache or dropped while in flight
        self.redeliveries = 0
        self.poison_jobs = 0
        self.cancelled = 0  # generate jobs their client cancelled (dropped from the queue or freed on the worker)
        self.unreachable = 0  # sends that hit EHOSTUNREACH
        self.send_blocked = 0  # sends that hit EAGAIN (peer's HWM) and were held in the outbox
        self.dropped = 0  # frames with nobody to answer (counted, logged)
        self.auth_failures = 0  # CURVE clients refused by the allow-list (set from the ZAP thread)
        self.refused_handshakes = 0  # frontend handshakes that failed: key not allowed, wrong broker key, no CURVE
        self.stale_answers = 0  # worker answers of an earlier registration (incarnation), dropped
        self.sessions_expired = 0  # sessions closed by the broker after session_idle_s of client silence
        self.admitted = 0  # opens that waited in the admission queue, then got a slot
        self.overloaded = 0  # opens and jobs whose queue deadline passed before a slot was free

    def as_dict(self) -> dict[str, Any]:
        return {
            "msgs_in": dict(self.msgs_in),
            "msgs_out": dict(self.msgs_out),
            "errors": dict(self.errors),
            "busy": self.busy,
            "dead_workers": self.dead_workers,
            "sessions_placed": self.sessions_placed,
            "reopens": self.reopens,
            "duplicates": self.duplicates,
            "redeliveries": self.redeliveries,
            "poison_jobs": self.poison_jobs,
            "cancelled": self.cancelled,
            "unreachable": self.unreachable,
            "send_blocked": self.send_blocked,
            "dropped": self.dropped,
            "auth_failures": self.auth_failures,
            "refused_handshakes": self.refused_handshakes,
            "stale_answers": self.stale_answers,
            "sessions_expired": self.sessions_expired,
            "admitted": self.admitted,
            "overloaded": self.overloaded,
        }


@dataclass
class BrokerState:
    workers: dict[bytes, Worker] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    generate_queue: deque = field(default_factory=deque)  # Jobs waiting for fused credit
    admission: dict[str, Waiting] = field(default_factory=dict)  # opens waiting for a target slot, FIFO (by key)
    counters: Counters = field(default_factory=Counters)
    started: float = field(default_factory=time.monotonic)

    def targets(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.kind == "target"]

    def fused(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.kind == "fused"]

    def inflight(self) -> int:
        """Requests not answered yet (verify chunks, opens, generate jobs); derived from sessions, so never drifts."""
        return sum(len(w.jobs) for w in self.workers.values()) + sum(self.session_inflight().values())

    def session_inflight(self) -> dict[bytes, int]:
        """Per target: chunks and opens accepted for its sessions and not answered yet."""
        per: dict[bytes, int] = {}
        for s in self.sessions.values():
            if s.worker is not None and (s.inflight or s.opening):
                per[s.worker] = per.get(s.worker, 0) + len(s.inflight) + s.opening
        return per

    def loads(self, targets: Sequence[Worker]) -> list[WorkerLoad]:
        """The routing policy's view of ``targets`` (``broker.routing.worker_load``): sessions placed, and opens and
        chunks accepted and not answered yet wherever they wait. Not the broker's own verify queue: a target that
        grants generous credit empties that queue at once however far behind its answers are.
        """
        pending = self.session_inflight()
        return [worker_load(w.identity.hex(), w.capacity, len(w.sessions), pending.get(w.identity, 0))
                for w in targets]

    def stats_snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        queues: dict[str, Any] = {
            "generate": {
                "depth": len(self.generate_queue),
                "inflight": sum(len(w.jobs) for w in self.workers.values()),
            },
            "admission": {
                "depth": len(self.admission),
                "oldest_s": round(now - next(iter(self.admission.values())).since, 3) if self.admission else 0.0,
            },
        }
        workers: dict[str, Any] = {}
        pending = self.session_inflight()
        for w in self.workers.values():
            if w.kind == "target":  # inflight: accepted and unanswered (queued ones included)
                queues[f"verify:{w.label}"] = {"depth": len(w.queue), "inflight": pending.get(w.identity, 0)}
            workers[w.label] = {
                "kind": w.kind,
                "model": w.model,
                "capacity": w.capacity,
                "incarnation": w.incarnation,
                "sessions": len(w.sessions),
                "jobs": len(w.jobs),
                "credit": w.credit,
                "heartbeat_age_s": round(now - w.last_seen, 3),
                "stats": dict(w.stats),
            }
        return {
            "uptime_s": round(now - self.started, 3),
            "queues": queues,
            "workers": workers,
            "sessions": len(self.sessions),
            "jobs": len(self.jobs),
            "counters": self.counters.as_dict(),
        }

"""Broker operations surface: Prometheus metrics, the 1 s stats PUB, and the capture writer with its flush timer.

No bookkeeping on the hot path: the broker's loop builds one stats snapshot every second (and when a scrape asks for
a fresh one) and swaps it in by reference; the HTTP thread and the PUB socket only ever read a finished snapshot
dict, so a scrape sees one consistent moment. ``SnapshotCollector`` turns a snapshot into ``specmq_*`` metric
families at scrape time. ``Ops`` gets everything it needs from the broker as explicit arguments (a snapshot
callable, the broker's list of taps, its ZeroMQ context, CURVE server and frontend address), never the broker.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Iterator

import structlog
import zmq

from broker.capture import CaptureWriter
from broker.state import BrokerConfig
from protocol.codec import encode
from protocol.messages import Stats

if TYPE_CHECKING:
    import asyncio

    from broker.curve import CurveServer

log = structlog.get_logger("broker.ops")

Tap = Callable[[str, str, bytes, bytes], None]

PUBLISH_S = 1.0
FRESH_WAIT_S = 0.5  # a scrape waits this long for the loop to publish a fresh snapshot, else serves the last


def stats_pub_address(frontend: str, setting: str) -> str:
    """The PUB address: "" = off, "auto" = the frontend's port + 2 (wildcard port: any), else the setting."""
    if setting != "auto":
        return setting
    m = re.match(r"^(tcp://.+):(\d+|\*)$", frontend)
    if not m:
        return ""
    host, port = m.groups()
    return f"{host}:{int(port) + 2}" if port != "*" else f"{host}:*"


class SnapshotCollector:
    """Prometheus collector over the latest published snapshot (``get()`` returns it)."""

    def __init__(self, get: Callable[[], dict[str, Any] | None]) -> None:
        self.get = get

    def describe(self) -> list:
        return []  # unchecked collector: families depend on the snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.get() or {}
        c = snap.get("counters", {})

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        def counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        up = gauge("specmq_uptime_seconds", "seconds since the broker started")
        up.add_metric([], snap.get("uptime_s", 0.0))
        yield up
        depth = gauge("specmq_queue_depth", "requests queued at the broker, not yet forwarded", ["queue"])
        inflight = gauge("specmq_queue_inflight", "requests accepted and not answered yet", ["queue"])
        for q, v in snap.get("queues", {}).items():
            depth.add_metric([q], v.get("depth", 0))
            inflight.add_metric([q], v.get("inflight", 0))
        yield depth
        yield inflight
        sessions = gauge("specmq_sessions_open", "sessions the broker knows")
        sessions.add_metric([], snap.get("sessions", 0))
        yield sessions
        jobs = gauge("specmq_jobs_open", "generate jobs queued or running")
        jobs.add_metric([], snap.get("jobs", 0))
        yield jobs
        workers = gauge("specmq_workers", "live workers by kind", ["kind"])
        kinds: dict[str, int] = {}
        per_worker = {
            "sessions": gauge("specmq_worker_sessions", "sessions placed on a target worker", ["worker", "kind"]),
            "jobs": gauge("specmq_worker_jobs", "generate jobs held by a fused worker", ["worker", "kind"]),
            "credit": gauge("specmq_worker_credit", "requests the broker may still forward", ["worker", "kind"]),
            "capacity": gauge("specmq_worker_capacity", "announced slots or jobs", ["worker", "kind"]),
            "heartbeat_age_s": gauge("specmq_worker_heartbeat_age_seconds", "seconds since the worker was last heard",
                                     ["worker", "kind"]),
        }
        reported = {  # from the workers' own Heartbeat.stats: name -> (family, stats key)
            "tick": (gauge("specmq_worker_tick_seconds", "verify tick time (EWMA)", ["worker"]), "tick_ms", 1e-3),
            "batch": (gauge("specmq_worker_batch_rows", "verify batch size (rows) of the last tick", ["worker"]),
                      "batch_rows", 1),
            "btok": (gauge("specmq_worker_batch_tokens", "tokens in the last tick", ["worker"]), "batch_tokens", 1),
            "slots": (gauge("specmq_worker_slots_used", "KV slots in use", ["worker"]), "slots_used", 1),
            "slots_t": (gauge("specmq_worker_slots_total", "KV slots", ["worker"]), "slots_total", 1),
            "acc": (counter("specmq_worker_accepted_tokens", "draft tokens accepted", ["worker"]), "accepted", 1),
            "dr": (counter("specmq_worker_drafted_tokens", "draft tokens verified", ["worker"]), "drafted", 1),
            "ticks": (counter("specmq_worker_ticks", "verify ticks", ["worker"]), "ticks", 1),
        }
        for name, w in snap.get("workers", {}).items():
            kind = str(w.get("kind", ""))
            kinds[kind] = kinds.get(kind, 0) + 1
            for key, fam in per_worker.items():
                fam.add_metric([name, kind], float(w.get(key, 0) or 0))
            stats = w.get("stats") or {}
            for fam, key, scale in reported.values():
                v = stats.get(key)
                if isinstance(v, (int, float)):
                    fam.add_metric([name], float(v) * scale)
        for kind, n in sorted(kinds.items()):
            workers.add_metric([kind], n)
        yield workers
        yield from per_worker.values()
        for fam, _, _ in reported.values():
            yield fam
        msgs_in = counter("specmq_messages_in", "messages received, by type", ["type"])
        for t, n in c.get("msgs_in", {}).items():
            msgs_in.add_metric([t], n)
        yield msgs_in
        msgs_out = counter("specmq_messages_out", "messages sent, by type", ["type"])
        for t, n in c.get("msgs_out", {}).items():
            msgs_out.add_metric([t], n)
        yield msgs_out
        for name, doc, src, key in (
            ("specmq_chunks_in", "verify chunks received from drafters", "msgs_in", "verify"),
            ("specmq_chunks_out", "verify results sent to drafters", "msgs_out", "result"),
            ("specmq_jobs_in", "generate jobs received", "msgs_in", "generate"),
            ("specmq_jobs_out", "generate jobs finished (done sent)", "msgs_out", "done"),
        ):
            fam = counter(name, doc)
            fam.add_metric([], c.get(src, {}).get(key, 0))
            yield fam
        errors = counter("specmq_errors", "error replies and drops, by code", ["code"])
        for code, n in c.get("errors", {}).items():
            errors.add_metric([code], n)
        yield errors
        for key, doc in (
            ("busy", "Busy replies (a queue was full)"),
            ("dead_workers", "workers declared dead"),
            ("sessions_placed", "sessions placed on a target"),
            ("reopens", "Reopen sent to drafters"),
            ("duplicates", "retried chunks and jobs"),
            ("redeliveries", "generate jobs handed out again"),
            ("poison_jobs", "jobs given up after max deliveries"),
            ("cancelled", "generate jobs cancelled by their client"),
            ("unreachable", "sends to a vanished peer"),
            ("send_blocked", "sends held by a full peer"),
            ("dropped", "frames nobody waits for"),
            ("auth_failures", "CURVE clients refused by the allow-list"),
            ("refused_handshakes", "frontend handshakes refused (key not allowed, wrong broker key, no CURVE)"),
            ("stale_answers", "worker answers of an earlier registration, dropped"),
            ("sessions_expired", "sessions closed after their client went silent"),
            ("admitted", "session opens that waited in the admission queue, then got a slot"),
            ("overloaded", "opens and jobs refused because their queue deadline passed"),
        ):
            fam = counter(f"specmq_{key}", doc)
            fam.add_metric([], c.get(key, 0))
            yield fam
        cap = snap.get("capture")
        if cap:
            fam = counter("specmq_capture_records", "messages written to the capture file")
            fam.add_metric([], cap.get("records", 0))
            yield fam
            fam = counter("specmq_capture_bytes", "bytes written to the capture file")
            fam.add_metric([], cap.get("bytes", 0))
            yield fam


class Ops:
    """Per-broker operations: owns the capture writer, the stats PUB socket and the metrics HTTP server.

    Created by ``Broker.run`` on the loop thread; ``close()`` from ``finish_shutdown``. ``snapshot()`` builds the
    broker's stats snapshot (called on the loop thread only); the capture's tap is appended to ``taps``, the list
    the broker calls for every frame, and removed from it if a write fails.
    """

    def __init__(self, config: BrokerConfig, loop: "asyncio.AbstractEventLoop", *,
                 snapshot: Callable[[], dict[str, Any]], ctx: zmq.Context, frontend: str, taps: list[Tap],
                 curve: "CurveServer | None" = None) -> None:
        self.config = config
        self.loop = loop
        self.snapshot = snapshot
        self.ctx = ctx
        self.curve = curve
        self.capture: CaptureWriter | None = None
        self.pub: zmq.Socket | None = None
        self.pub_endpoint = ""
        self.httpd = None
        self.metrics_url = ""
        self._snapshot: dict[str, Any] = {}
        self._fresh = threading.Event()
        self._timers: list[Any] = []
        self._closed = False
        if config.capture:
            def drop_tap() -> None:  # a failed write (disk full...): stop capturing, keep serving
                taps[:] = [t for t in taps if t is not tap]

            self.capture = CaptureWriter(config.capture, asdict(config), config.capture_max_bytes, on_fail=drop_tap)
            tap = self.capture.tap
            taps.append(tap)
            self._every(0.1, self.capture.flush)
        pub = stats_pub_address(frontend, config.stats_pub)
        if pub:
            self._bind_pub(pub, explicit=config.stats_pub != "auto")
        if config.metrics_port is not None:
            self._start_http()
        self.publish()
        self._every(PUBLISH_S, self.publish)

    def _every(self, period: float, fn) -> None:
        def tick() -> None:
            if self._closed:
                return
            try:
                fn()
            except Exception as exc:  # never let a timer kill the loop
                log.warning("ops.timer_failed", fn=getattr(fn, "__name__", "?"), error=repr(exc))
            self._timers.append(self.loop.call_later(period, tick))
            if len(self._timers) > 16:
                del self._timers[:-4]

        self._timers.append(self.loop.call_later(period, tick))

    def _bind_pub(self, address: str, explicit: bool) -> None:
        sock = self.ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10)
        if self.curve is not None:
            self.curve.apply(sock)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close()
            if explicit:
                raise
            log.warning("stats_pub.unavailable", address=address, error=str(exc))
            return
        self.pub = sock
        self.pub_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _start_http(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(self.scrape_snapshot))
        try:
            self.httpd, _ = start_http_server(self.config.metrics_port, addr=self.config.metrics_host,
                                              registry=registry)
        except OSError as exc:
            raise zmq.ZMQError(msg=f"metrics port {self.config.metrics_host}:{self.config.metrics_port}: "
                                   f"{exc.strerror}") from None
        host, port = self.httpd.server_address[:2]
        self.metrics_url = f"http://{host}:{port}/metrics"
        log.info("metrics.serving", url=self.metrics_url)

    # -------------------------------------------------------------- snapshots
    def extra(self) -> dict[str, Any]:
        """Keys the broker adds to its stats snapshot: where to find these services."""
        out: dict[str, Any] = {"stats_pub": self.pub_endpoint, "metrics": self.metrics_url}
        if self.capture is not None:
            out["capture"] = self.capture.info()
        return out

    def publish(self) -> None:
        """On the loop thread: build a snapshot, swap it in, send it on PUB."""
        snap = self.snapshot()
        snap["published_at"] = time.time()
        self._snapshot = snap
        self._fresh.set()
        if self.pub is not None:
            try:
                self.pub.send(encode(Stats(snapshot=snap)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def latest(self) -> dict[str, Any]:
        return self._snapshot

    def scrape_snapshot(self) -> dict[str, Any]:
        """From the HTTP thread: ask the loop for a fresh snapshot, wait briefly, else serve the last one."""
        if self._closed:
            return self._snapshot
        self._fresh.clear()
        try:
            self.loop.call_soon_threadsafe(self.publish)
        except RuntimeError:  # loop closed
            return self._snapshot
        self._fresh.wait(FRESH_WAIT_S)
        return self._snapshot

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.publish()
        except Exception:  # sockets may be closing; the last snapshot stays
            pass
        self._closed = True
        for t in self._timers:
            t.cancel()
        if self.capture is not None:
            self.capture.close()
            log.info("capture.closed", **self.capture.info())
        if self.pub is not None:
            self.pub.close(linger=0)
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

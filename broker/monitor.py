"""What ``specmq monitor`` shows, computed from broker stats snapshots: rates, per-worker rows, the live view.

Snapshots are the broker's ``Stats`` dicts (``BrokerState.stats_snapshot`` plus the ops keys). Rates are counter
deltas between two snapshots; acceptance, tick time and batch size are the workers' own heartbeat figures.
``subscribe`` / ``recv_snapshot`` follow the broker's stats PUB socket instead of polling.
"""
from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from broker.client import STATS_MAX_FRAME
from broker.waits import within
from protocol.codec import decode

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 30


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))] for v in values)


def rates(prev: dict | None, snap: dict) -> dict[str, float]:
    """Per-second rates of the main counters between two snapshots (empty for the first)."""
    if not prev:
        return {}
    dt = snap.get("uptime_s", 0) - prev.get("uptime_s", 0)
    if dt <= 0:
        return {}
    c, p = snap.get("counters", {}), prev.get("counters", {})
    out = {}
    for name, src, key in (("chunks_in", "msgs_in", "verify"), ("results_out", "msgs_out", "result"),
                           ("jobs_in", "msgs_in", "generate"), ("jobs_done", "msgs_out", "done"),
                           ("errors", "msgs_out", "error"), ("busy", "msgs_out", "busy")):
        out[name] = (c.get(src, {}).get(key, 0) - p.get(src, {}).get(key, 0)) / dt
    return out


def worker_rows(snap: dict, prev: dict | None) -> list[dict[str, Any]]:
    """One row per worker; ``rate_per_s``: its own work counter's delta (served / rows / ticks) per second."""
    rows = []
    dt = snap.get("uptime_s", 0) - (prev or {}).get("uptime_s", 0) if prev else 0
    for name, w in snap.get("workers", {}).items():
        st = w.get("stats") or {}
        pst = ((prev or {}).get("workers", {}).get(name) or {}).get("stats") or {}
        drafted, accepted = st.get("drafted"), st.get("accepted")
        acc = None
        if isinstance(drafted, (int, float)) and isinstance(accepted, (int, float)):
            dd = drafted - pst.get("drafted", 0) if pst else drafted
            da = accepted - pst.get("accepted", 0) if pst else accepted
            acc = da / dd if dd > 0 else (accepted / drafted if drafted else None)
        rate = None
        key = next((k for k in ("served", "rows", "ticks") if isinstance(st.get(k), (int, float))), None)
        if key and pst and dt > 0:
            rate = (st[key] - pst.get(key, 0)) / dt
        rows.append({"worker": name, "kind": w.get("kind"), "sessions": w.get("sessions", 0), "jobs": w.get("jobs", 0),
                     "credit": w.get("credit", 0), "slots": f"{st.get('slots_used', '-')}/{st.get('slots_total', w.get('capacity', '-'))}",
                     "tick_ms": st.get("tick_ms"), "batch_rows": st.get("batch_rows"), "acceptance": acc,
                     "heartbeat_age_s": w.get("heartbeat_age_s"), "rate_per_s": rate})
    return rows


def render(snap: dict, prev: dict | None, history: dict[str, deque], address: str):
    from rich.console import Group
    from rich.table import Table

    r = rates(prev, snap)
    c = snap.get("counters", {})
    title = (f"specmq broker {address}  up {snap.get('uptime_s', 0):.0f}s  sessions {snap.get('sessions', 0)}  "
             f"jobs {snap.get('jobs', 0)}  chunks/s {r.get('chunks_in', 0):.0f}  results/s {r.get('results_out', 0):.0f}"
             f"  jobs/s {r.get('jobs_done', 0):.1f}  busy {c.get('busy', 0)}  dead {c.get('dead_workers', 0)}"
             f"  auth_fail {c.get('auth_failures', 0)}")
    qt = Table(expand=False)
    for col in ("queue", "depth", "in-flight", "depth history"):
        qt.add_column(col, justify="left" if col in ("queue", "depth history") else "right")
    for q, v in snap.get("queues", {}).items():
        h = history.setdefault(q, deque(maxlen=HISTORY))
        qt.add_row(q, str(v.get("depth", 0)), str(v.get("inflight", 0)), sparkline(list(h)))
    wt = Table(expand=False)
    for col in ("worker", "kind", "sessions", "jobs", "credit", "slots", "work/s", "tick ms", "batch", "accept",
                "hb age s"):
        wt.add_column(col, justify="left" if col in ("worker", "kind") else "right")
    for row in worker_rows(snap, prev):
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        wt.add_row(row["worker"], str(row["kind"]), str(row["sessions"]), str(row["jobs"]), str(row["credit"]),
                   row["slots"], fmt(row["rate_per_s"], ".0f"), fmt(row["tick_ms"], ".2f"), fmt(row["batch_rows"], "d") if isinstance(
                       row["batch_rows"], int) else "-", fmt(row["acceptance"], ".0%"),
                   fmt(row["heartbeat_age_s"], ".1f"))
    errs = c.get("errors", {})
    foot = "errors: " + (", ".join(f"{k}={v}" for k, v in sorted(errs.items())) or "none")
    from rich.text import Text

    return Group(Text(title, style="bold"), qt, wt, Text(foot))


def subscribe(pub: str, frontend: str, curve: dict) -> zmq.asyncio.Socket:
    """A SUB socket on the advertised PUB address (its host as seen from here: the frontend's host)."""
    m_pub, m_fe = re.match(r"^tcp://(.+):(\d+)$", pub), re.match(r"^tcp://(.+):(\d+)$", frontend)
    if m_pub and m_fe and m_pub.group(1) in ("0.0.0.0", "*", "[::]"):
        pub = f"tcp://{m_fe.group(1)}:{m_pub.group(2)}"
    sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if curve:
        from broker.curve import apply_client

        apply_client(sock, curve["curve_secret"], curve["curve_server"], curve.get("curve_public"))
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(pub)
    return sock


async def recv_snapshot(sock: zmq.asyncio.Socket, timeout: float) -> dict | None:
    """The next published snapshot, or None when none came within ``timeout`` (or it did not decode)."""
    try:
        frame = await within(sock.recv(), timeout)
        return decode(frame, max_frame=STATS_MAX_FRAME).snapshot
    except (asyncio.TimeoutError, Exception):
        return None

"""``specmq monitor``: live queue depths and worker figures from a broker, given only its frontend address.

Snapshots come from ``StatsRequest`` over the frontend every ``--interval`` (or, with ``--sub``, from the broker's
stats PUB socket that the snapshot advertises). Rates are counter deltas between two snapshots; acceptance,
tick time and batch size are the workers' own heartbeat figures. ``--once --json`` prints one snapshot.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from typing import Any

from specmq.cliutil import CommandError, add_command, print_json

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


async def one_stats(client, timeout: float) -> dict:
    """One snapshot within ``timeout`` in all (no resends)."""
    from protocol.messages import Stats, StatsRequest

    reply = await client.request(StatsRequest(), timeout=timeout, retries=0)
    if not isinstance(reply, Stats):
        raise CommandError(f"broker answered {reply.TYPE} to a stats request")
    return reply.snapshot


async def fetch(address: str, timeout: float, curve: dict) -> dict:
    from broker.client import BrokerClient

    async with BrokerClient(address, timeout=timeout, **curve) as client:
        try:
            return await one_stats(client, timeout)
        except TimeoutError as exc:
            raise CommandError(f"broker at {address} did not answer within {timeout:g}s"
                               + (f" ({client.handshake_error})" if client.handshake_error else "")) from exc


async def _live(args: argparse.Namespace, curve: dict) -> None:
    from rich.live import Live

    from broker.client import BrokerClient

    history: dict[str, deque] = {}
    prev = None
    async with BrokerClient(args.broker, timeout=args.timeout, **curve) as client:
        sub = None
        try:
            snap = await one_stats(client, args.timeout)
        except TimeoutError:
            raise CommandError(f"broker at {args.broker} did not answer within {args.timeout:g}s"
                               + (f" ({client.handshake_error})" if client.handshake_error else "")) from None
        if args.sub and snap.get("stats_pub"):
            sub = _subscribe(snap["stats_pub"], args.broker, curve)
        with Live(render(snap, prev, history, args.broker), refresh_per_second=4, screen=False) as live:
            while True:
                for q, v in snap.get("queues", {}).items():
                    history.setdefault(q, deque(maxlen=HISTORY)).append(v.get("depth", 0))
                live.update(render(snap, prev, history, args.broker))
                prev = snap
                t0 = time.monotonic()
                snap = None
                if sub is not None:
                    snap = await _recv_pub(sub, max(args.interval * 3, 2.0))
                if snap is None:
                    await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - t0)))
                    try:
                        snap = await one_stats(client, args.timeout)
                    except TimeoutError:
                        raise CommandError(f"broker at {args.broker} stopped answering "
                                           f"(no stats within {args.timeout:g}s)") from None


def _subscribe(pub: str, frontend: str, curve: dict):
    """A SUB socket on the advertised PUB address (its host as seen from here: the frontend's host)."""
    import re

    import zmq
    import zmq.asyncio

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


async def _recv_pub(sock, timeout: float) -> dict | None:
    from protocol.codec import decode

    try:
        frame = await asyncio.wait_for(sock.recv(), timeout)
        return decode(frame, max_frame=1 << 26).snapshot
    except (asyncio.TimeoutError, Exception):
        return None


def _curve(args: argparse.Namespace) -> dict:
    from broker.curve import CurveError, client_kwargs

    try:
        return client_kwargs(args)
    except CurveError as exc:
        raise CommandError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.timeout <= 0:
        raise CommandError("--interval and --timeout must be > 0")
    curve = _curve(args)
    from broker.curve import CurveError

    try:
        if args.once:
            snap = asyncio.run(fetch(args.broker, args.timeout, curve))
            if args.json:
                print_json(snap)
            else:
                from rich.console import Console

                Console().print(render(snap, None, {}, args.broker))
            return 0
        asyncio.run(_live(args, curve))
    except CurveError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        return 0
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from broker.curve import add_client_flags

    p = add_command(sub, "monitor", help="live queue depths and worker stats",
                    example="specmq monitor --broker tcp://127.0.0.1:5555  (or --once --json)", func=_run,
                    json_flag=True)
    p.add_argument("--broker", default="tcp://127.0.0.1:5555", help="broker FRONTEND address")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the broker (default: 3)")
    p.add_argument("--sub", action="store_true", help="follow the broker's stats PUB socket instead of polling")
    add_client_flags(p)

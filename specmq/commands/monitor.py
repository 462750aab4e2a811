"""``specmq monitor``: live queue depths and worker figures from a broker, given only its frontend address.

Snapshots come from a stats request over the frontend every ``--interval`` (or, with ``--sub``, from the broker's
stats PUB socket that the snapshot advertises); what is shown is computed in ``broker.monitor``. ``--once --json``
prints one snapshot.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque

from broker.monitor import HISTORY, recv_snapshot, render, subscribe
from protocol.errors import ProtocolError
from specmq.cliutil import CommandError, add_command, print_json


async def one_stats(client, timeout: float) -> dict:
    """One snapshot within ``timeout`` in all (no resends); a refused handshake ends it at once with the reason
    (``BrokerClient.probe``: the same words as ``specmq draft`` and ``generate``)."""
    try:
        return await client.probe(timeout)
    except ProtocolError as exc:
        raise CommandError(f"broker answered something else to a stats request ({exc.message})") from None


async def fetch(address: str, timeout: float, curve: dict) -> dict:
    from broker.client import BrokerClient

    async with BrokerClient(address, timeout=timeout, **curve) as client:
        try:
            return await one_stats(client, timeout)
        except TimeoutError as exc:
            raise CommandError(f"broker at {address} did not answer within {timeout:g}s") from exc


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
            raise CommandError(f"broker at {args.broker} did not answer within {args.timeout:g}s") from None
        if args.sub and snap.get("stats_pub"):
            sub = subscribe(snap["stats_pub"], args.broker, curve)
        with Live(render(snap, prev, history, args.broker), refresh_per_second=4, screen=False) as live:
            while True:
                for q, v in snap.get("queues", {}).items():
                    history.setdefault(q, deque(maxlen=HISTORY)).append(v.get("depth", 0))
                live.update(render(snap, prev, history, args.broker))
                prev = snap
                t0 = time.monotonic()
                snap = None
                if sub is not None:
                    snap = await recv_snapshot(sub, max(args.interval * 3, 2.0))
                if snap is None:
                    await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - t0)))
                    try:
                        snap = await one_stats(client, args.timeout)
                    except TimeoutError:
                        raise CommandError(f"broker at {args.broker} stopped answering "
                                           f"(no stats within {args.timeout:g}s)") from None


def _run(args: argparse.Namespace) -> int:
    from broker.curve import client_kwargs

    if args.interval <= 0 or args.timeout <= 0:
        raise CommandError("--interval and --timeout must be > 0")
    curve = client_kwargs(args)  # CurveError: one line, like CommandError
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

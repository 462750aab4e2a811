"""``specmq bench replay``: how faithfully ``specmq replay`` keeps a capture's schedule (drift p50/p99 at speed 1).

Records a capture first: a broker process with ``--capture`` and echo target workers, driven by ``--sessions``
drafters that each send a chunk every ``--chunk-ms`` (plus opens and closes) for ``--seconds``. Then replays it
``--repeats`` times at ``--speed`` into a fresh broker + echo workers and reports each run's schedule drift
(actual send time - scheduled time), sent, answered and errors. Every server is its own process. Replay is causal
per session by default (scheduled: the previous answer + recorded think time / speed); ``--open-loop`` schedules
every message at its recorded time / speed.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import tempfile
import time
from typing import Any

from benchmarks import BenchmarkError, print_json

HELP = "schedule drift of specmq replay (records a capture, replays it)"
EXAMPLE = "specmq bench replay --sessions 20 --chunk-ms 20 --seconds 5 --repeats 3 --json"


async def _record_load(frontend: str, sessions: int, chunk_ms: float, seconds: float) -> int:
    from broker.client import BrokerClient
    from protocol.messages import SessionClose, SessionOpen, Verify

    sent = 0

    async def one(client: BrokerClient, i: int) -> None:
        nonlocal sent
        sid = f"s{i}"
        opened = await client.request(SessionOpen(session=sid, prompt_ids=[1, 2, 3]))
        pos, seq = opened.pos, 0
        end = time.monotonic() + seconds
        await asyncio.sleep((i % 10) * chunk_ms / 10000)  # spread the sessions' phases
        while time.monotonic() < end:
            t = time.monotonic()
            res = await client.request(Verify(session=sid, seq=seq, pos=pos, tokens=[11, 12, 13, 14]))
            pos, seq = res.pos, seq + 1
            sent += 1
            await asyncio.sleep(max(0.0, chunk_ms / 1000 - (time.monotonic() - t)))
        await client.send(SessionClose(session=sid))

    async with BrokerClient(frontend, timeout=10) as client:
        await asyncio.gather(*[one(client, i) for i in range(sessions)])
        await asyncio.sleep(0.3)
    return sent


def _servers(ctx: Any, capture: str, workers: int) -> tuple[str, list]:
    from benchmarks.broker import _broker_proc, _sync_echo_proc, _wait_workers
    from workers.local_cluster import free_endpoint

    fe, be = free_endpoint(), free_endpoint()
    procs = [ctx.Process(target=_broker_proc, args=(fe, be, capture), daemon=True)]
    procs += [ctx.Process(target=_sync_echo_proc, args=(be, f"echo{i}"), daemon=True) for i in range(workers)]
    for p in procs:
        p.start()
    _wait_workers(fe, workers)
    return fe, procs


def _stop(procs: list) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(5)


def run_benchmark(sessions: int, chunk_ms: float, seconds: float, repeats: int, speed: float,
                  workers: int = 1, open_loop: bool = False) -> dict[str, Any]:
    from broker.capture import summarize
    from broker.replay import replay

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.capture")
        fe, procs = _servers(ctx, path, workers)
        try:
            chunks = asyncio.run(_record_load(fe, sessions, chunk_ms, seconds))
        finally:
            _stop(procs)  # SIGTERM: the broker closes (flushes) its capture
        summary = summarize(path)
        runs = []
        for _ in range(repeats):
            fe, procs = _servers(ctx, "", workers)
            try:
                runs.append(asyncio.run(replay(path, fe, speed=speed, drain_s=5.0, open_loop=open_loop)))
            finally:
                _stop(procs)
    return {"sessions": sessions, "chunk_ms": chunk_ms, "recorded_s": summary["duration_s"],
            "recorded_chunks": chunks, "client_messages": sum(summary["client_messages"].values()), "speed": speed,
            "mode": "open_loop" if open_loop else "causal",
            "runs": [{k: r[k] for k in ("sent", "answered", "errors", "drift_p50_ms", "drift_p99_ms",
                                        "drift_max_ms", "duration_s")} for r in runs],
            "drift_p99_ms_range": [min(r["drift_p99_ms"] for r in runs), max(r["drift_p99_ms"] for r in runs)],
            "cpus": os.cpu_count()}


def run(args: argparse.Namespace) -> int:
    if args.sessions < 1 or args.chunk_ms <= 0 or args.seconds <= 0 or args.repeats < 1 or args.speed <= 0:
        raise BenchmarkError("--sessions, --chunk-ms, --seconds, --repeats and --speed must be positive")
    out = run_benchmark(args.sessions, args.chunk_ms, args.seconds, args.repeats, args.speed, args.workers,
                        args.open_loop)
    if args.json:
        print_json(out)
        return 0
    print(f"replay of {out['client_messages']} client messages over {out['recorded_s']:.1f}s "
          f"({out['sessions']} sessions, a chunk every {out['chunk_ms']} ms) at speed {out['speed']} ({out['mode']}), "
          f"{out['cpus']} CPUs")
    for r in out["runs"]:
        print(f"  sent {r['sent']} answered {r['answered']} errors {r['errors']}  drift p50 {r['drift_p50_ms']} ms "
              f"p99 {r['drift_p99_ms']} ms max {r['drift_max_ms']} ms")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", type=int, default=20, help="recorded drafter sessions (default: 20)")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="each session's chunk period (default: 20)")
    p.add_argument("--seconds", type=float, default=5.0, help="recorded seconds (default: 5)")
    p.add_argument("--repeats", type=int, default=3, help="replays of the capture (default: 3)")
    p.add_argument("--speed", type=float, default=1.0, help="replay speed (default: 1)")
    p.add_argument("--workers", type=int, default=1, help="echo target processes (default: 1)")
    p.add_argument("--open-loop", action="store_true", help="replay open loop (recorded times, whatever the answers)")

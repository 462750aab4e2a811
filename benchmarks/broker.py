"""``specmq bench broker``: chunk round trips through the specmq broker vs a bare ``zmq.proxy`` hop, in one run.

Round trip = client -> broker -> echo worker -> broker -> client, closed loop: each session keeps one Verify chunk
in flight. Scenarios: 1, 100 and 1000 concurrent sessions. Every party is its own process (broker or proxy, a few
echo workers, two load-generator processes) so the load generators do not share the broker's interpreter; on a
small machine they still share its cores, which the report states.

The proxy baseline is the same traffic through ``zmq.proxy(ROUTER, DEALER)`` to workers that run the same echo
code (``workers.echo_worker.answer``, full codec decode and encode): the difference is what the specmq broker costs
(validation, session namespacing, affinity, credit, idempotency cache).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from typing import Any

from benchmarks import BenchmarkError, print_json, quiet_logs
from protocol.messages import HEARTBEAT_INTERVAL_S
from workers.local_cluster import free_endpoint

HELP = "chunk round trips: specmq broker vs a bare zmq.proxy hop"
EXAMPLE = "specmq bench broker --sessions 1,100,1000 --json"
TOKENS = [11, 12, 13, 14]  # a gamma=4 draft chunk


# ------------------------------------------------------------------ processes
def _broker_proc(frontend: str, backend: str, capture: str = "") -> None:
    from broker.broker import run_broker
    from broker.state import BrokerConfig

    quiet_logs("error")
    config = BrokerConfig(frontend=frontend, backend=backend, router="least_loaded", max_queue=100_000,
                          capture=capture, stats_pub="")
    profile_to = os.environ.get("SPECMQ_PROFILE_BROKER")  # cProfile the broker process into this file
    if profile_to:
        import cProfile

        cProfile.runctx("run_broker(config)", globals(), {"run_broker": run_broker, "config": config}, profile_to)
    else:
        run_broker(config)


def _echo_proc(backend: str, name: str) -> None:
    import asyncio

    from workers.echo_worker import serve_echo

    quiet_logs("error")
    try:
        import uvloop

        uvloop.run(serve_echo(backend, "target", capacity=100_000, name=name))
    except ImportError:  # pragma: no cover
        asyncio.run(serve_echo(backend, "target", capacity=100_000, name=name))


def _sync_echo_proc(backend: str, name: str) -> None:
    """The same echo logic as the proxy's workers, speaking the specmq worker protocol in a plain poll loop
    (Ready, Credit per batch, heartbeats): so the comparison isolates what the broker adds."""
    import zmq

    from protocol.codec import encode
    from protocol.frames import parse, to_message
    from protocol.messages import Credit, Heartbeat, Ready
    from workers.echo_worker import answer

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(backend)
    sock.send(encode(Ready(kind="target", model="echo", capacity=100_000, vocab_size=32000, worker=name)))
    sock.send(encode(Credit(n=100_000)))
    beat, next_beat = encode(Heartbeat()), time.monotonic() + HEARTBEAT_INTERVAL_S
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        poller.poll(500)
        done = 0
        for _ in range(512):
            try:
                body = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = to_message(parse(body, 1 << 20))
            if msg.TYPE in ("verify", "session_open", "session_close"):
                done += 1
            for reply in answer(msg, name):
                sock.send(encode(reply))
        if done:
            sock.send(encode(Credit(n=done)))
        if time.monotonic() >= next_beat:
            sock.send(beat)
            next_beat = time.monotonic() + HEARTBEAT_INTERVAL_S


def _proxy_proc(frontend: str, backend: str) -> None:
    import zmq

    ctx = zmq.Context()
    fe, be = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (fe, be):
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
    fe.bind(frontend)
    be.bind(backend)
    zmq.proxy(fe, be)


def _proxy_echo_proc(backend: str, name: str) -> None:
    """The echo worker's logic behind a bare proxy: [client identity, body] in, [identity, reply] out."""
    import zmq

    from protocol.codec import encode
    from protocol.frames import parse, to_message
    from workers.echo_worker import answer

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(backend)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        poller.poll()
        for _ in range(512):
            try:
                ident, body = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            for reply in answer(to_message(parse(body, 1 << 20)), name):  # as WorkerLink decodes
                sock.send_multipart((ident, encode(reply)))


def _client_proc(frontend: str, mode: str, first: int, sessions: int, warmup_s: float, measure_s: float,
                 out: Any) -> None:
    """Closed-loop load: ``sessions`` sessions, one chunk each in flight; reports counts and RTT samples (us)."""
    import msgpack
    import zmq

    packb, unpackb = msgpack.packb, msgpack.unpackb
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(frontend)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    sids = [f"s{first + i}" for i in range(sessions)]
    now = time.perf_counter
    if mode == "specmq":  # open every session first
        for sid in sids:
            sock.send(packb({"v": 1, "type": "session_open", "session": sid, "prompt_ids": [1, 2, 3]}))
        opened = 0
        deadline = time.monotonic() + 30
        while opened < sessions and time.monotonic() < deadline:
            if poller.poll(1000):
                msg = unpackb(sock.recv())
                if msg["type"] != "session_opened":
                    raise RuntimeError(f"open failed: {msg}")
                opened += 1
    seqs = dict.fromkeys(sids, 0)

    def send(sid: str, seq: int) -> None:
        sock.send(packb({"v": 1, "type": "verify", "session": sid, "seq": seq, "pos": 3 + 5 * seq,
                         "tokens": TOKENS, "sent_at": now()}), zmq.NOBLOCK)

    for sid in sids:
        send(sid, 0)
    t0 = now()
    t_measure, t_end = t0 + warmup_s, t0 + warmup_s + measure_s
    done = 0
    samples: list[float] = []
    errors = 0
    while True:
        t = now()
        if t >= t_end:
            break
        if not poller.poll(100):
            continue
        for _ in range(1000):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = unpackb(frame)
            t = now()
            if msg.get("type") != "result":
                errors += 1
                continue
            sid = msg["session"]
            if t >= t_measure:
                done += 1
                if len(samples) < 200_000:
                    samples.append((t - msg["sent_at"]) * 1e6)
            seqs[sid] += 1
            send(sid, seqs[sid])
    if mode == "specmq":
        for sid in sids:
            sock.send(packb({"v": 1, "type": "session_close", "session": sid}))
    out.put({"done": done, "samples": samples, "errors": errors, "seconds": measure_s})
    sock.close(linger=100)


# ------------------------------------------------------------------ orchestration
def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _wait_workers(frontend: str, n: int, timeout: float = 20.0) -> None:
    from broker.client import request_stats

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = request_stats(frontend, 1.0)
        if snap is not None and len(snap["workers"]) >= n:
            return
        time.sleep(0.05)
    raise BenchmarkError(f"only some of {n} echo workers registered within {timeout}s")


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, from /proc (0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _load(ctx: Any, frontend: str, mode: str, sessions: int, clients: int, warmup_s: float,
          measure_s: float, server_pid: int) -> dict[str, Any]:
    out = ctx.Queue()
    per = [sessions // clients + (1 if i < sessions % clients else 0) for i in range(clients)]
    procs, first = [], 0
    for n in per:
        if n == 0:
            continue
        procs.append(ctx.Process(target=_client_proc, args=(frontend, mode, first, n, warmup_s, measure_s, out)))
        first += n
    for p in procs:
        p.start()
    time.sleep(warmup_s + 0.3)  # opens + warm-up (approximate window for the server's CPU share)
    cpu0, t0 = _cpu_s(server_pid), time.monotonic()
    results = [out.get(timeout=warmup_s + measure_s + 60) for _ in procs]
    cpu1, t1 = _cpu_s(server_pid), time.monotonic()
    for p in procs:
        p.join(10)
    samples = [s for r in results for s in r["samples"]]
    done = sum(r["done"] for r in results)
    rate = done / measure_s
    return {"chunks_per_s": rate, "p50_us": _pct(samples, 0.5), "p99_us": _pct(samples, 0.99),
            "errors": sum(r["errors"] for r in results), "server_cpu": (cpu1 - cpu0) / max(1e-9, t1 - t0),
            "server_cpu_us_per_chunk": (cpu1 - cpu0) / max(1e-9, t1 - t0) / max(rate, 1e-9) * 1e6}


def run_benchmark(sessions_list: list[int], workers: int = 2, clients: int = 2, warmup_s: float = 1.0,
                  measure_s: float = 3.0, worker_impl: str = "sync") -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results: dict[tuple[str, int], dict] = {}
    for mode in ("proxy", "specmq"):
        fe, be = free_endpoint(), free_endpoint()
        if mode == "specmq":
            server = ctx.Process(target=_broker_proc, args=(fe, be), daemon=True)
            worker_target = _sync_echo_proc if worker_impl == "sync" else _echo_proc
        else:
            server = ctx.Process(target=_proxy_proc, args=(fe, be), daemon=True)
            worker_target = _proxy_echo_proc
        server.start()
        ws = [ctx.Process(target=worker_target, args=(be, f"echo{i}"), daemon=True) for i in range(workers)]
        for w in ws:
            w.start()
        try:
            if mode == "specmq":
                _wait_workers(fe, workers)
            else:
                time.sleep(1.0)  # a proxy has no registration to wait on
            for n in sessions_list:
                results[(mode, n)] = _load(ctx, fe, mode, n, min(clients, n), warmup_s, measure_s, server.pid)
        finally:
            for p in ws + [server]:
                p.terminate()
            for p in ws + [server]:
                p.join(5)
    rows = []
    for n in sessions_list:
        s, p = results[("specmq", n)], results[("proxy", n)]
        rows.append({
            "sessions": n, "workers": workers, "worker_impl": worker_impl, "client_procs": min(clients, n),
            "chunks_per_s": round(s["chunks_per_s"]), "p50_us": round(s["p50_us"], 1), "p99_us": round(s["p99_us"], 1),
            "proxy_chunks_per_s": round(p["chunks_per_s"]), "proxy_p50_us": round(p["p50_us"], 1),
            "proxy_p99_us": round(p["p99_us"], 1),
            "added_p50_us": round(s["p50_us"] - p["p50_us"], 1), "added_p99_us": round(s["p99_us"] - p["p99_us"], 1),
            "ratio_to_proxy": round(s["chunks_per_s"] / max(1.0, p["chunks_per_s"]), 3),
            "broker_cpu_cores": round(s["server_cpu"], 2), "broker_cpu_us_per_chunk": round(s["server_cpu_us_per_chunk"], 1),
            "proxy_cpu_us_per_chunk": round(p["server_cpu_us_per_chunk"], 1),
            "errors": s["errors"] + p["errors"], "cpus": os.cpu_count(),
        })
    return rows


def run_capture_benchmark(sessions_list: list[int], repeats: int = 3, workers: int = 2, clients: int = 2,
                          warmup_s: float = 1.0, measure_s: float = 3.0) -> list[dict[str, Any]]:
    """Broker chunk throughput without and with ``--capture``, alternating runs (off, on, on, off, ...) so slow
    drift of a shared machine's load hits both; reports every run and the ratio's range."""
    import tempfile

    ctx = mp.get_context("spawn")
    runs: dict[tuple[bool, int], list[float]] = {}
    cpu: dict[tuple[bool, int], list[float]] = {}  # broker CPU us per chunk: steadier than rates on a busy box
    capture_bytes: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for capture in ((False, True) if r % 2 == 0 else (True, False)):
                fe, be = free_endpoint(), free_endpoint()
                path = os.path.join(tmp, f"run{r}.capture") if capture else ""
                server = ctx.Process(target=_broker_proc, args=(fe, be, path), daemon=True)
                server.start()
                ws = [ctx.Process(target=_sync_echo_proc, args=(be, f"echo{i}"), daemon=True) for i in range(workers)]
                for w in ws:
                    w.start()
                try:
                    _wait_workers(fe, workers)
                    for n in sessions_list:
                        res = _load(ctx, fe, "specmq", n, min(clients, n), warmup_s, measure_s, server.pid)
                        runs.setdefault((capture, n), []).append(res["chunks_per_s"])
                        cpu.setdefault((capture, n), []).append(res["server_cpu_us_per_chunk"])
                finally:
                    for p in ws + [server]:
                        p.terminate()
                    for p in ws + [server]:
                        p.join(5)
                if path and os.path.exists(path):
                    capture_bytes.append(os.path.getsize(path))
    rows = []
    for n in sessions_list:
        off, on = runs[(False, n)], runs[(True, n)]
        ratios = [b / max(a, 1.0) for a, b in zip(off, on)]
        rows.append({"sessions": n, "repeats": repeats, "chunks_per_s_off": [round(x) for x in off],
                     "chunks_per_s_on": [round(x) for x in on], "ratio_on_off": [round(x, 3) for x in ratios],
                     "ratio_of_medians": round(sorted(on)[len(on) // 2] / max(1.0, sorted(off)[len(off) // 2]), 3),
                     "cpu_us_per_chunk_off": [round(x, 1) for x in cpu[(False, n)]],
                     "cpu_us_per_chunk_on": [round(x, 1) for x in cpu[(True, n)]],
                     "cpu_ratio_of_medians": round(sorted(cpu[(True, n)])[repeats // 2]
                                                   / max(1e-9, sorted(cpu[(False, n)])[repeats // 2]), 3),
                     "capture_mb_per_run": round(max(capture_bytes or [0]) / 1e6, 1), "cpus": os.cpu_count()})
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"specmq broker vs zmq.proxy (closed loop, gamma={len(TOKENS)}, {rows[0]['workers']} "
          f"{rows[0]['worker_impl']} echo workers, "
          f"{os.cpu_count()} CPUs shared by every process)")
    head = (f"{'sessions':>8} {'chunks/s':>10} {'p50 us':>9} {'p99 us':>9} | {'proxy/s':>9} {'p50 us':>9} "
            f"{'p99 us':>9} | {'+p50 us':>8} {'+p99 us':>8} {'ratio':>6} | {'cpu us/chunk':>12} {'proxy':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['sessions']:>8} {r['chunks_per_s']:>10} {r['p50_us']:>9} {r['p99_us']:>9} | "
              f"{r['proxy_chunks_per_s']:>9} {r['proxy_p50_us']:>9} {r['proxy_p99_us']:>9} | "
              f"{r['added_p50_us']:>8} {r['added_p99_us']:>8} {r['ratio_to_proxy']:>6} | "
              f"{r['broker_cpu_us_per_chunk']:>12} {r['proxy_cpu_us_per_chunk']:>6}")
    print("cpu us/chunk: CPU time of the broker (or proxy) process per chunk round trip; 1e6 / it is the rate one "
          "dedicated core could sustain")


def run(args: argparse.Namespace) -> int:
    try:
        sessions = [int(x) for x in str(args.sessions).split(",")]
    except ValueError:
        raise BenchmarkError(f"--sessions must be comma-separated integers, got {args.sessions!r}") from None
    if any(n < 1 for n in sessions) or args.workers < 1 or args.clients < 1 or args.seconds <= 0:
        raise BenchmarkError("--sessions, --workers, --clients and --seconds must be positive")
    if args.worker not in ("sync", "link"):
        raise BenchmarkError(f"--worker must be sync or link, not {args.worker!r}")
    if args.capture:
        rows = run_capture_benchmark(sessions, repeats=args.repeats, workers=args.workers, clients=args.clients,
                                     warmup_s=args.warmup, measure_s=args.seconds)
        for r in rows:
            if args.json:
                print_json(r)
            else:
                print(f"sessions {r['sessions']:>5}: chunks/s capture off {r['chunks_per_s_off']} on "
                      f"{r['chunks_per_s_on']}  on/off per pair {r['ratio_on_off']}  ratio of medians "
                      f"{r['ratio_of_medians']}\n   broker cpu us/chunk off {r['cpu_us_per_chunk_off']} on "
                      f"{r['cpu_us_per_chunk_on']}  on/off of medians {r['cpu_ratio_of_medians']}"
                      f"  ({r['capture_mb_per_run']} MB captured per run, {r['cpus']} CPUs)")
        return 0
    rows = run_benchmark(sessions, workers=args.workers, clients=args.clients, warmup_s=args.warmup,
                         measure_s=args.seconds, worker_impl=args.worker)
    if args.json:
        for r in rows:
            print_json(r)
    else:
        _print_table(rows)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", default="1,100,1000", help="concurrent sessions per scenario (default: 1,100,1000)")
    p.add_argument("--workers", type=int, default=2, help="echo worker processes (default: 2)")
    p.add_argument("--clients", type=int, default=2, help="load-generator processes (default: 2)")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per scenario (default: 3)")
    p.add_argument("--worker", default="sync",
                   help="specmq echo workers: 'sync' (same poll loop as the proxy's workers: isolates the broker) "
                        "or 'link' (workers.echo_worker on workers.link, asyncio)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per scenario (default: 1)")
    p.add_argument("--capture", action="store_true",
                   help="measure the broker without and with --capture (alternating runs) instead of vs the proxy")
    p.add_argument("--repeats", type=int, default=3, help="with --capture: runs of each (default: 3)")


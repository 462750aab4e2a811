"""What the HTTP gateway costs: the same streamed jobs through the native client and through ``specmq serve``.

One run starts a broker, a fused worker and the gateway (``specmq serve``) as processes, then sends the same jobs
from ``--streams`` concurrent clients (each ``--requests`` jobs in a row) both ways, ``--rounds`` times alternated:
with the native client (``BrokerClient.generate`` on the frontend) and as OpenAI streaming requests
(``POST /v1/completions``, ``stream: true``) to the gateway. Per row (a mode's rounds pooled): time to first token,
the gap between chunks, end to end, requests/s and errors; the ``added`` row is HTTP minus native.

- ``--worker echo`` (default): a model-free fused worker in a process of its own that streams ``--tokens`` tokens
  per job, one ``Tokens`` message every ``--token-ms``, and writes its send time (``time.monotonic_ns()``, one clock
  for every process on the host) as each message's text. The clients read it back from the chunk, so ``delivery``
  is the exact time from the worker's send to the client's receipt of each chunk: the added delivery is the
  gateway's cost per streamed chunk, free of any model time.
- ``--worker fused``: ``specmq fused`` on the shipped pair (greedy, ``--tokens`` new tokens): the same comparison
  with real rounds; no send times, so only TTFT, gap and end to end.

    specmq bench http                       # 64 streams, echo worker
    specmq bench http --worker fused --streams 8 --tokens 32 --json
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import BenchmarkError, print_json

HELP = "HTTP gateway overhead: the same streamed jobs via the native client and via specmq serve"
DESCRIPTION = __doc__.split("\n\n")[0]
EXAMPLE = "specmq bench http --streams 64 --requests 4 --tokens 32 --token-ms 20"
ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "models" / "tiny-target"
MODEL = "tiny-target"
PROMPT = "import os\nimport sys\n"


# --------------------------------------------------------------------------- the paced echo worker (own process)
async def serve_paced(backend: str, capacity: int, token_ms: float, stop: asyncio.Event | None = None) -> None:
    """A fused worker with no model: each job streams ``max_new_tokens`` one-token messages, ``token_ms`` apart,
    each with its send time as text, then ``Done``. Jobs run concurrently, up to ``capacity``."""
    from protocol.messages import Cancel, Disconnect, Done, Generate, Ready, Tokens
    from workers.link import WorkerLink

    ready = Ready(kind="fused", model="paced-echo", capacity=capacity, vocab_size=8192, worker="paced-echo")
    running: dict[str, asyncio.Task] = {}

    async def stream(link: WorkerLink, job: Generate) -> None:
        ids, texts = [], []
        try:
            for i in range(job.max_new_tokens):
                if i:
                    await asyncio.sleep(token_ms / 1000)
                tok, text = 100 + i % 50, f"{time.monotonic_ns()}|"
                ids.append(tok)
                texts.append(text)
                piece = Tokens(job=job.job, tokens=[tok], text=text, index=i, incarnation=job.incarnation)
                if not link.send_nowait(piece):
                    await link.send(piece)
            await link.send(Done(job=job.job, token_ids=ids, text="".join(texts), finish_reason="length",
                                 stats={"delivery": job.delivery, "worker": "paced-echo"},
                                 incarnation=job.incarnation))
        finally:
            running.pop(job.job, None)
            link.grant(1)

    async with WorkerLink(backend, ready, initial_credit=capacity) as link:
        stop = stop or asyncio.Event()
        while not stop.is_set():
            # while jobs stream, their sends can take the socket's edge-triggered wakeup: poll instead of waiting
            for msg in await link.recv_batch(timeout=0.001 if running else 0.2):
                if isinstance(msg, Generate):
                    running[msg.job] = asyncio.create_task(stream(link, msg))
                elif isinstance(msg, Cancel) and msg.job in running:
                    running[msg.job].cancel()
                elif isinstance(msg, Disconnect):
                    for task in list(running.values()):
                        task.cancel()


def _paced_main(backend: str, capacity: int, token_ms: float) -> None:
    from benchmarks import quiet_logs

    quiet_logs()
    try:
        import uvloop

        uvloop.run(serve_paced(backend, capacity, token_ms))
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- measuring one job
@dataclass
class JobTiming:
    start: float  # monotonic seconds when the request left
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk
    sent: list[float] = field(default_factory=list)  # the worker's send time of each chunk (echo probe)
    end: float = 0.0
    error: str = ""


def _probe(text: str, arrived: float, t: JobTiming) -> None:
    for part in text.split("|"):
        if part.isdigit():
            t.sent.append(int(part) / 1e9)
    t.chunks.append(arrived)


async def native_job(client, prompt_ids: list[int], tokens: int, probe: bool) -> JobTiming:
    from protocol.messages import Done, Error, Generate, Tokens

    t = JobTiming(time.monotonic())
    job = Generate(job=uuid.uuid4().hex, prompt_ids=prompt_ids, max_new_tokens=tokens, temperature=0.0)
    try:
        async for msg in client.generate(job, timeout=120):
            now = time.monotonic()
            if isinstance(msg, Tokens):
                _probe(msg.text, now, t) if probe else t.chunks.append(now)
            elif isinstance(msg, Error):
                t.error = msg.code
            elif isinstance(msg, Done):
                t.end = now
    except TimeoutError:
        t.error = "timeout"
    return t


def _event(data: bytes, now: float, t: JobTiming, probe: bool) -> bool:
    """One SSE ``data:`` payload into ``t``; True at ``[DONE]``."""
    import json

    if data == b"[DONE]":
        t.end = now
        return True
    event = json.loads(data)
    if "error" in event:
        t.error = event["error"].get("code") or "error"
    elif event.get("choices") and event["choices"][0].get("text"):
        _probe(event["choices"][0]["text"], now, t) if probe else t.chunks.append(now)
    return False


class RawHttp:
    """The least an HTTP client can do: one keep-alive connection, a pre-built request, chunked SSE read off the
    socket. With it the HTTP row costs what the gateway costs; a client library (``--client aiohttp``) spends about
    as much CPU per request and per chunk again, on the same 2 cores."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def stream(self, body: bytes, tokens: int, probe: bool) -> JobTiming:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        t = JobTiming(time.monotonic())
        self.writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" not in head:  # an error answer: a JSON body of known length
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await self.reader.readexactly(length)
            t.error = f"http {status}"
            return t
        done = False
        while True:
            size = int(await self.reader.readuntil(b"\r\n"), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            now = time.monotonic()
            for event in data[:-2].split(b"\n\n"):
                if event.startswith(b"data: "):
                    done = _event(event[6:], now, t, probe) or done
        if not done and not t.error:
            t.error = "no [DONE]"
        return t


async def http_job(session, url: str, tokens: int, probe: bool) -> JobTiming:
    """One streamed completion through aiohttp's client."""
    t = JobTiming(time.monotonic())
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                t.error = f"http {r.status}"
                await r.read()
                return t
            async for line in r.content:
                if line.startswith(b"data: ") and _event(line[6:].strip(), time.monotonic(), t, probe):
                    break
    except Exception as exc:  # connection refused or reset: an error of this mode, counted
        t.error = type(exc).__name__
    return t


async def run_clients(mode: str, *, frontend: str, url: str, streams: int, requests: int, tokens: int,
                      prompt_ids: list[int], probe: bool, http_client: str = "raw") -> tuple[list[JobTiming], float]:
    """``streams`` concurrent clients, ``requests`` jobs each; (timings, wall seconds)."""
    import json

    import aiohttp

    from broker.client import BrokerClient

    client = BrokerClient(frontend, timeout=120)
    await client.start()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams + 4),
                                    timeout=aiohttp.ClientTimeout(total=300))
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                       "stream": True}).encode()
    out: list[JobTiming] = []
    raws: list[RawHttp] = []

    async def one_client() -> None:
        raw = RawHttp(url)
        raws.append(raw)
        for _ in range(requests):
            if mode == "native":
                out.append(await native_job(client, prompt_ids, tokens, probe))
            elif http_client == "aiohttp":
                out.append(await http_job(session, url, tokens, probe))
            else:
                try:
                    out.append(await raw.stream(body, tokens, probe))
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    out.append(JobTiming(time.monotonic(), error=type(exc).__name__))
                    raw.writer = None

    try:
        await asyncio.gather(*(one_client() for _ in range(min(streams, 4))))  # warm-up: connections, caches
        out.clear()
        t0 = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(streams)))
        wall = time.monotonic() - t0
    finally:
        for raw in raws:
            if raw.writer is not None:
                raw.writer.close()
        await session.close()
        await client.close()
    return out, wall


# --------------------------------------------------------------------------- figures
def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(mode: str, timings: list[JobTiming], wall: float, streams: int) -> dict[str, Any]:
    ok = [t for t in timings if not t.error and t.chunks]
    ttft = [(t.chunks[0] - t.start) * 1000 for t in ok]
    gaps = [(b - a) * 1000 for t in ok for a, b in zip(t.chunks, t.chunks[1:])]
    delivery = [(a - s) * 1000 for t in ok for a, s in zip(t.chunks, t.sent)]
    e2e = [((t.end or t.chunks[-1]) - t.start) * 1000 for t in ok]

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {"mode": mode, "streams": streams, "requests": len(timings), "errors": len(timings) - len(ok),
            "chunks": sum(len(t.chunks) for t in ok), "ttft_p50_ms": r(_pct(ttft, 50)),
            "ttft_p99_ms": r(_pct(ttft, 99)), "delivery_p50_ms": r(_pct(delivery, 50)),
            "delivery_p99_ms": r(_pct(delivery, 99)), "gap_p50_ms": r(_pct(gaps, 50)),
            "gap_p99_ms": r(_pct(gaps, 99)), "e2e_p50_ms": r(_pct(e2e, 50)),
            "req_per_s": round(len(ok) / wall, 2) if wall > 0 else 0.0,
            "tokens_per_s": round(sum(len(t.chunks) for t in ok) / wall, 1) if wall > 0 else 0.0}


def added(native: dict[str, Any], http: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"mode": "added", "streams": http["streams"], "requests": http["requests"],
                           "errors": http["errors"], "chunks": None}
    for key in ("ttft_p50_ms", "ttft_p99_ms", "delivery_p50_ms", "delivery_p99_ms", "gap_p50_ms", "gap_p99_ms",
                "e2e_p50_ms", "req_per_s", "tokens_per_s"):
        a, b = native.get(key), http.get(key)
        row[key] = None if a is None or b is None else round(b - a, 3)
    return row


COLUMNS = [("mode", "mode", "{}"), ("streams", "streams", "{}"), ("requests", "jobs", "{}"),
           ("errors", "errors", "{}"), ("ttft_p50_ms", "TTFT p50", "{:.2f}"), ("ttft_p99_ms", "p99", "{:.2f}"),
           ("delivery_p50_ms", "chunk delivery p50", "{:.3f}"), ("delivery_p99_ms", "p99", "{:.3f}"),
           ("gap_p50_ms", "gap p50", "{:.2f}"), ("e2e_p50_ms", "e2e p50", "{:.1f}"), ("req_per_s", "req/s", "{:.1f}")]


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[h for _, h, _ in COLUMNS]] + [[("-" if r.get(k) is None else f.format(r[k])) for k, _, f in COLUMNS]
                                           for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("(times in ms; added = http - native; chunk delivery = worker send -> client receipt, echo worker only)")


# --------------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", default="echo", choices=["echo", "fused"],
                   help="echo: model-free paced worker (gateway cost only); fused: the shipped pair (default: echo)")
    p.add_argument("--streams", type=int, default=64, help="concurrent streaming clients (default: 64)")
    p.add_argument("--requests", type=int, default=4, help="jobs per client, one after another (default: 4)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per job (default: 32)")
    p.add_argument("--token-ms", type=float, default=20.0, help="echo worker: ms between a job's tokens (default: 20)")
    p.add_argument("--jobs", type=int, default=8, help="fused worker: concurrent jobs (default: 8)")
    p.add_argument("--threads", type=int, default=1, help="fused worker: torch threads (default: 1)")
    p.add_argument("--client", default="raw", choices=["raw", "aiohttp"],
                   help="HTTP client: raw (a minimal keep-alive client: the gateway's cost alone) or aiohttp (a "
                        "client library's cost included) (default: raw)")
    p.add_argument("--rounds", type=int, default=3,
                   help="native and HTTP runs, alternated; each row pools its mode's rounds (default: 3)")
    p.add_argument("--logdir", default="", help="keep the processes' logs here (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
    if min(args.streams, args.requests, args.tokens, args.jobs, args.threads, args.rounds) < 1 or args.token_ms < 0:
        raise BenchmarkError("--streams, --requests, --tokens, --jobs, --threads and --rounds must be >= 1, "
                             "--token-ms >= 0")
    rows = measure(args)
    if args.json:
        for r in rows:
            print_json(r)
    else:
        print_table(rows)
    return 0


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from gateway.server import wait_listening
    from workers.local_cluster import ClusterError, LocalCluster, free_endpoint
    from workers.tokenizer_text import encode, load_tokenizer

    logdir = Path(args.logdir) if args.logdir else Path(tempfile.mkdtemp(prefix="specmq-bench-http-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    port = int(free_endpoint().rsplit(":", 1)[1])
    url = f"http://127.0.0.1:{port}"
    probe = args.worker == "echo"
    paced = None
    with LocalCluster(logdir=logdir, env=env, cwd=ROOT) as cluster:
        try:
            cluster.start_broker("--log-level", "warning", "--max-queue", "100000")
            if probe:
                paced = mp.get_context("spawn").Process(target=_paced_main, daemon=True,
                                                        args=(cluster.backend, args.streams, args.token_ms))
                paced.start()
            else:
                cluster.start_worker("fused", "f0", "--jobs", str(args.jobs), "--log-level", "warning")
            cluster.wait_registered(count=1, timeout_s=120)
            proc = cluster.start("gateway", "serve", "--broker", cluster.frontend, "--listen", f"127.0.0.1:{port}",
                                 "--log-level", "warning")
            wait_listening(url, 60, alive=lambda: proc.poll() is None)
            prompt_ids = encode(load_tokenizer(TARGET), PROMPT)
            pooled: dict[str, tuple[list[JobTiming], float]] = {"native": ([], 0.0), "http": ([], 0.0)}
            for _ in range(args.rounds):  # alternate, so a neighbour's load lands on both modes alike
                for mode in ("native", "http"):
                    timings, wall = asyncio.run(run_clients(mode, frontend=cluster.frontend, url=url,
                                                            streams=args.streams, requests=args.requests,
                                                            tokens=args.tokens, prompt_ids=prompt_ids, probe=probe,
                                                            http_client=args.client))
                    pooled[mode] = (pooled[mode][0] + timings, pooled[mode][1] + wall)
            results = {mode: summarize(mode, t, wall, args.streams) for mode, (t, wall) in pooled.items()}
        except ClusterError as exc:
            raise BenchmarkError(f"{exc} (logs in {logdir})") from None
        finally:
            if paced is not None:
                paced.terminate()
                paced.join(10)
    rows = [results["native"], results["http"], added(results["native"], results["http"])]
    for r in rows:
        r["worker"] = args.worker
        r["client"] = args.client
        r["tokens"] = args.tokens
        r["token_ms"] = args.token_ms if probe else None
    if rows[-1]["errors"] or results["native"]["errors"]:
        print(f"errors: native {results['native']['errors']}, http {results['http']['errors']} (logs in {logdir})",
              file=sys.stderr)
    return rows


"""The HTTP gateway: OpenAI's API in front of the broker's generate queue (aiohttp, one process, one DEALER).

Every request becomes one ``Generate`` job (always streamed from the worker, so stop strings can end it early and a
client that goes away can cancel it); the first message back decides the HTTP status: ``Busy`` is a 429 with
``Retry-After``, an ``Error`` its 4xx/5xx, a token the 200 (a stream's headers go out then). A background task asks
the broker for stats every ``health_interval``: a broker that stops answering for ``broker_timeout`` is down
(new requests get 503, waiting ones end with an error). A broker restarted within that time keeps the streams: the
broker client sends the jobs in flight to the new instance, and the index dedupe in ``gateway.stream`` drops what
the client already has. A client that disconnects (aiohttp cancels its handler) or whose stop string matched gets a
``Cancel`` sent for its job: the broker drops it from the queue or tells its fused worker to free the slots.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (the gateway's counters, then the broker's ``specmq_*`` families rendered from a fresh snapshot).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog
from aiohttp import web

from broker.client import BrokerClient
from broker.waits import within
from gateway.chat import ChatTemplate
from gateway.openai_api import (DONE_EVENT, FINISH_REASONS, ApiError, ChunkFormat, GenerationRequest, error_body,
                                parse_chat, parse_completion, response_body, usage)
from gateway.stream import TextStream
from protocol import errors as E
from protocol.errors import ProtocolError, SpecmqError
from protocol.messages import Busy, Done, Error, Generate, Tokens
from workers.tokenizer_text import encode, load_tokenizer

log = structlog.get_logger("gateway")  # the CLI's logger factory writes logger=gateway into each line

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "tiny-target"
BROKER_UNAVAILABLE = "broker_unavailable"
LONG_PROMPT_CHARS = 20_000  # tokenize prompts longer than this in a thread, off the event loop
SPEC_KEYS = ("drafted", "accepted", "acceptance_rate", "rounds", "rejections", "gamma", "worker", "delivery")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GatewayError(SpecmqError):
    """The gateway cannot start (tokenizer, chat template, address in use)."""


@dataclass
class GatewayConfig:
    """Every knob of the gateway; ``specmq serve`` flags map onto these names."""

    broker: str = "tcp://127.0.0.1:5555"  # the broker's frontend
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (tests)
    tokenizer: str = str(DEFAULT_TOKENIZER)  # model directory whose tokenizer (and chat template) the gateway uses
    model_name: str = ""  # the model id clients name; "" = the tokenizer directory's name
    api_keys: tuple[str, ...] = ()  # accepted bearer tokens; empty = no authentication
    default_max_tokens: int = 256  # chat requests that name no max_tokens
    gamma: int = 0  # draft tokens per round for requests that name none (0: the fused worker's default)
    max_body: int = 1 << 20  # bytes; larger bodies get 413
    health_interval: float = 1.0  # seconds between the gateway's stats requests to the broker
    broker_timeout: float = 3.0  # no stats answer for this long: the broker is down (503)
    job_timeout: float = 600.0  # a job that sends nothing for this long fails (504)
    grace_s: float = 2.0  # on shutdown, how long open requests may take


def read_api_keys(path: str | Path) -> tuple[str, ...]:
    """Keys from a file, one per line (blank lines and ``#`` comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise GatewayError(f"cannot read API key file {path}: {exc.strerror}") from None
    keys = tuple(k for k in (line.strip() for line in lines) if k and not k.startswith("#"))
    if not keys:
        raise GatewayError(f"API key file {path} holds no key")
    return keys


def job_error(msg: Error) -> ApiError:
    """A broker or worker ``Error`` as the HTTP error a client can act on."""
    code, text = msg.code, msg.message
    if code == E.OVERLOADED:  # the broker's own admission deadline passed: overload, as a Busy is
        return ApiError(429, text, code="rate_limit_exceeded", type="requests", headers={"Retry-After": "1"})
    if code in (E.NO_WORKERS, E.SHUTTING_DOWN, BROKER_UNAVAILABLE):
        return ApiError(503, text, code=code, type="server_error")
    if code == E.CONTEXT_TOO_LONG:
        return ApiError(400, f"the prompt and max_tokens do not fit the model's context: {text}", param="max_tokens",
                        code="context_length_exceeded")
    if code == E.TOKEN_OUT_OF_RANGE:
        return ApiError(400, text, param="prompt", code=code)
    if code == E.GAMMA_TOO_LARGE:
        return ApiError(400, text, param="gamma", code=code)
    if code in (E.BAD_REQUEST, E.BAD_FIELD):
        return ApiError(400, text, code=code)
    if code == "timeout":
        return ApiError(504, text, code=code, type="server_error")
    return ApiError(500, f"{code}: {text}", code=code, type="server_error")


def busy_error(msg: Busy) -> ApiError:
    ms = max(1, msg.retry_ms)
    return ApiError(429, f"the generate queue is full; retry after {ms} ms", code="rate_limit_exceeded",
                    type="requests", headers={"Retry-After": str(max(1, math.ceil(ms / 1000))),
                                              "retry-after-ms": str(ms)})


class Gateway:
    """State (config, tokenizer, broker link, counters) plus one handler per route."""

    def __init__(self, config: GatewayConfig | None = None, tokenizer=None) -> None:
        self.config = config or GatewayConfig()
        try:
            self.tokenizer = tokenizer or load_tokenizer(self.config.tokenizer)
            self.template = ChatTemplate.load(self.config.tokenizer, self.tokenizer)
        except ValueError as exc:  # TokenizerError, a broken tokenizer_config.json or chat template
            raise GatewayError(str(exc)) from None
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.model_name = self.config.model_name or Path(self.config.tokenizer).name
        self.created = int(time.time())
        self.client = BrokerClient(self.config.broker, timeout=self.config.job_timeout)
        self.jobs: dict[str, Generate] = {}  # in flight, by job id
        self.snapshot: dict[str, Any] | None = None
        self.snapshot_at = -math.inf
        self.counters: Counter[str] = Counter()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status)
        self.streams = 0
        self.url = ""
        self._stats_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = asyncio.Event()  # ends the broker watch even if its cancel is lost (see broker.waits)

    # ------------------------------------------------------------------ lifecycle
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body, middlewares=[self._answer_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> None:
        await self.client.start()
        await self.broker_snapshot(max_age=0)
        # handler_cancellation: a client that hangs up cancels its handler, whose cleanup cancels the job
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=self.config.grace_s)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.config.host, self.config.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            await self.client.close()
            raise GatewayError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}") from None
        host, port = self._runner.addresses[0][:2]
        self.port = port
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        self._watch = asyncio.create_task(self._watch_broker())
        log.info("gateway.serving", url=self.url, broker=self.config.broker, model=self.model_name,
                 chat_template=self.template.name, auth=bool(self.config.api_keys))

    async def stop(self) -> None:
        """Stop within a bounded time: open requests get ``grace_s``; a step that still hangs (an HTTP client holding
        a keep-alive connection, a broker that does not answer) is abandoned with a warning, never waited on."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.cancel()
            await self._bounded(self._watch, self.config.health_interval + 3.0, "broker_watch")
        if self._runner is not None:
            await self._bounded(self._runner.cleanup(), self.config.grace_s + 3.0, "http")
        await self._bounded(self.client.close(), 3.0, "broker_client")
        log.info("gateway.stopped", **dict(self.counters))

    @staticmethod
    async def _bounded(step: Awaitable[Any], timeout_s: float, what: str) -> None:
        """Run ``step`` for at most ``timeout_s``; past it, cancel it and return at once. (``asyncio.wait_for`` also
        waits for the cancellation to finish, so a step that is slow to cancel would hold the stop unbounded.)"""
        task = asyncio.ensure_future(step)
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            log.warning("gateway.stop_slow", step=what, waited_s=timeout_s)
        elif not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    # ------------------------------------------------------------------ the broker's health
    @property
    def broker_up(self) -> bool:
        return time.monotonic() - self.snapshot_at <= self.config.broker_timeout

    async def broker_snapshot(self, max_age: float) -> dict[str, Any] | None:
        """The broker's stats, at most ``max_age`` seconds old; None when it did not answer."""
        async with self._stats_lock:  # one stats request at a time: replies to it are matched by type only
            if time.monotonic() - self.snapshot_at <= max_age:
                return self.snapshot
            try:
                snap = await self.client.stats(timeout=min(1.0, self.config.broker_timeout), retries=0)
            except (TimeoutError, ProtocolError):
                return None
        self.snapshot, self.snapshot_at = snap, time.monotonic()
        return snap

    async def _watch_broker(self) -> None:
        was_up = True
        while not self._stopping.is_set():
            await self.broker_snapshot(max_age=0)
            up = self.broker_up
            if not up and self.jobs:
                n = self.client.fail_jobs(BROKER_UNAVAILABLE, f"the broker at {self.config.broker} stopped answering")
                self.counters["jobs_failed_broker_down"] += n
            if up != was_up:
                log.warning("broker.up" if up else "broker.down", broker=self.config.broker)
                was_up = up
            while not self.client.inbox.empty():  # late messages of cancelled jobs: nobody waits for them
                self.client.inbox.get_nowait()
                self.counters["late_messages"] += 1
            try:
                await within(self._stopping.wait(), self.config.health_interval)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------ routes
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "specmq"}]})

    async def health(self, request: web.Request) -> web.Response:
        snap = await self.broker_snapshot(max_age=self.config.health_interval / 2)
        if snap is None:
            return web.json_response({"status": "unavailable", "reason": f"broker {self.config.broker} does not "
                                      "answer"}, status=503)
        kinds = Counter(w.get("kind", "") for w in snap.get("workers", {}).values())
        body = {"status": "ok" if kinds["fused"] else "unavailable", "broker": self.config.broker,
                "model": self.model_name, "fused_workers": kinds["fused"], "target_workers": kinds["target"],
                "generate_queue": snap.get("queues", {}).get("generate", {}), "streams": self.streams}
        if not kinds["fused"]:
            body["reason"] = "no fused worker is registered at the broker"
        return web.json_response(body, status=200 if kinds["fused"] else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        snap = await self.broker_snapshot(max_age=0)
        text = self._own_metrics() + (_broker_metrics(snap) if snap is not None else "")
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------------ one generation
    async def _generate(self, request: web.Request, parse: Callable[[Any], GenerationRequest]) -> web.StreamResponse:
        self._authorize(request)
        req = parse(await self._json(request))
        if req.model and req.model != self.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this gateway serves {self.model_name!r}",
                           param="model", code="model_not_found")
        prompt_ids = await self._prompt_ids(req)
        if not self.broker_up:
            raise ApiError(503, f"the broker at {self.config.broker} does not answer", code=BROKER_UNAVAILABLE,
                           type="server_error")
        jid = uuid.uuid4().hex
        max_tokens = req.max_tokens if req.max_tokens is not None else self.config.default_max_tokens
        job = Generate(job=jid, prompt_ids=prompt_ids, max_new_tokens=max_tokens, temperature=req.temperature,
                       top_p=req.top_p, seed=req.seed, gamma=req.gamma or self.config.gamma, stream=True)
        fmt = ChunkFormat(req.kind, ("chatcmpl-" if req.kind == "chat" else "cmpl-") + jid, int(time.time()),
                          self.model_name)
        out = TextStream(self.tokenizer, req.stop)
        messages = self.client.generate(job, retry_busy=False)
        self.jobs[jid] = job
        resp: web.StreamResponse | None = None
        over = False  # the broker has forgotten the job (Done, Error, Busy): nothing to cancel
        stats: dict[str, Any] = {}
        finish = "length"
        t0 = time.perf_counter()
        try:
            async for msg in messages:
                if isinstance(msg, Tokens):
                    piece = out.tokens(msg.index, msg.tokens, msg.text)
                elif isinstance(msg, Done):
                    over = True
                    piece = out.done(msg.token_ids, msg.text)
                    stats, finish = msg.stats, FINISH_REASONS.get(msg.finish_reason, msg.finish_reason)
                else:
                    over = True
                    err = busy_error(msg) if isinstance(msg, Busy) else job_error(msg)
                    if resp is None:
                        raise err
                    await resp.write(ChunkFormat.error(err) + DONE_EVENT)
                    self.counters["stream_errors"] += 1
                    return resp
                if req.stream:
                    if resp is None:
                        resp = await self._open_stream(request, fmt)
                    if piece:
                        await resp.write(fmt.text(piece))
                if out.stopped:
                    finish = "stop"
                    break
                if over:
                    break
        except TimeoutError as exc:
            err = job_error(Error(code="timeout", message=str(exc), job=jid))
            if resp is None:
                raise err from None
            await resp.write(ChunkFormat.error(err) + DONE_EVENT)
            return resp
        except (ConnectionError, asyncio.CancelledError):
            self.counters["disconnects"] += 1
            log.info("request.disconnected", job=jid, tokens=len(out.ids))
            raise
        finally:
            self.jobs.pop(jid, None)
            if not over:
                self.counters["jobs_cancelled"] += 1
                await self.client.cancel(jid)
            await messages.aclose()
            if resp is not None:
                self.streams -= 1
        ext = {**{k: stats[k] for k in SPEC_KEYS if k in stats}, "token_ids": out.ids,
               "deduplicated": out.duplicates}
        use = usage(len(prompt_ids), len(out.ids))
        self.counters["completion_tokens"] += len(out.ids)
        log.info("request.done", job=jid, kind=req.kind, stream=req.stream, tokens=len(out.ids), finish=finish,
                 ms=round((time.perf_counter() - t0) * 1000, 1))
        if not req.stream:
            return web.json_response(response_body(req.kind, fmt.base["id"], fmt.base["created"], self.model_name,
                                                   out.output, finish, use, ext))
        if resp is None:
            resp = await self._open_stream(request, fmt)
            self.streams -= 1
        tail = fmt.final(finish, ext) + (fmt.usage(use) if req.include_usage else b"") + DONE_EVENT
        await resp.write(tail)
        return resp

    async def _open_stream(self, request: web.Request, fmt: ChunkFormat) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await resp.prepare(request)
        self.streams += 1
        first = fmt.first()
        if first:
            await resp.write(first)
        return resp

    async def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.kind == "chat":
            return self.template.prompt_ids(req.messages)
        if req.prompt_ids is not None:
            bad = next((t for t in req.prompt_ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"prompt holds token id {bad}, outside [0, {self.vocab_size})", param="prompt")
            return req.prompt_ids
        if len(req.prompt) > LONG_PROMPT_CHARS:
            return await asyncio.to_thread(encode, self.tokenizer, req.prompt)
        return encode(self.tokenizer, req.prompt)

    # ------------------------------------------------------------------ plumbing
    def _authorize(self, request: web.Request) -> None:
        keys = self.config.api_keys
        if not keys:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k.encode()) for k in keys):
            raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    async def _json(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except ValueError as exc:  # also UnicodeDecodeError
            raise ApiError(400, f"the request body is not valid JSON ({exc})", param="body",
                           code="invalid_json") from None

    @web.middleware
    async def _answer_errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every failure as OpenAI's error JSON; count every answer by route and status."""
        try:
            resp = await handler(request)
        except ApiError as exc:
            resp = web.json_response(exc.body(), status=exc.status, headers=exc.headers)
            log.info("request.refused", path=request.path, status=exc.status, param=exc.param, reason=exc.message)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
            resp = web.json_response(error_body(exc.text or exc.reason, param=None, code=code), status=exc.status)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # a bug: answer 500, keep serving
            log.exception("request.failed", path=request.path, error=repr(exc))
            resp = web.json_response(error_body(f"internal error: {type(exc).__name__}", type="server_error",
                                                code="internal_error"), status=500)
        route = request.match_info.route.resource
        self.requests[(route.canonical if route is not None else "other", resp.status)] += 1
        return resp

    def _own_metrics(self) -> str:
        lines = ["# HELP specmq_gateway_requests_total HTTP requests answered, by route and status",
                 "# TYPE specmq_gateway_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'specmq_gateway_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += ["# HELP specmq_gateway_streams open streamed responses", "# TYPE specmq_gateway_streams gauge",
                  f"specmq_gateway_streams {self.streams}",
                  "# HELP specmq_gateway_broker_up 1 when the broker answered within broker_timeout",
                  "# TYPE specmq_gateway_broker_up gauge", f"specmq_gateway_broker_up {int(self.broker_up)}"]
        for name in ("jobs_cancelled", "disconnects", "completion_tokens", "jobs_failed_broker_down", "stream_errors"):
            lines += [f"# TYPE specmq_gateway_{name}_total counter",
                      f"specmq_gateway_{name}_total {self.counters[name]}"]
        return "\n".join(lines) + "\n"


def _broker_metrics(snap: dict[str, Any]) -> str:
    """The broker's Prometheus families, rendered from its stats snapshot by the broker's own collector."""
    from prometheus_client import CollectorRegistry, generate_latest

    from broker.ops import SnapshotCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    return generate_latest(registry).decode()


def wait_listening(url: str, timeout_s: float = 30.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Block until the gateway at ``url`` answers ``GET /health`` at all (200, or 503 while no fused worker is
    registered); ``GatewayError`` when ``timeout_s`` passes or ``alive()`` turns false (its process exited)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1.0):
                return
        except urllib.error.HTTPError:  # an HTTP answer: it is listening
            return
        except OSError:  # refused, reset, timed out: not yet
            pass
        if not alive():
            raise GatewayError(f"the gateway at {url} exited before it answered")
        if time.monotonic() > deadline:
            raise GatewayError(f"the gateway at {url} did not answer within {timeout_s:g}s")
        time.sleep(0.1)


async def serve_gateway(config: GatewayConfig, stop: asyncio.Event | None = None,
                        on_ready: Callable[[Gateway], None] | None = None) -> None:
    """Serve until ``stop`` is set."""
    gateway = Gateway(config)
    await gateway.start()
    if on_ready is not None:
        on_ready(gateway)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await gateway.stop()

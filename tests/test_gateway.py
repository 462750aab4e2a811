"""The OpenAI-compatible gateway: the ``openai`` client and curl against a real broker, echo or real fused workers.

Greedy output through HTTP equals target-only greedy output (shipped pair); malformed bodies get 400s naming the
field (the table ``BAD_INPUTS`` is also the one in docs/http.md); a client that hangs up cancels its job and the
fused worker frees its slot; a fused worker that dies mid-stream costs no token twice; overload is a 429 with
Retry-After, a missing broker a 503, a wrong key a 401.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from broker.client import BrokerClient
from gateway.chat import ChatTemplate
from gateway.openai_api import ApiError, parse_chat, parse_completion
from gateway.server import Gateway, GatewayConfig, serve_gateway
from gateway.stream import TextStream
from protocol.messages import Cancel, Done, Generate, Ready, Tokens
from tests.conftest import free_endpoint, run_async
from workers.echo_worker import serve_echo
from workers.link import WorkerLink
from workers.tokenizer_text import decode, encode, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TARGET, DRAFT = ROOT / "models" / "tiny-target", ROOT / "models" / "tiny-draft"
MODEL = "tiny-target"


# --------------------------------------------------------------------------- servers on their own loops
class LoopThread:
    """``main(stop)`` on its own event loop in a thread; ``stop()`` sets ``stop`` and joins (always called)."""

    def __init__(self, main: Callable[[asyncio.Event], Awaitable[None]], name: str) -> None:
        self.main, self.loop, self.stop_event, self.error = main, None, None, None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        async def runner() -> None:
            self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
            self._started.set()
            await self.main(self.stop_event)

        try:
            asyncio.run(runner())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self._started.set()

    def start(self) -> "LoopThread":
        self.thread.start()
        assert self._started.wait(10), "thread did not start"
        return self

    def stop(self, timeout: float = 20.0) -> None:
        if self.loop is not None and self.thread.is_alive():
            try:
                self.loop.call_soon_threadsafe(self.stop_event.set)
            except RuntimeError:  # loop already closed
                pass
        self.thread.join(timeout)
        if self.thread.is_alive():  # say where it hangs: the stuck thread's stack and its loop's pending tasks
            frame = sys._current_frames().get(self.thread.ident)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "?"
            try:  # read from another thread: diagnostics only
                tasks = [repr(t) for t in asyncio.all_tasks(self.loop)] if self.loop is not None else []
            except RuntimeError as exc:
                tasks = [f"unreadable: {exc}"]
            raise AssertionError(f"{self.thread.name} did not stop within {timeout:g} s; its stack:\n{where}"
                                 f"\npending tasks: {tasks}")
        if self.error is not None:
            raise self.error


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Stack:
    """Starts gateways and workers against a broker; ``close()`` stops them all (the fixture always calls it)."""

    def __init__(self, broker) -> None:
        self.broker = broker
        self.threads: list[LoopThread] = []

    def gateway(self, **overrides: Any):
        ready: list = []
        config = GatewayConfig(broker=overrides.pop("broker", self.broker.frontend), port=0, health_interval=0.1,
                               tokenizer=str(TARGET), **overrides)
        self._start(lambda stop: serve_gateway(config, stop, ready.append), "gateway")
        return wait_until(lambda: ready and ready[0], what="gateway ready")

    def worker(self, coro: Callable[[asyncio.Event], Awaitable[None]], name: str = "worker") -> LoopThread:
        return self._start(coro, name)

    def echo(self, name: str = "echo", **kw: Any) -> None:
        before = len(self.broker.snapshot()["workers"])
        self.worker(lambda stop: serve_echo(self.broker.backend, "fused", name=name, heartbeat_interval=0.1,
                                            stop=stop, **kw), name)
        wait_until(lambda: len(self.broker.snapshot()["workers"]) > before, what="echo worker registered")

    def _start(self, main, name: str) -> LoopThread:
        t = LoopThread(main, name).start()
        self.threads.append(t)
        return t

    def close(self) -> None:
        errors = []
        for t in reversed(self.threads):
            try:
                t.stop()
            except BaseException as exc:  # stop them all, then report
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def stack(broker):
    s = Stack(broker)
    yield s
    s.close()


def http(method: str, url: str, body: Any = None, headers: dict | None = None,
         raw: bytes | None = None) -> tuple[int, dict, Any]:
    """(status, headers, parsed JSON or text) with urllib: no client library between the test and the server."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, hdrs, text = r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except ValueError:
        return status, hdrs, text


def openai_client(url: str, key: str = "none", **kw: Any):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60, **kw)


def sse_events(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --------------------------------------------------------------------------- malformed bodies (docs/http.md table)
LONG = "x" * (1 << 20)
# (what was sent, endpoint, body (or raw bytes), status, param named). docs/http.md lists every row.
BAD_INPUTS: list[tuple[str, str, Any, int, str | None]] = [
    ("not JSON", "completions", b"{prompt: hi", 400, "body"),
    ("a JSON list, not an object", "completions", [1, 2], 400, "body"),
    ("no prompt", "completions", {"model": MODEL}, 400, "prompt"),
    ("prompt is a number", "completions", {"prompt": 5}, 400, "prompt"),
    ("two prompts", "completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("token id outside the vocabulary", "completions", {"prompt": [1, 999999]}, 400, "prompt"),
    ("max_tokens is a string", "completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens is 0", "completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens past the context", "completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("temperature is 3", "completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("temperature is a string", "completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("top_p is 0", "completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("seed is a float", "completions", {"prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("n is 2", "completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("stream is \"yes\"", "completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("stream_options without stream", "completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("five stop strings", "completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("an empty stop string", "completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("logprobs asked for", "completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("echo asked for", "completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("a presence penalty", "completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("gamma past the worker's max_gamma", "completions", {"prompt": "hi", "gamma": 40}, 400, "gamma"),
    ("an unknown model", "completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("a body over --max-body", "completions", {"prompt": LONG}, 413, None),
    ("no messages", "chat", {"model": MODEL}, 400, "messages"),
    ("messages is empty", "chat", {"messages": []}, 400, "messages"),
    ("a message that is a string", "chat", {"messages": ["hi"]}, 400, "messages[0]"),
    ("an unknown role", "chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("an image part", "chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("tools", "chat", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools"),
    ("a JSON response format", "chat", {"messages": [{"role": "user", "content": "hi"}],
                                        "response_format": {"type": "json_object"}}, 400, "response_format"),
]


def test_malformed_bodies_get_openai_errors_naming_the_field(fused_stack):
    _, gw, _, _ = fused_stack  # the real worker: it is the one that checks the context and gamma
    for what, endpoint, body, want_status, want_param in BAD_INPUTS:
        path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
        raw = body if isinstance(body, bytes) else None
        status, _, reply = http("POST", gw.url + path, None if raw else body, raw=raw)
        assert status == want_status, (what, status, reply)
        assert isinstance(reply, dict) and set(reply) == {"error"}, (what, reply)
        err = reply["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (what, err)
        assert err["param"] == want_param, (what, err)
    # the server is unharmed: a good request still works
    status, _, reply = http("POST", gw.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and reply["choices"][0]["text"]


def test_the_docs_table_lists_every_bad_input():
    doc = (ROOT / "docs" / "http.md").read_text()
    for what, endpoint, _, status, param in BAD_INPUTS:
        row = f"| {what} | {endpoint} | {status} | {'`' + param + '`' if param else '-'} |"
        assert row in doc, f"docs/http.md lacks the row: {row}"


def test_request_parsing_keeps_neutral_values_and_refuses_the_rest():
    req = parse_completion({"prompt": ["hi"], "n": 1, "logprobs": None, "presence_penalty": 0, "user": "me",
                            "stop": "\n", "temperature": 0, "max_tokens": 5.0})
    assert (req.prompt, req.stop, req.temperature, req.max_tokens) == ("hi", ["\n"], 0.0, 5)
    assert parse_completion({"prompt": [[5, 6]]}).prompt_ids == [5, 6]
    chat = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]},
                                    {"role": "assistant", "content": None}], "max_completion_tokens": 7})
    assert chat.messages == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": ""}]
    assert chat.max_tokens == 7 and chat.temperature == 1.0
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"})
    assert e.value.param == "tool_choice" and e.value.status == 400


# --------------------------------------------------------------------------- the stream: dedupe and stop strings
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TARGET)


def test_text_stream_drops_repeated_tokens_by_index_and_decodes_straddling_batches(tok):
    ids = encode(tok, "def fibonacci(n): return n")[1:]
    assert len(ids) >= 6
    s = TextStream(tok)
    first = s.tokens(0, ids[:2], decode(tok, ids[:2])) + s.tokens(2, ids[2:3], decode(tok, ids[:3])[len(decode(tok, ids[:2])):])
    # a redelivered job streams again from 0, batched differently: only what is new comes out
    assert s.tokens(0, ids[:2], "ignored") == ""
    more = s.tokens(1, ids[1:5], "ignored: straddles what was taken")
    rest = s.done(ids, decode(tok, ids))
    assert first + more + rest == decode(tok, ids) and s.ids == ids
    assert s.duplicates == 2 + 2


def test_text_stream_cuts_at_a_stop_string_split_across_pieces(tok):
    s = TextStream(tok, stop=["STOP", "\n\n"])
    out = [s.tokens(i, [i], piece) for i, piece in enumerate(["hello ", "wor", "ld ST", "OP more"])]
    assert "".join(out) == "hello world " and s.stopped and s.output == "hello world "
    assert s.tokens(4, [4], "after") == "" and s.done([0, 1, 2, 3, 4], "x") == ""
    s2 = TextStream(tok, stop=["STOP"])
    got = s2.tokens(0, [0], "abcST") + s2.tokens(1, [1], "x") + s2.done([0, 1], "abcSTx")
    assert got == "abcSTx" and not s2.stopped  # held text that did not become a stop string comes out


def test_chat_templates_plain_for_the_shipped_pair_and_the_models_own(tok, tmp_path):
    plain = ChatTemplate.load(TARGET, tok)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert plain.name == "plain" and plain.render(msgs) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert plain.prompt_ids(msgs) == encode(tok, plain.render(msgs))
    model_dir = tmp_path / "m"
    shutil.copytree(TARGET, model_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    own = ChatTemplate.load(model_dir, tok)
    assert own.name == "model" and own.render(msgs) == "<|bos|><system>Be brief.<user>Hi<assistant>"
    ids = own.prompt_ids(msgs)
    assert ids[0] == 1 and ids.count(1) == 1 and decode(tok, ids) == "<system>Be brief.<user>Hi<assistant>"


# --------------------------------------------------------------------------- openai client and curl (echo worker)
def test_openai_client_completions_and_chat_streamed_and_not(stack):
    stack.echo(capacity=8)
    gw = stack.gateway()
    client = openai_client(gw.url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    c = client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
    assert c.object == "text_completion" and c.choices[0].text == "t1 t2 t3 " and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 3 and c.usage.prompt_tokens == len(encode(gw.tokenizer, "hello"))
    assert c.model_extra["specmq"]["token_ids"] == [1, 2, 3]
    chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "t1 t2 t3 "
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "t1 t2 t3 "
    stream = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == "t1 t2 t3 "
    assert stream[-1].choices[0].finish_reason == "length"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_plain_and_streamed(stack):
    stack.echo(capacity=4)
    gw = stack.gateway()

    def curl(body: dict) -> str:
        r = subprocess.run(["curl", "-sS", "--max-time", "30", "-H", "Content-Type: application/json", "-d",
                            json.dumps(body), gw.url + "/v1/completions"], capture_output=True, text=True, timeout=40)
        assert r.returncode == 0, r.stderr
        return r.stdout

    plain = json.loads(curl({"model": MODEL, "prompt": "hi", "max_tokens": 3}))
    assert plain["choices"][0]["text"] == "t1 t2 t3 " and plain["usage"]["completion_tokens"] == 3
    events = sse_events(curl({"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}))
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == "t1 t2 t3 "
    assert events[-2]["choices"][0]["finish_reason"] == "length" and "specmq" in events[-2]


def test_wrong_api_key_is_401_and_the_right_one_works(stack, tmp_path):
    stack.echo(capacity=2)
    gw = stack.gateway(api_keys=("sk-good",))
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai_client(gw.url, "sk-bad").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    status, _, reply = http("GET", gw.url + "/v1/models")
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert openai_client(gw.url, "sk-good").completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    assert http("GET", gw.url + "/health")[0] == 200  # health and metrics stay open for probes and scrapers


def test_a_full_queue_is_429_with_retry_after(make_broker):
    broker = make_broker(max_queue=0, retry_ms=1500)
    s = Stack(broker)
    try:
        s.echo(capacity=2)
        gw = s.gateway()
        status, headers, reply = http("POST", gw.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 429 and reply["error"]["code"] == "rate_limit_exceeded"
        assert headers["Retry-After"] == "2" and headers["retry-after-ms"] == "1500"
        import openai

        with pytest.raises(openai.RateLimitError):
            openai_client(gw.url).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    finally:
        s.close()


def test_no_broker_is_503_and_no_fused_worker_is_503(stack):
    down = stack.gateway(broker=free_endpoint(), broker_timeout=0.3)
    status, _, reply = http("POST", down.url + "/v1/completions", {"prompt": "hi"})
    assert status == 503 and reply["error"]["code"] == "broker_unavailable"
    status, _, reply = http("GET", down.url + "/health")
    assert status == 503 and reply["status"] == "unavailable"
    gw = stack.gateway()  # a live broker with no worker
    status, _, reply = http("POST", gw.url + "/v1/completions", {"prompt": "hi"})
    assert status == 503 and reply["error"]["code"] == "no_workers"
    status, _, reply = http("GET", gw.url + "/health")
    assert status == 503 and reply["fused_workers"] == 0


def test_health_models_and_metrics(stack):
    stack.echo(capacity=2)
    gw = stack.gateway()
    http("POST", gw.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    status, _, health = http("GET", gw.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["fused_workers"] == 1
    status, headers, text = http("GET", gw.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'specmq_gateway_requests_total{route="/v1/completions",status="200"} 1' in text
    assert "specmq_gateway_broker_up 1" in text and "specmq_uptime_seconds" in text  # the broker's own families


# --------------------------------------------------------------------------- cancel and redelivery (scripted workers)
async def _held_jobs(backend: str, got: list, stop: asyncio.Event, capacity: int = 1) -> None:
    """A fused worker that takes jobs and never answers them; it records every message the broker sends."""
    ready = Ready(kind="fused", model="held", capacity=capacity, worker="held")
    async with WorkerLink(backend, ready, heartbeat_interval=0.1, initial_credit=capacity) as link:
        while not stop.is_set():
            got.extend(await link.recv_batch(timeout=0.05))


def test_cancel_drops_a_queued_job_and_reaches_the_worker_holding_one(stack, broker):
    got: list = []
    stack.worker(lambda stop: _held_jobs(broker.backend, got, stop), "held")
    wait_until(lambda: broker.snapshot()["workers"], what="worker registered")

    async def main() -> None:
        async with BrokerClient(broker.frontend) as client:
            for jid in ("a", "b"):
                await client.send(Generate(job=jid, prompt_ids=[1, 2], max_new_tokens=4))
            await asyncio.to_thread(wait_until, lambda: broker.snapshot()["queues"]["generate"]["depth"] == 1)
            await client.cancel("b")  # still queued: dropped there
            await asyncio.to_thread(wait_until, lambda: broker.snapshot()["queues"]["generate"]["depth"] == 0)
            await client.cancel("a")  # held by the worker: forwarded
            await asyncio.to_thread(wait_until, lambda: any(isinstance(m, Cancel) for m in got), 5, "cancel")
            await client.cancel("a")  # over already: nothing happens

    run_async(main(), 30)
    snap = broker.snapshot()
    assert snap["counters"]["cancelled"] == 2 and snap["jobs"] == 0
    assert [m.job.rsplit("/", 1)[1] for m in got if isinstance(m, Generate)] == ["a"]
    assert [m.job.rsplit("/", 1)[1] for m in got if isinstance(m, Cancel)] == ["a"]


async def _dies_after_two(backend: str, stop: asyncio.Event, tok, ids: list[int], sent: threading.Event) -> None:
    """Streams the job's first two tokens, then vanishes without a word (a crash)."""
    link = WorkerLink(backend, Ready(kind="fused", model="m", capacity=1, worker="doomed"), heartbeat_interval=0.1,
                      initial_credit=1)
    await link.start()
    while not stop.is_set():
        for m in await link.recv_batch(timeout=0.05):
            if isinstance(m, Generate):
                for i in range(2):
                    await link.send(Tokens(job=m.job, tokens=ids[i:i + 1], index=i, incarnation=m.incarnation,
                                           text=decode(tok, ids[:i + 1])[len(decode(tok, ids[:i])):]))
                await asyncio.sleep(0.1)
                link.abort()
                sent.set()
                return
    await link.close()


async def _batches_differently(backend: str, stop: asyncio.Event, tok, ids: list[int]) -> None:
    """Streams a redelivered job from the start in batches of three (straddling what the client has), then Done."""
    async with WorkerLink(backend, Ready(kind="fused", model="m", capacity=1, worker="rescuer"),
                          heartbeat_interval=0.1, initial_credit=1) as link:
        while not stop.is_set():
            for m in await link.recv_batch(timeout=0.05):
                if isinstance(m, Generate):
                    for i in range(0, len(ids), 3):
                        await link.send(Tokens(job=m.job, tokens=ids[i:i + 3], index=i, incarnation=m.incarnation,
                                               text=decode(tok, ids[:i + 3])[len(decode(tok, ids[:i])):]))
                    await link.send(Done(job=m.job, token_ids=ids, text=decode(tok, ids),
                                         stats={"delivery": m.delivery}, incarnation=m.incarnation))
                    link.grant(1)


def test_a_fused_worker_dying_mid_stream_costs_no_token_twice(stack, broker, tok):
    ids = encode(tok, "for i in range(10): print(i)")[1:8]
    assert len(ids) == 7
    sent = threading.Event()
    stack.worker(lambda stop: _dies_after_two(broker.backend, stop, tok, ids, sent), "doomed")
    wait_until(lambda: broker.snapshot()["workers"], what="first worker registered")
    gw = stack.gateway()
    result: dict = {}

    def read_stream() -> None:
        stream = openai_client(gw.url).completions.create(model=MODEL, prompt="x", max_tokens=7, stream=True)
        chunks = list(stream)
        result["text"] = "".join(c.choices[0].text for c in chunks)
        result["ext"] = chunks[-1].model_extra["specmq"]

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    assert sent.wait(10)
    stack.worker(lambda stop: _batches_differently(broker.backend, stop, tok, ids), "rescuer")
    reader.join(30)
    assert not reader.is_alive()
    assert result["text"] == decode(tok, ids)
    assert result["ext"]["token_ids"] == ids and result["ext"]["delivery"] == 1
    assert result["ext"]["deduplicated"] == 2
    assert broker.snapshot()["counters"]["redeliveries"] == 1


def test_a_stop_string_ends_the_stream_and_cancels_the_job(stack, broker):
    got: list = []
    stack.worker(lambda stop: _stop_worker(broker.backend, got, stop), "stopper")
    wait_until(lambda: broker.snapshot()["workers"], what="worker registered")
    gw = stack.gateway()
    c = openai_client(gw.url).completions.create(model=MODEL, prompt="x", max_tokens=50, stop=["ST"])
    assert c.choices[0].text == "one two " and c.choices[0].finish_reason == "stop"
    wait_until(lambda: any(isinstance(m, Cancel) for m in got), what="Cancel at the worker")
    assert broker.snapshot()["counters"]["cancelled"] == 1


async def _stop_worker(backend: str, got: list, stop: asyncio.Event) -> None:
    """Streams 'one ', 'two S', 'TOP' and then nothing: only a Cancel ends the job."""
    async with WorkerLink(backend, Ready(kind="fused", model="m", capacity=1, worker="stopper"),
                          heartbeat_interval=0.1, initial_credit=1) as link:
        while not stop.is_set():
            for m in await link.recv_batch(timeout=0.05):
                got.append(m)
                if isinstance(m, Generate):
                    for i, piece in enumerate(["one ", "two S", "TOP"]):
                        await link.send(Tokens(job=m.job, tokens=[100 + i], text=piece, index=i,
                                               incarnation=m.incarnation))


# --------------------------------------------------------------------------- the real fused worker (shipped pair)
@pytest.fixture(scope="module")
def fused_stack(one_torch_thread):
    """Broker + fused worker on the shipped pair + gateway, shared by the tests below."""
    from dataclasses import replace

    from tests.conftest import TEST_CONFIG, BrokerThread
    from workers.engine import load_engine
    from workers.fused_worker import FusedConfig, serve_fused

    broker = BrokerThread(replace(TEST_CONFIG, heartbeat_interval=0.2, liveness=25)).start()
    s = Stack(broker)
    servers: list = []
    try:
        tok = load_tokenizer(TARGET)
        target = load_engine(TARGET, slots=4, max_context=1024)
        draft = load_engine(DRAFT, slots=4, max_context=1024)
        s.worker(lambda stop: serve_fused(broker.backend, draft, target, tok, FusedConfig(name="f0"), stop=stop,
                                          heartbeat_interval=0.2, liveness=25, on_server=servers.append), "fused")
        wait_until(lambda: broker.snapshot()["workers"] and servers, 30, "fused worker registered")
        gw = s.gateway()
        yield s, gw, servers[0], broker
    finally:
        s.close()
        broker.stop()


@pytest.fixture(scope="module")
def greedy_reference(one_torch_thread):
    from workers.engine import load_engine
    from workers.sampling import SamplingParams
    from workers.speculation import autoregressive_generate

    engine = load_engine(TARGET, slots=1, max_context=1024)
    return lambda ids, n: autoregressive_generate(engine, ids, n, SamplingParams()).tokens


PROMPTS = ["def fibonacci(n):\n", "import numpy as np\n\nclass"]


@pytest.mark.slow
def test_http_output_equals_target_only_greedy(fused_stack, greedy_reference):
    _, gw, _, _ = fused_stack
    client = openai_client(gw.url)
    tok = gw.tokenizer
    for prompt in PROMPTS:
        want = greedy_reference(encode(tok, prompt), 24)
        c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        ext = c.model_extra["specmq"]
        assert ext["token_ids"] == want and c.choices[0].text == decode(tok, want)
        assert c.usage.completion_tokens == len(want) and 0 <= ext["accepted"] <= ext["drafted"] and ext["rounds"] >= 1
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == decode(tok, want)
        assert len(chunks) > 2 and chunks[-1].model_extra["specmq"]["token_ids"] == want
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    want = greedy_reference(gw.template.prompt_ids(messages), 20)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert chat.choices[0].message.content == decode(tok, want)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == decode(tok, want)


def test_a_client_that_hangs_up_frees_the_fused_workers_slot(fused_stack):
    _, gw, server, broker = fused_stack
    import aiohttp

    async def hang_up() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.url + "/v1/completions", json={
                    "model": MODEL, "prompt": "import os\nimport sys\n", "max_tokens": 900, "temperature": 0,
                    "stream": True}) as r:
                assert r.status == 200
                await r.content.readline()  # the first chunk: the job holds a slot
            # leaving the block closes the connection mid-stream

    before = server.stats()["jobs_cancelled"], broker.snapshot()["counters"]["cancelled"]
    run_async(hang_up(), 60)
    wait_until(lambda: server.stats()["jobs_cancelled"] == before[0] + 1 and server.stats()["slots_used"] == 0, 30,
               "the worker freed the slot")
    wait_until(lambda: all(w["jobs"] == 0 for w in broker.snapshot()["workers"].values()), 10, "broker forgot the job")
    assert broker.snapshot()["counters"]["cancelled"] == before[1] + 1
    assert gw.counters["disconnects"] >= 1
    # the freed slot serves the next request
    c = openai_client(gw.url).completions.create(model=MODEL, prompt="x = ", max_tokens=4, temperature=0)
    assert c.usage.completion_tokens == 4


# --------------------------------------------------------------------------- the command
def _specmq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specmq.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_serve_help_and_one_line_failures(tmp_path):
    r = _specmq("serve", "--help")
    assert r.returncode == 0 and "example:" in r.stdout and "--listen" in r.stdout and "--api-key-file" in r.stdout
    r = _specmq("serve", "--listen", "localhost:http")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("specmq serve: --listen")
    r = _specmq("serve", "--tokenizer", str(tmp_path / "missing"), "--listen", "127.0.0.1:0")
    assert r.returncode == 1 and "tokenizer.json" in r.stderr.strip().splitlines()[-1]
    (tmp_path / "keys").write_text("# no keys here\n")
    r = _specmq("serve", "--api-key-file", str(tmp_path / "keys"), "--listen", "127.0.0.1:0")
    assert r.returncode == 1 and "holds no key" in r.stderr


@pytest.mark.slow
def test_serve_command_answers_and_stops_on_sigterm(stack, broker):
    stack.echo(capacity=2)
    port = free_endpoint().rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, "-m", "specmq.cli", "serve", "--broker", broker.frontend, "--listen",
                             f"127.0.0.1:{port}", "--model-name", "tiny", "--health-interval", "0.2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("specmq serve: ready http://127.0.0.1:") and "model=tiny" in line
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http("GET", url + "/health")[0] == 200, 10, "gateway healthy")
        status, _, reply = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert status == 200 and reply["choices"][0]["text"] == "t1 t2 t3 "
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_up_with_http_starts_the_gateway_with_the_rest():
    port = free_endpoint().rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, "-m", "specmq.cli", "up", "--frontend", free_endpoint(), "--backend",
                             free_endpoint(), "--targets", "0", "--fused", "1", "--jobs", "2", "--http", port,
                             "--log-level", "warning"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        lines = [proc.stdout.readline() for _ in range(2)]  # the gateway's own ready line, then up's
        line = next((x for x in lines if x.startswith("specmq up: ready")), "")
        assert f"http=http://127.0.0.1:{port}" in line, lines
        c = openai_client(f"http://127.0.0.1:{port}").completions.create(model=MODEL, prompt="import os\n",
                                                                        max_tokens=5, temperature=0)
        assert c.usage.completion_tokens == 5 and c.choices[0].finish_reason == "length"
        proc.terminate()
        assert proc.wait(40) == 0
    finally:
        if proc.poll() is None:  # SIGTERM first: up stops its children; a SIGKILL would orphan them
            proc.terminate()
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_the_shipped_serve_config_names_only_real_flags():
    import argparse

    from specmq.cliutil import apply_config
    from specmq.commands import serve

    parser = argparse.ArgumentParser(prog="specmq")
    serve.register(parser.add_subparsers(dest="command", required=True))
    args = apply_config(parser.parse_args(["serve", "--config", str(ROOT / "configs" / "serve.yaml")]), set())
    assert serve.parse_listen(args.listen) == ("127.0.0.1", 8000) and args.tokenizer == "models/tiny-target"
    assert serve.parse_listen(":9000") == ("127.0.0.1", 9000) and serve.parse_listen("[::1]:80") == ("::1", 80)


@pytest.mark.slow
def test_bench_http_runs_both_paths_and_reports_rows(tmp_path):
    """The benchmark as a tool (its figures live in benchmarks/results): both modes run and are counted."""
    r = _specmq("bench", "http", "--streams", "2", "--requests", "1", "--tokens", "3", "--token-ms", "1",
                "--rounds", "1", "--logdir", str(tmp_path), "--json", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["mode"] for row in rows] == ["native", "http", "added"]
    for row in rows[:2]:
        assert row["errors"] == 0 and row["requests"] == 2 and row["chunks"] == 6
        assert row["delivery_p50_ms"] is not None and row["ttft_p50_ms"] > 0


def test_a_stop_step_slow_to_cancel_is_abandoned_at_its_bound():
    """A shutdown step (HTTP cleanup, broker close) that hangs, and hangs again when cancelled, must not hold the
    gateway's stop past its bound; a step that fails still reports its error."""
    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(5)  # slow to let go

    async def failing() -> None:
        raise RuntimeError("close failed")

    async def main() -> float:
        t0 = time.monotonic()
        await Gateway._bounded(stubborn(), 0.1, "http")
        took = time.monotonic() - t0
        with pytest.raises(RuntimeError, match="close failed"):
            await Gateway._bounded(failing(), 1.0, "broker_client")
        return took

    assert asyncio.run(main()) < 2.0


def test_a_queue_read_keeps_a_cancel_that_lands_as_its_item_arrives():
    """The client's queue reads must not lose a cancel (``asyncio.wait_for`` does before Python 3.12 when the item
    and the cancel arrive together): a lost cancel let the gateway's broker watch run on and hang its stop."""
    from broker.client import _get
    from broker.waits import within

    async def main() -> tuple[bool, int]:
        q: asyncio.Queue = asyncio.Queue()
        ev = asyncio.Event()
        reads = [asyncio.create_task(_get(q, 5.0)), asyncio.create_task(within(ev.wait(), 5.0))]
        await asyncio.sleep(0)  # both now wait
        q.put_nowait("item")  # wake them ...
        ev.set()
        for task in reads:  # ... and the cancels land before they run
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        return [t.cancelled() for t in reads], q.qsize()

    cancelled, left = asyncio.run(main())
    assert cancelled == [True, True], "a cancel was lost"
    assert left == 1, "the item was taken by a cancelled read"


def test_the_gateway_stops_even_when_its_broker_watch_swallows_the_cancel(stack):
    """Belt and braces for the lost cancel above: the watch also ends on the gateway's stop flag."""
    gw = stack.gateway()
    swallowed: list[int] = []

    async def stubborn_snapshot(max_age: float):
        try:
            await asyncio.sleep(5.0)
        except asyncio.CancelledError:  # what a lost cancel looks like to the loop
            swallowed.append(1)
        return None

    thread = stack.threads[-1]
    thread.loop.call_soon_threadsafe(setattr, gw, "broker_snapshot", stubborn_snapshot)
    wait_until(lambda: gw.broker_snapshot is stubborn_snapshot, what="stub installed")
    time.sleep(0.3)  # the watch is now in the stub's sleep
    t0 = time.monotonic()
    stack.threads.remove(thread)
    thread.stop(timeout=10.0)  # raises, naming the stuck task, if the watch ran on
    assert swallowed == [1], "the cancel did not land in the stub: the test did not exercise a lost cancel"
    assert time.monotonic() - t0 < 5.0

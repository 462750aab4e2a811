"""The draft worker: many prompts at once through the broker's targets, one batched draft forward per step.

Each prompt is a session: ``SessionOpen`` (prompt ids, tokenizer fingerprint, sampling), then rounds of
draft γ -> ``Verify`` -> ``Result`` -> roll the draft cache back (``apply_result_to_draft``), until the target says
``finished``; then ``SessionClose``. Sessions run as coroutines; a ``DraftBatcher`` collects every session that
wants to draft at the same moment and drafts them in ONE ``draft_batch`` call, so 16 sessions cost about one
session's drafting; the call runs in a worker thread, so the loop keeps reading other sessions' replies meanwhile.
Each round's time is split in ``RoundRow`` (the ``--profile`` columns).

Recovery (protocol/FLOW.md, docs/operations.md): ``Busy`` and transient errors (a draining or just-restarted
broker) are waited out by ``BrokerClient.request`` with jittered back-off until ``queue_timeout``; a timed-out
request is resent with the same seq (the broker answers from its cache); ``Reopen`` (from the broker when a target
died, or from the client when a new broker instance answers) or ``unknown_session`` re-sends ``SessionOpen`` with
the prompt + every committed token and re-sends the chunk in hand as seq 0: nothing is lost, the draft cache is
still right. Only a passed ``queue_timeout`` (``overloaded``) or any other ``Error`` fails a session, alone.
"""
from __future__ import annotations

import asyncio
import csv
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import structlog

from broker.client import BrokerClient
from broker.waits import within
from protocol import errors as E
from protocol.errors import ProtocolError, SpecmqError
from protocol.messages import (HEARTBEAT_INTERVAL_S, Busy, Error, Message, Reopen, Result, SessionClose, SessionOpen,
                               SessionOpened, Verify)

log = structlog.get_logger("draft")

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-draft"
DEFAULT_BROKER = "tcp://127.0.0.1:5555"
PROFILE_COLUMNS = ("session", "round", "gamma", "accepted", "draft_ms", "network_ms", "verify_ms", "queue_ms",
                   "batch", "draft_wait_ms", "path_ms", "busy_wait_ms", "send_ms")


class DraftError(SpecmqError):
    """A failure of the whole run (not of one session): unreachable broker, unloadable model."""


# --------------------------------------------------------------------------- text <-> ids
class TextCodec:
    """The model directory's tokenizer (``workers.tokenizer_text``: the same encoding fused workers use)."""

    def __init__(self, model_dir: str | Path) -> None:
        from workers.tokenizer_text import TokenizerError, load_tokenizer

        try:
            self.tok = load_tokenizer(model_dir)
        except TokenizerError as exc:
            raise DraftError(str(exc)) from None

    def encode(self, text: str) -> list[int]:
        from workers.tokenizer_text import encode

        return encode(self.tok, text)

    def decode(self, ids: Sequence[int]) -> str:
        from workers.tokenizer_text import decode

        return decode(self.tok, ids)


# --------------------------------------------------------------------------- configuration and results
@dataclass
class DraftConfig:
    broker: str = DEFAULT_BROKER
    model: str | Path = DEFAULT_MODEL
    max_new_tokens: int = 64
    gamma: int | str = "auto"  # "auto": the target's goodput controller picks each round's γ; 0: decode mode
    initial_gamma: int = 4  # the first round's γ under "auto" (before the target has advised)
    decode_tokens: int = 8  # tokens one decode-mode request asks the target for (γ = 0)
    adaptive_gamma: bool = False  # choose γ here from acceptance alone (AdaptiveGamma) instead of following the target
    max_gamma: int = 8  # ceiling of adaptive and auto γ
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    concurrency: int = 16
    link_delay_ms: float = 0.0
    timeout: float = 10.0  # per request try: an unanswered request is resent after this
    retries: int = 3
    queue_timeout: float = 120.0  # longest a request waits out overload, a draining or a restarting broker
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S  # beats to the broker while requests wait (restart detection)
    connect_timeout: float = 5.0  # the broker must answer a stats request within this on start
    gather_ms: float = 2.0  # how long the batcher waits for more sessions to draft with
    gather_quiet_ms: float = 0.5  # ... but it stops after this long without a new one (their replies came together)
    policy: str = "exact"
    max_reopens: int = 20
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "cpu"  # draft engine placement (cpu, cuda, cuda:1, ...)
    dtype: str = "float32"
    backend: str = "auto"  # workers.engine.BACKENDS
    grow: str | None = None  # grow the draft model in memory to this shape (workers/engine/grow.py)
    curve: dict = field(default_factory=dict)  # CURVE client keys (broker.curve.client_kwargs); empty: plain TCP


@dataclass
class RoundRow:
    """Where one round's time went (``--profile`` columns). A round is: wait for a draft step (``draft_wait_ms``),
    draft (``draft_ms``), then the chunk's trip to the target and back, which is ``path_ms + busy_wait_ms +
    verify_ms`` measured from the end of its draft step to the reply reaching the session.

    ``network_ms`` is the round trip from the chunk's send minus ``verify_ms``, waits at the target included;
    ``queue_ms`` the chunk's wait at the target before its tick, of which ``busy_wait_ms`` passed while earlier ticks
    ran. ``path_ms`` is the software path: the drafter's loop handing the chunk on, serialisation, broker hops, the
    target's gather window and loop. Of it, ``send_ms`` passed at the drafter before the chunk was handed to its
    broker client (the other sessions of the step sent theirs first), and ``queue_ms - busy_wait_ms`` at the target
    (its gather window and loop); the rest is transit (hops and the answer's way back). The goodput controller receives ``draft_wait_ms + network_ms`` (``Verify.path_ms``:
    all the round costs beyond drafting and verifying, waits included, as they are part of every token's time).
    """

    session: int
    round: int
    gamma: int
    accepted: int
    draft_ms: float  # the shared draft step's time (0: decode mode)
    network_ms: float
    verify_ms: float
    queue_ms: float
    batch: int  # sessions drafted in the same forward
    draft_wait_ms: float = 0.0  # draft request to the start of its step: the gather and a step already running
    path_ms: float = 0.0
    busy_wait_ms: float = 0.0
    send_ms: float = 0.0  # the end of its draft step to the chunk's hand-off to the broker client


@dataclass
class PromptResult:
    index: int
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    rejections: int = 0  # rounds that stopped at a rejected draft token (per-token acceptance = a/(a+r))
    reopens: int = 0
    wall_s: float = 0.0
    finished: bool = False
    error: str | None = None
    error_code: str | None = None
    gammas: list[int] = field(default_factory=list)
    first_token_s: float | None = None  # from the session's start to its first committed tokens (TTFT)
    first_batch: int = 0  # how many tokens that first delivery held

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
            "new_tokens": self.new_tokens, "drafted": self.drafted, "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4), "rounds": self.rounds, "rejections": self.rejections,
            "mean_accepted": round(self.accepted / self.rounds, 3) if self.rounds else 0.0,
            "mean_gamma": round(sum(self.gammas) / len(self.gammas), 3) if self.gammas else 0.0,
            "reopens": self.reopens, "wall_s": round(self.wall_s, 4),
            **latency_fields(self.first_token_s, self.wall_s, self.new_tokens, self.first_batch),
            "tokens_per_s": round(self.tokens_per_s, 2), "error": self.error, "error_code": self.error_code,
        }


def latency_fields(first_token_s: float | None, wall_s: float, tokens: int, first_batch: int = 1
                   ) -> dict[str, float | None]:
    """TTFT and TPOT of one generation. TPOT is the time from the first delivery of tokens to the last over the
    tokens delivered after that first delivery, so a mode that delivers several tokens at once (a verified round, a
    decode-mode request) is not credited with free tokens."""
    tpot = None
    if first_token_s is not None and tokens > first_batch:
        tpot = round((wall_s - first_token_s) / (tokens - first_batch) * 1000.0, 3)
    return {"ttft_s": None if first_token_s is None else round(first_token_s, 4), "tpot_ms": tpot}


class SessionFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- link delay
class DelayedBrokerClient(BrokerClient):
    """A ``BrokerClient`` whose every send and every receive waits ``delay_s`` (a simulated one-way link)."""

    def __init__(self, address: str, delay_s: float, **kw: Any) -> None:
        super().__init__(address, **kw)
        self.delay_s = delay_s

    async def send(self, msg: Message) -> None:
        await asyncio.sleep(self.delay_s)
        await super().send(msg)

    def _deliver(self, msg: Message) -> None:
        asyncio.get_running_loop().call_later(self.delay_s, super()._deliver, msg)


def make_client(address: str, link_delay_ms: float = 0.0, timeout: float = 10.0, curve: dict | None = None,
                heartbeat_interval: float = HEARTBEAT_INTERVAL_S) -> BrokerClient:
    """A frontend client; ``curve`` holds ``BrokerClient``'s CURVE keyword arguments (``broker.curve.client_kwargs``)."""
    if link_delay_ms > 0:
        return DelayedBrokerClient(address, link_delay_ms / 1000.0, timeout=timeout,
                                   heartbeat_interval=heartbeat_interval, **(curve or {}))
    return BrokerClient(address, timeout=timeout, heartbeat_interval=heartbeat_interval, **(curve or {}))


async def probe_broker(client: BrokerClient, address: str, timeout: float) -> dict:
    """One stats round trip, so an unreachable broker is a clear error instead of a hang."""
    try:
        return await _stats_once(client, timeout)
    except TimeoutError:
        raise DraftError(f"broker at {address} is not reachable (no reply within {timeout:g}s)") from None


async def _stats_once(client: BrokerClient, timeout: float) -> dict:
    """``client.probe``: a refused handshake raises ``HandshakeRefused`` at once, in the words ``specmq monitor``
    uses (one line in the CLI), not a timeout."""
    try:
        return await client.probe(timeout)
    except ProtocolError:  # something else than stats came back: the broker is there all the same
        return {}


# --------------------------------------------------------------------------- batched drafting
@dataclass
class Drafted:
    """One session's share of a draft step."""

    chunk: Any  # speculation.DraftChunk
    draft_ms: float  # the shared step's time
    batch: int  # sessions in the step
    wait_ms: float  # from the request to the step's start (the gather, and a step already running)
    ended: float  # time.perf_counter() when the step ended: the chunk's round trip starts here
    steady_ms: float = 0.0  # mean time of the steps after the first (decode steps, no catch-up); 0 with one step
    catchup_ms: float = 0.0  # this session's share (by tokens fed) of what the first step cost beyond a steady one


class DraftBatcher:
    """Collects draft requests from session coroutines and serves them with one ``draft_batch`` per step.

    The step runs in a worker thread, so the event loop keeps reading replies while the draft device works: a reply
    for a session outside the step reaches it when it arrives, and drafting is never booked as network time (a
    step that holds every live session runs on the loop: nobody else's reply can come). One step at a time;
    requests that come meanwhile form the next one. Before a step it gathers (``_gather``): every
    live session, or the burst of requests that one tick's replies set off.

    The engine needs no lock: while a step runs, the loop only allocates slots for new sessions, rolls back or frees
    the slots of sessions OUTSIDE the step (``apply_result_to_draft``, ``release``). Slot-table engines
    (``engine/slots.py``) keep per-slot state only (``taken[slot]``, ``lengths[slot]``, the slot's KV rows, the
    reference engine's ``seqs[slot]``); a step reads and writes only its own slots, which are taken, so ``allocate``
    never hands them out; each list item write is atomic under the GIL. A session in the step awaits its result and
    cannot touch its slot, except when it is cancelled: ``release`` then defers the free until the step has ended.
    """

    def __init__(self, engine: Any, gather_s: float = 0.002, quiet_s: float = 0.0005) -> None:
        self.engine = engine
        self.gather_s = gather_s
        self.quiet_s = quiet_s
        self.active = 0  # live sessions: the batcher waits (at most gather_s) until all of them have submitted
        self._queue: list[tuple[Any, asyncio.Future, float]] = []
        self._wake = asyncio.Event()
        self._stepping: frozenset[int] = frozenset()  # slots of the step running in the thread
        self._release_after: list[int] = []  # slots released during that step: freed when it ends
        self.steps = 0
        self.rows = 0

    async def draft(self, request: Any) -> Drafted:
        """Draft for one session (``request``: ``speculation.DraftRequest``)."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((request, fut, time.perf_counter()))
        self._wake.set()
        return await fut

    def release(self, slot: int) -> None:
        """Free a session's draft slot; a slot in the running step is freed when the step ends."""
        if slot in self._stepping:
            self._release_after.append(slot)
        else:
            self.engine.free(slot)

    def _step(self, requests: list[Any]) -> tuple[list[Any], float, float, float, float]:
        """The draft step, in a worker thread: (chunks, start, end) in ``time.perf_counter``, the mean ms of its
        forwards after the first, and the first one's ms."""
        from workers.speculation import draft_batch

        device = str(getattr(getattr(self.engine, "info", None), "device", "cpu"))
        steps: list[float] = []
        start = time.perf_counter()
        if device.startswith("cuda"):  # the current CUDA device is per thread: launch on the engine's
            import torch

            with torch.cuda.device(torch.device(device)):
                chunks = draft_batch(self.engine, requests, step_ms=steps)
        else:
            chunks = draft_batch(self.engine, requests, step_ms=steps)
        steady = sum(steps[1:]) / (len(steps) - 1) if len(steps) > 1 else 0.0
        return chunks, start, time.perf_counter(), steady, steps[0] if steps else 0.0

    def _step_inline(self, requests: list[Any]) -> tuple[list[Any], float, float, float, float]:
        """The draft step on the loop, when it holds every live session (no thread handoff to pay)."""
        try:
            return self._step(requests)
        finally:
            self._step_over(None)

    def _step_over(self, _: object) -> None:
        """The thread left the engine (called on the loop, even when ``run`` was cancelled meanwhile)."""
        self._stepping = frozenset()
        freed, self._release_after = self._release_after, []
        for slot in freed:
            self.engine.free(slot)

    async def _gather(self) -> None:
        """Wait until every live session has asked, so they share one step; but stop once the requests stop coming
        (``quiet_s`` without a new one: the burst of replies that woke them is over, the rest are still at the
        target, a tick or more away) and at the latest ``gather_s`` after the first. Each new request wakes this
        (no polling: a timed asyncio wait lasts a millisecond at least, epoll's resolution)."""
        start = last = time.perf_counter()
        for _ in range(3):  # sessions whose replies were just read ask now
            await asyncio.sleep(0)
        n = len(self._queue)
        while n < self.active:
            left = min(start + self.gather_s, last + self.quiet_s) - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await within(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return
            if len(self._queue) > n:
                n, last = len(self._queue), time.perf_counter()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._gather()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            requests = [r for r, _, _ in batch]
            self._stepping = frozenset(r.slot for r in requests)
            try:
                if len(batch) >= self.active:  # every live session is in it: no reply can come meanwhile
                    chunks, start, end, steady, first = self._step_inline(requests)
                else:
                    work = loop.run_in_executor(None, self._step, requests)
                    work.add_done_callback(self._step_over)
                    chunks, start, end, steady, first = await asyncio.shield(work)  # cancelled: the thread ends the step
            except Exception as exc:  # engine error: every requester learns it
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            ms = (end - start) * 1000
            self.steps += 1
            self.rows += len(batch)
            fed = sum(len(r.uncached) for r in requests)
            extra = max(0.0, first - steady) if steady > 0 else 0.0  # one step alone cannot tell catch-up apart
            for (req, fut, asked), chunk in zip(batch, chunks):
                if not fut.done():
                    share = extra * len(req.uncached) / fed if fed else 0.0
                    fut.set_result(Drafted(chunk, ms, len(batch), max(0.0, (start - asked) * 1000), end, steady,
                                           share))


# --------------------------------------------------------------------------- the worker
class DraftWorker:
    """Runs prompts through the broker's targets (see module docstring). ``run`` returns results in prompt order."""

    def __init__(self, config: DraftConfig, engine: Any = None, codec: TextCodec | None = None) -> None:
        self.config = config
        self.codec = codec or TextCodec(config.model)
        self.engine = engine
        self.rows: list[RoundRow] = []
        self.fingerprint = ""
        self.opening = 0  # sessions waiting for their open to be answered (the "N sessions waiting" of overloaded)

    def _load(self, prompts_ids: list[list[int]]) -> None:
        from workers.engine import EngineError, load_engine, tokenizer_fingerprint

        cfg = self.config
        self.fingerprint = tokenizer_fingerprint(cfg.model)
        if self.engine is not None:
            return
        if cfg.threads > 0:
            import torch

            torch.set_num_threads(cfg.threads)
        need = (max((len(p) for p in prompts_ids), default=1) + cfg.max_new_tokens
                + max(cfg.initial_gamma, cfg.max_gamma, cfg.gamma if isinstance(cfg.gamma, int) else 0) + 8)
        slots = max(1, min(cfg.concurrency, len(prompts_ids)))
        try:
            self.engine = load_engine(cfg.model, device=cfg.device, dtype=cfg.dtype, slots=slots, max_context=need,
                                      backend=cfg.backend, grow=cfg.grow)
        except EngineError as exc:
            raise DraftError(f"cannot load draft model {cfg.model}: {exc}") from None
        except (OSError, ValueError) as exc:
            raise DraftError(f"cannot load draft model {cfg.model}: {exc}") from None

    async def run(self, prompts: Sequence[str]) -> list[PromptResult]:
        return await self.run_results([PromptResult(i, p, self.codec.encode(p)) for i, p in enumerate(prompts)])

    async def run_ids(self, prompts_ids: Sequence[Sequence[int]]) -> list[PromptResult]:
        """Like ``run`` for prompts given as token ids (benchmarks that need exact prompt lengths)."""
        results = [PromptResult(i, "", [int(t) for t in ids]) for i, ids in enumerate(prompts_ids)]
        if any(not r.prompt_ids for r in results):
            raise DraftError("every prompt needs at least one token id")
        return await self.run_results(results)

    async def run_results(self, results: list[PromptResult]) -> list[PromptResult]:
        cfg = self.config
        client = make_client(cfg.broker, cfg.link_delay_ms, cfg.timeout, cfg.curve,
                             heartbeat_interval=cfg.heartbeat_interval)
        await client.start()
        batch_task = None
        try:
            await probe_broker(client, cfg.broker, cfg.connect_timeout)  # before the model load: fail fast
            self._load([r.prompt_ids for r in results])
            batcher = DraftBatcher(self.engine, cfg.gather_ms / 1000.0, cfg.gather_quiet_ms / 1000.0)
            batch_task = asyncio.create_task(batcher.run())
            # no more sessions at once than the draft engine has slots (a preloaded engine may have fewer)
            gate = asyncio.Semaphore(max(1, min(cfg.concurrency, self.engine.info.num_slots)))
            run_id = uuid.uuid4().hex[:6]

            async def one(res: PromptResult) -> None:
                async with gate:
                    await self._session(client, batcher, res, f"{run_id}-{res.index}")

            await asyncio.gather(*(one(r) for r in results))
        finally:
            if batch_task is not None:
                batch_task.cancel()
                try:
                    await batch_task
                except (asyncio.CancelledError, Exception):
                    pass
            await client.close()
        for r in results:
            r.text = self.codec.decode(r.token_ids)
        return results

    # ------------------------------------------------------------------ one session
    def _open_msg(self, res: PromptResult, sid: str) -> SessionOpen:
        cfg = self.config
        return SessionOpen(session=sid, prompt_ids=res.prompt_ids + res.token_ids,
                           max_new_tokens=cfg.max_new_tokens - len(res.token_ids), temperature=cfg.temperature,
                           top_p=cfg.top_p, seed=cfg.seed + res.index, tokenizer=self.fingerprint,
                           policy=cfg.policy, queue_timeout_s=cfg.queue_timeout)

    async def _open(self, client: BrokerClient, res: PromptResult, sid: str) -> SessionOpened:
        """Send SessionOpen (prompt + committed tokens) until a target holds the session; its answer.

        The open may wait in the broker's admission queue, or be refused for a while (Busy, a draining broker,
        no target registered yet): it keeps its place or retries until ``queue_timeout`` (the broker learns what is
        left of it with each send, and answers ``overloaded`` when it passes).
        """
        cfg = self.config
        deadline = time.monotonic() + cfg.queue_timeout
        committed = len(res.prompt_ids) + len(res.token_ids)
        self.opening += 1
        try:
            while True:
                try:
                    reply = await client.request(self._open_msg(res, sid), timeout=cfg.timeout, retries=cfg.retries,
                                                 deadline=deadline)
                except TimeoutError:
                    if client.broker_id and not client.broker_silent:  # the broker is there: no slot came
                        raise SessionFailed(E.OVERLOADED, self._overloaded()) from None
                    raise SessionFailed("timeout", f"no answer to session open from {cfg.broker} within "
                                        f"{cfg.queue_timeout:g} s") from None
                if isinstance(reply, SessionOpened):
                    if reply.pos != committed:
                        raise SessionFailed(E.BAD_SEQUENCE, f"target opened at pos {reply.pos}, expected {committed}")
                    return reply
                if isinstance(reply, Reopen) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)  # its target died while opening: place it again
                    continue
                if isinstance(reply, (Busy, Reopen)):  # still refused at the deadline
                    raise SessionFailed(E.OVERLOADED, self._overloaded())
                if isinstance(reply, Error):
                    raise SessionFailed(reply.code, self._error_text(reply))
                raise SessionFailed("bad_reply", f"unexpected {reply.TYPE} to session open")
        finally:
            self.opening -= 1

    def _overloaded(self) -> str:
        return f"{E.OVERLOADED}: no target slot within {self.config.queue_timeout:g} s; {self.opening} sessions waiting"

    def _error_text(self, err: Error) -> str:
        msg = err.message
        if err.code == E.TOKENIZER_MISMATCH and self.fingerprint not in msg:
            msg += f" (draft tokenizer {self.fingerprint or 'unknown'})"
        return f"{err.code}: {msg}"

    async def _session(self, client: BrokerClient, batcher: DraftBatcher, res: PromptResult, sid: str) -> None:
        from workers.adaptive_gamma import AdaptiveGamma
        from workers.sampling import STREAM_DRAFT, SamplingParams, round_generator
        from workers.speculation import DraftChunk, DraftRequest, apply_result_to_draft

        cfg = self.config
        t_start = time.perf_counter()
        if cfg.max_new_tokens <= 0:
            res.finished = True
            return
        sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed + res.index)
        controller = AdaptiveGamma(cfg.max_gamma) if cfg.adaptive_gamma else None
        auto = cfg.gamma == "auto"
        advised = cfg.initial_gamma if auto else int(cfg.gamma)  # auto: what the target said last
        wait_and_path_ms = 0.0  # the last round's cost beyond drafting and verifying: the controller's Verify.path_ms
        slot = self.engine.allocate()
        batcher.active += 1
        opened = False
        try:
            first = await self._open(client, res, sid)
            opened = True
            if auto and first.next_gamma >= 0:  # a fleet that decodes: this session need not draft (nor prefill
                advised = first.next_gamma  # its draft cache) before the target says so
            uncached = list(res.prompt_ids)  # the first draft step prefills the draft cache
            seq = 0
            while not res.finished:
                remaining = cfg.max_new_tokens - len(res.token_ids)
                if remaining <= 0:
                    res.finished = True
                    break
                g = controller.next_gamma() if controller else min(advised, cfg.max_gamma) if auto else advised
                pos = len(res.prompt_ids) + len(res.token_ids)
                if g <= 0:  # decode mode: the target decodes the next tokens itself, the draft cache catches up
                    drafted = Drafted(DraftChunk([]), 0.0, 0, 0.0, time.perf_counter())
                    decode = min(cfg.decode_tokens, remaining)
                else:
                    g, decode = max(1, min(g, remaining - 1)), 0
                    gen = None if sampling.greedy else round_generator(sampling.seed, pos, STREAM_DRAFT)
                    drafted = await batcher.draft(DraftRequest(slot, uncached, g, sampling, gen))
                chunk, draft_ms = drafted.chunk, drafted.draft_ms
                # a step that fed tokens the draft had not seen (prompt, decode output) measures catch-up, not
                # drafting: report what its later steps cost per token instead (none when it had one step)
                catch_up = len(uncached) > 2
                reported = g * drafted.steady_ms if catch_up else draft_ms
                caught = (drafted.catchup_ms, len(uncached) - 1) if catch_up and drafted.catchup_ms > 0 else (0.0, 0)
                reply, seq, rtt_ms = await self._verify(client, res, sid, seq, pos, chunk, decode=decode,
                                                        draft_ms=reported, wait_and_path_ms=wait_and_path_ms,
                                                        catchup=caught)
                trip_ms = (time.perf_counter() - drafted.ended) * 1000  # from the chunk's draft step to its reply
                send_ms = max(0.0, trip_ms - rtt_ms)  # of which before the first send
                if not isinstance(reply, Result):
                    raise SessionFailed("bad_reply", f"unexpected {reply.TYPE} to verify")
                k = reply.accepted
                if not 0 <= k <= max(g, 0):
                    raise SessionFailed(E.BAD_SEQUENCE, f"target accepted {k} of {g} draft tokens")
                if decode and not reply.finished and len(reply.tokens) != decode:
                    raise SessionFailed(E.BAD_SEQUENCE, f"asked the target to decode {decode} tokens, got "
                                        f"{len(reply.tokens)}")
                network_ms = max(0.0, rtt_ms - reply.verify_ms)  # link, broker, loops and the waits at the target
                if g > 0 and res.rounds > 0:  # a decode request spans its k ticks, and the first round waits behind
                    wait_and_path_ms = drafted.wait_ms + network_ms  # every new prompt: neither is a steady round
                if auto and reply.next_gamma >= 0:
                    advised = reply.next_gamma
                res.token_ids += list(reply.tokens)
                if reply.tokens and res.first_token_s is None:
                    res.first_token_s = time.perf_counter() - t_start
                    res.first_batch = len(reply.tokens)
                res.rounds += 1
                res.drafted += max(g, 0)
                res.accepted += k
                res.rejections += int(k < g and not reply.finished)
                res.gammas.append(max(g, 0))
                self.rows.append(RoundRow(
                    res.index, res.rounds, g, k, round(draft_ms, 3), round(network_ms, 3), round(reply.verify_ms, 3),
                    round(reply.queue_ms, 3), drafted.batch, draft_wait_ms=round(drafted.wait_ms, 3),
                    path_ms=round(max(0.0, trip_ms - reply.verify_ms - reply.busy_wait_ms), 3),
                    busy_wait_ms=round(reply.busy_wait_ms, 3), send_ms=round(send_ms, 3)))
                if controller and g > 0:
                    controller.update(k, g)
                if reply.finished or len(res.token_ids) >= cfg.max_new_tokens:
                    res.finished = True
                    break
                if decode:
                    uncached = uncached + [int(t) for t in reply.tokens]
                else:
                    uncached = apply_result_to_draft(self.engine, slot, chunk, k, reply.tokens)
                seq += 1
        except SessionFailed as exc:
            res.error, res.error_code = exc.message, exc.code
            log.warning("session.failed", session=sid, code=exc.code, reason=exc.message)
        except Exception as exc:  # engine or protocol trouble: this session fails, the others go on
            res.error, res.error_code = f"{type(exc).__name__}: {exc}", E.WORKER_ERROR
            log.warning("session.failed", session=sid, error=res.error)
        finally:
            batcher.active -= 1
            batcher.release(slot)  # a slot still in a running draft step (this task was cancelled) is freed after it
            res.wall_s = time.perf_counter() - t_start
            if opened:
                try:
                    await client.send(SessionClose(session=sid))
                except Exception:  # the broker forgets it anyway
                    pass

    async def _verify(self, client: BrokerClient, res: PromptResult, sid: str, seq: int, pos: int,
                      chunk: Any, decode: int = 0, draft_ms: float = 0.0, wait_and_path_ms: float = 0.0,
                      catchup: tuple[float, int] = (0.0, 0)) -> tuple[Message, int, float]:
        """Send a chunk until it is answered; on Reopen re-open and resend it as seq 0. ``wait_and_path_ms``: what
        the last round cost beyond drafting and verifying (its wait for a draft step, its round trip less verify),
        sent as ``Verify.path_ms`` for the goodput controller; ``catchup``: (ms, tokens) of the draft cache's
        catch-up in this chunk's draft step (``Verify.catchup_ms`` / ``catchup_tokens``).

        Returns (reply, the seq it was answered under, round trip ms).
        """
        cfg = self.config
        used_seq = seq
        q = chunk.q_wire()  # packed once: resends reuse it
        for _ in range(cfg.max_reopens + 1):
            msg = Verify(session=sid, seq=used_seq, pos=pos, tokens=list(chunk.tokens), **q, sent_at=time.time(),
                         decode=decode, draft_ms=round(draft_ms, 3), path_ms=round(wait_and_path_ms, 3),
                         catchup_ms=round(catchup[0], 3), catchup_tokens=int(catchup[1]))
            t0 = time.perf_counter()
            try:
                reply = await client.request(msg, timeout=cfg.timeout, retries=cfg.retries,
                                             deadline=time.monotonic() + cfg.queue_timeout)
            except TimeoutError:
                raise SessionFailed("timeout", f"no result for chunk seq {used_seq} from {cfg.broker} within "
                                    f"{cfg.queue_timeout:g} s (resent every {cfg.timeout:g} s)") from None
            rtt_ms = (time.perf_counter() - t0) * 1000
            reopen = isinstance(reply, Reopen) or (isinstance(reply, Error) and reply.code == E.UNKNOWN_SESSION)
            if reopen:
                res.reopens += 1
                log.info("session.reopen", session=sid, committed=len(res.token_ids))
                await self._open(client, res, sid)
                used_seq = 0
                continue
            if isinstance(reply, Busy):  # the target's queue stayed full until the deadline
                raise SessionFailed(E.OVERLOADED, f"{E.OVERLOADED}: chunk seq {used_seq} refused as busy for "
                                    f"{cfg.queue_timeout:g} s ({reply.queue})")
            if isinstance(reply, Error):
                raise SessionFailed(reply.code, self._error_text(reply))
            return reply, used_seq, rtt_ms
        raise SessionFailed("reopen_loop", f"session re-opened {cfg.max_reopens} times without a result")


# --------------------------------------------------------------------------- output
def write_profile(path: str | Path, rows: Sequence[RoundRow]) -> None:
    """Per-round rows as CSV or JSON (by extension): what the simulator and ``bench sim_vs_real`` read."""
    path = Path(path)
    dicts = [{c: getattr(r, c) for c in PROFILE_COLUMNS} for r in rows]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"rounds": dicts}, indent=1))
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PROFILE_COLUMNS)
        w.writeheader()
        w.writerows(dicts)


def run_prompts(config: DraftConfig, prompts: Sequence[str]) -> tuple[list[PromptResult], list[RoundRow]]:
    """Synchronous entry point (CLI, benchmarks)."""
    worker = DraftWorker(config)
    results = asyncio.run(worker.run(prompts))
    return results, worker.rows

"""Whole-generation jobs through the broker's generate queue: send them, stream their tokens, collect results.

``run_jobs`` is the client side of ``specmq generate`` and of the benchmarks' fused rows. ``OrderedStream`` prints
many completions in prompt order: the prompt at the head of the order streams live, later ones are buffered and
flushed when their turn comes. ``JobResult.to_json`` has the same keys as ``specmq draft --json`` (drafted /
accepted / rounds from ``Done.stats``).
"""
from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from workers.draft_worker import DraftError, latency_fields, make_client, probe_broker


@dataclass
class JobResult:
    index: int
    prompt: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stats: dict = field(default_factory=dict)
    finish_reason: str = ""
    wall_s: float = 0.0
    first_token_s: float | None = None  # from sending the job to its first streamed tokens (TTFT)
    first_batch: int = 0  # how many tokens that first delivery held
    error: str | None = None
    error_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        drafted, accepted = int(s.get("drafted", 0)), int(s.get("accepted", 0))
        rounds = int(s.get("rounds", 0))
        n = len(self.token_ids)
        return {
            "index": self.index, "prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
            "new_tokens": n, "drafted": drafted, "accepted": accepted,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0, "rounds": rounds,
            "rejections": int(s.get("rejections", 0)),
            "mean_accepted": round(accepted / rounds, 3) if rounds else 0.0,
            "wall_s": round(self.wall_s, 4), "tokens_per_s": round(n / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            **latency_fields(self.first_token_s, self.wall_s, n, self.first_batch),
            "finish_reason": self.finish_reason, "worker_stats": s, "error": self.error,
            "error_code": self.error_code,
        }


class OrderedStream:
    """Writes pieces of many completions to ``out`` in prompt order: the head streams, the rest wait their turn."""

    def __init__(self, prompts: Sequence[str], out=sys.stdout, enabled: bool = True) -> None:
        self.prompts = list(prompts)
        self.out = out
        self.enabled = enabled
        self.buf = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.head = -1
        self.started = False  # nothing is written before the first piece (a failed start prints no header)

    def _start(self, i: int) -> None:
        first = self.prompts[i].splitlines()[0] if self.prompts[i] else ""
        self._write(f"=== [{i}] {first[:70]}\n{self.prompts[i]}")

    def _write(self, s: str) -> None:
        if self.enabled and s:
            self.out.write(s)
            self.out.flush()

    def _advance(self) -> None:
        while True:
            if self.head >= 0 and not self.done[self.head]:
                return
            self.head += 1
            if self.head >= len(self.prompts):
                return
            self._start(self.head)
            self._write("".join(self.buf[self.head]))
            self.buf[self.head].clear()

    def piece(self, i: int, text: str) -> None:
        if not self.started:
            self.started = True
            self._advance()
        if i == self.head:
            self._write(text)
        else:
            self.buf[i].append(text)

    def finish(self, i: int, footer: str) -> None:
        self.piece(i, footer)
        self.done[i] = True
        self._advance()


async def run_jobs_ids(prompts_ids: Sequence[Sequence[int]], **kw: Any) -> list[JobResult]:
    """``run_jobs`` for prompts given as token ids (benchmarks that need exact prompt lengths)."""
    return await run_jobs([""] * len(prompts_ids), prompts_ids=prompts_ids, **kw)


async def run_jobs(prompts: Sequence[str], *, broker: str, model: str | Path, max_new_tokens: int, gamma: int,
                   temperature: float, top_p: float, seed: int, concurrency: int, timeout: float,
                   connect_timeout: float, stream: OrderedStream | None = None, curve: dict | None = None,
                   prompts_ids: Sequence[Sequence[int]] | None = None, queue_timeout: float = 120.0
                   ) -> list[JobResult]:
    """Send one Generate per prompt (at most ``concurrency`` in flight) and collect the results in order.
    ``prompts_ids``: the prompts as token ids (``prompts`` then only labels the results). ``queue_timeout``: how long
    a job may wait out a full generate queue or a draining or restarting broker (``BrokerClient.generate``)."""
    from protocol.messages import Done, Error, Generate, Tokens
    from workers.tokenizer_text import IncrementalDecoder, TokenizerError, decode, encode, load_tokenizer

    try:
        tok = load_tokenizer(model)
    except TokenizerError as exc:
        raise DraftError(str(exc)) from None
    client = make_client(broker, 0.0, timeout, curve)
    await client.start()
    results = [JobResult(i, p) for i, p in enumerate(prompts)]
    gate = asyncio.Semaphore(max(1, concurrency))
    run_id = uuid.uuid4().hex[:6]

    async def one(r: JobResult) -> None:
        async with gate:
            t0 = time.perf_counter()
            dec = IncrementalDecoder(tok)
            ids = list(prompts_ids[r.index]) if prompts_ids is not None else encode(tok, r.prompt)
            job = Generate(job=f"{run_id}-{r.index}", prompt_ids=ids, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed + r.index, gamma=gamma,
                           queue_timeout_s=queue_timeout)
            try:
                async for msg in client.generate(job, timeout=timeout, queue_timeout=queue_timeout):
                    if isinstance(msg, Tokens):  # a redelivered job streams from the start again: skip seen ones
                        fresh = list(msg.tokens)[max(0, len(r.token_ids) - msg.index):]
                        if msg.index > len(r.token_ids):
                            fresh = []  # a gap should not happen; Done carries every id anyway
                        r.token_ids += fresh
                        if fresh and r.first_token_s is None:
                            r.first_token_s = time.perf_counter() - t0
                            r.first_batch = len(fresh)
                        if stream and fresh:
                            stream.piece(r.index, dec.push(fresh))
                    elif isinstance(msg, Done):
                        r.token_ids = list(msg.token_ids)
                        r.stats, r.finish_reason = dict(msg.stats), msg.finish_reason
                    elif isinstance(msg, Error):
                        r.error, r.error_code = f"{msg.code}: {msg.message}", msg.code
            except TimeoutError as exc:
                r.error, r.error_code = str(exc), "timeout"
            r.wall_s = time.perf_counter() - t0
            r.text = decode(tok, r.token_ids)
            if stream:
                if not dec.ids and r.token_ids:  # the worker did not stream
                    stream.piece(r.index, dec.push(r.token_ids))
                d = r.to_json()
                footer = dec.flush() + (f"\n!!! failed: {r.error}" if r.error else "")
                footer += (f"\n--- {d['new_tokens']} tokens in {d['rounds']} rounds, acceptance "
                           f"{d['acceptance_rate']:.2f} ({d['accepted']}/{d['drafted']}), {d['mean_accepted']:.2f} "
                           f"accepted/round, {d['tokens_per_s']:.1f} tok/s, {d['wall_s']:.2f} s\n")
                stream.finish(r.index, footer)

    try:
        await probe_broker(client, broker, connect_timeout)
        await asyncio.gather(*(one(r) for r in results))
    finally:
        await client.close()
    return results

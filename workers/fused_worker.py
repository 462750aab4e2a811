"""The fused worker: draft and target engines in one process, whole generate jobs, streamed.

It pulls ``Generate`` jobs by credit (one per free job slot) and advances every running job together, one round
at a time: one batched drafting pass over all jobs (``draft_batch``), ONE verify forward for all of them
(``verify_batch``), then the same per-session acceptance and rollback steps the target and draft workers use
over the network (``workers.speculation``). Each round's newly committed tokens go out as ``Tokens`` (with their
text, decoded incrementally); a finished job ends with ``Done`` (the broker's ack). Rounds run in a thread so
heartbeats keep flowing.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from protocol import errors as E
from protocol.messages import Disconnect, Done, Error, Generate, Message, Ready, Tokens
from specmq.logs import get_logger
from workers.acceptance import AcceptanceError, make_policy
from workers.engine.base import Engine, NoFreeSlot
from workers.link import WorkerLink
from workers.sampling import STREAM_DRAFT, SamplingError, SamplingParams, round_generator
from workers.speculation import (FINISH_EOS, FINISH_LENGTH, DraftRequest, TargetSession, apply_result_to_draft,
                                 draft_batch, eos_ids, open_target_session, prefill, verify_batch)
from workers.tokenizer_text import IncrementalDecoder, encode

log = get_logger("fused")

IDLE_WAIT_S = 0.1


@dataclass
class FusedConfig:
    gamma: int = 4  # used when a job asks for gamma <= 0
    max_gamma: int = 16
    prefill_chunk: int = 256
    name: str = "fused"


@dataclass
class Job:
    msg: Generate
    prompt: list[int]
    gamma: int
    params: SamplingParams
    policy: object
    decoder: IncrementalDecoder
    started: float
    target: TargetSession | None = None
    draft_slot: int = -1
    uncached: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    finish_reason: str = FINISH_LENGTH
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.target is not None and self.target.finished


class FusedServer:
    def __init__(self, draft: Engine, target: Engine, tokenizer, config: FusedConfig | None = None) -> None:
        self.draft, self.target, self.tokenizer = draft, target, tokenizer
        self.config = config or FusedConfig()
        self.eos = eos_ids(target.info)
        self.capacity = min(draft.info.num_slots, target.info.num_slots)
        self.jobs: dict[str, Job] = {}
        self.counters = {"jobs": 0, "rounds": 0, "drafted": 0, "accepted": 0, "errors": 0, "tokens": 0, "rows": 0}
        self.round_ms = 0.0

    # ------------------------------------------------------------------ jobs in
    def check(self, msg: Generate) -> Job | Error:
        """Validate a job (on the loop, cheap) into a ``Job`` waiting for its prefill, or an ``Error``."""
        def err(code: str, text: str) -> Error:
            self.counters["errors"] += 1
            return Error(code=code, message=text, job=msg.job)

        if msg.job in self.jobs:
            return err(E.BAD_REQUEST, f"job {msg.job!r} is already running here")
        try:
            ids = list(msg.prompt_ids) if msg.prompt_ids is not None else encode(self.tokenizer, msg.prompt)
        except Exception as exc:  # tokenizers refuses odd input
            return err(E.BAD_REQUEST, f"cannot tokenize the prompt: {exc}")
        if not ids:
            return err(E.BAD_REQUEST, "empty prompt (give prompt text or prompt_ids)")
        vocab = min(self.target.info.vocab_size, self.draft.info.vocab_size)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            return err(E.TOKEN_OUT_OF_RANGE, f"prompt_ids holds {bad}, outside [0, {vocab})")
        if msg.max_new_tokens < 1:
            return err(E.BAD_REQUEST, f"max_new_tokens must be >= 1, got {msg.max_new_tokens}")
        ctx = min(self.target.info.max_context, self.draft.info.max_context)
        if len(ids) + msg.max_new_tokens > ctx:
            return err(E.CONTEXT_TOO_LONG, f"prompt {len(ids)} + max_new_tokens {msg.max_new_tokens} > "
                       f"max_context {ctx}")
        gamma = msg.gamma if msg.gamma > 0 else self.config.gamma
        if gamma > self.config.max_gamma:
            return err(E.GAMMA_TOO_LARGE, f"gamma {gamma} > max_gamma {self.config.max_gamma}")
        try:
            params = SamplingParams(temperature=msg.temperature, top_p=msg.top_p, seed=msg.seed)
            policy = make_policy(msg.policy, msg.policy_args)
        except (SamplingError, AcceptanceError, TypeError) as exc:
            return err(E.BAD_REQUEST, str(exc))
        return Job(msg, ids, gamma, params, policy, IncrementalDecoder(self.tokenizer), time.perf_counter())

    def admit(self, job: Job) -> None:
        """Allocate both slots and prefill both caches (in the round thread). Raises on failure, slots freed."""
        ds = self.draft.allocate()
        try:
            job.target = open_target_session(self.target, job.msg.job, job.prompt, job.msg.max_new_tokens,
                                             job.params, job.policy, chunk=self.config.prefill_chunk)
        except BaseException:
            self.draft.free(ds)
            raise
        job.draft_slot = ds
        try:
            job.uncached = [prefill(self.draft, ds, job.prompt, self.config.prefill_chunk)]
        except BaseException:
            self.release(job)
            raise

    def release(self, job: Job) -> None:
        if job.target is not None:
            self.target.free(job.target.slot)
        if job.draft_slot >= 0:
            self.draft.free(job.draft_slot)
        job.draft_slot = -1

    # ------------------------------------------------------------------ one round (thread)
    def step(self, new: list[Job]) -> list[tuple[Job, list[int]]]:
        """Admit ``new`` jobs, then one speculative round over every running job: [(job, new tokens)]."""
        for job in new:
            try:
                self.admit(job)
                self.jobs[job.msg.job] = job
            except (NoFreeSlot, Exception) as exc:
                job.error = f"{type(exc).__name__}: {exc}"
        live = [j for j in self.jobs.values() if not j.done]
        if not live:
            return [(j, []) for j in new if j.error]
        t0 = time.perf_counter()
        gammas = [max(1, min(j.gamma, j.target.max_new_tokens - j.target.generated - 1)) for j in live]
        requests = [DraftRequest(j.draft_slot, j.uncached, g, j.params,
                                 None if j.params.greedy else round_generator(j.params.seed, j.target.pos,
                                                                              STREAM_DRAFT))
                    for j, g in zip(live, gammas)]
        chunks = draft_batch(self.draft, requests)
        outcomes = verify_batch(self.target, [j.target.verify_item(c.tokens, c.q_ids, c.q_probs)
                                              for j, c in zip(live, chunks)])
        out = [(j, []) for j in new if j.error]
        for j, c, o, g in zip(live, chunks, outcomes, gammas):
            if o.error:
                j.error = o.error
                out.append((j, []))
                continue
            j.uncached = apply_result_to_draft(self.draft, j.draft_slot, c, o.accepted, o.tokens)
            fresh = j.target.apply(o, self.eos)
            j.tokens += fresh
            j.rounds += 1
            j.drafted += g
            j.accepted += o.accepted
            j.rejections += int(o.accepted < g and not j.target.finished)
            if j.target.finished:
                j.finish_reason = FINISH_EOS if fresh and fresh[-1] in self.eos else FINISH_LENGTH
            out.append((j, fresh))
        self.counters["rounds"] += 1
        self.counters["rows"] += len(live)
        self.counters["drafted"] += sum(gammas)
        self.counters["accepted"] += sum(o.accepted for o in outcomes)
        ms = (time.perf_counter() - t0) * 1000.0
        self.round_ms = ms if self.counters["rounds"] == 1 else 0.8 * self.round_ms + 0.2 * ms
        return out

    # ------------------------------------------------------------------ answers (loop)
    def answer(self, progress: list[tuple[Job, list[int]]]) -> tuple[list[Message], int]:
        """Tokens / Done / Error for one round's progress, and how many jobs ended (credits to give back)."""
        out: list[Message] = []
        ended = 0
        for j, fresh in progress:
            jid = j.msg.job
            if j.error:
                self.counters["errors"] += 1
                self.jobs.pop(jid, None)
                self.release(j)
                out.append(Error(code=E.WORKER_ERROR, message=j.error, job=jid))
                ended += 1
                continue
            index = len(j.tokens) - len(fresh)
            text = j.decoder.push(fresh) if fresh else ""
            if j.done:
                text += j.decoder.flush()
            if j.msg.stream and (fresh or text):
                out.append(Tokens(job=jid, tokens=fresh, text=text, index=index))
            if j.done:
                self.jobs.pop(jid, None)
                self.release(j)
                wall = time.perf_counter() - j.started
                self.counters["jobs"] += 1
                self.counters["tokens"] += len(j.tokens)
                out.append(Done(job=jid, token_ids=j.tokens, text=j.decoder.text, finish_reason=j.finish_reason,
                                stats={"drafted": j.drafted, "accepted": j.accepted, "rounds": j.rounds, "rejections": j.rejections,
                                       "acceptance_rate": round(j.accepted / j.drafted, 4) if j.drafted else 0.0,
                                       "prompt_tokens": len(j.prompt), "new_tokens": len(j.tokens),
                                       "gamma": j.gamma, "wall_s": round(wall, 4),
                                       "tokens_per_s": round(len(j.tokens) / wall, 2) if wall > 0 else 0.0,
                                       "delivery": j.msg.delivery, "worker": self.config.name}))
                ended += 1
        return out, ended

    def reset(self) -> None:
        for j in list(self.jobs.values()):
            self.release(j)
        self.jobs.clear()

    def stats(self) -> dict:
        c = self.counters
        return {"jobs_running": len(self.jobs), "slots_used": len(self.jobs), "slots_total": self.capacity,
                "jobs_done": c["jobs"], "rounds": c["rounds"], "drafted": c["drafted"], "accepted": c["accepted"],
                "tick_ms": round(self.round_ms, 3), "tokens": c["tokens"], "errors": c["errors"],
                # a round is the fused worker's tick: one batched draft + one batched verify over every running job
                "ticks": c["rounds"], "rows": c["rows"],
                "mean_batch": round(c["rows"] / c["rounds"], 3) if c["rounds"] else 0.0}


def ready_message(server: FusedServer) -> Ready:
    info = server.target.info
    return Ready(kind="fused", model=info.model_id, capacity=server.capacity, vocab_size=info.vocab_size,
                 tokenizer=info.tokenizer_fingerprint, max_gamma=server.config.max_gamma,
                 max_context=info.max_context, worker=server.config.name)


async def _send_all(link: WorkerLink, replies: list[Message]) -> None:
    for r in replies:
        if not link.send_nowait(r):
            await link.send(r)


async def serve_fused(broker: str, draft: Engine, target: Engine, tokenizer, config: FusedConfig | None = None, *,
                      stop: asyncio.Event | None = None, heartbeat_interval: float = 1.0, liveness: int = 3,
                      on_server=None) -> None:
    """Serve generate jobs until ``stop`` is set; Disconnect on the way out."""
    server = FusedServer(draft, target, tokenizer, config)
    if on_server is not None:
        on_server(server)
    stop = stop or asyncio.Event()
    link = WorkerLink(broker, ready_message(server), heartbeat_interval=heartbeat_interval, liveness=liveness,
                      stats=server.stats, initial_credit=server.capacity)
    log.info("fused.serving", broker=broker, target=target.info.model_id, draft=draft.info.model_id,
             jobs=server.capacity, device=target.info.device, gamma=server.config.gamma)
    async with link:
        while not stop.is_set():
            msgs = await link.recv_batch(timeout=0.0 if server.jobs else IDLE_WAIT_S)
            new: list[Job] = []
            replies: list[Message] = []
            ended = 0
            for m in msgs:
                if isinstance(m, Disconnect):  # re-registered: the broker redelivers our jobs elsewhere
                    server.reset()
                    new.clear()
                elif isinstance(m, Generate):
                    job = server.check(m)
                    if isinstance(job, Error):
                        replies.append(job)
                        ended += 1
                    else:
                        new.append(job)
            await _send_all(link, replies)
            if new or server.jobs:
                progress = await asyncio.to_thread(server.step, new)
                answers, n = server.answer(progress)
                await _send_all(link, answers)
                ended += n
            link.grant(ended)
    log.info("fused.stopped", **server.stats())

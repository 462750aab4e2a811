"""The fused worker: draft and target engines in one process, whole generate jobs, streamed.

It pulls ``Generate`` jobs by credit (one per free job slot) and runs ticks: each tick is planned by the target's
batching policy (``speculation.plan_round`` over ``batching.plan_tick``: running jobs' rounds first, then new jobs'
prompts prefilled ``prefill_chunk`` tokens at a time in the leftover ``max_batch_tokens`` / ``max_batch_rows``
budget) and run by ``speculation.run_round``: one batched drafting pass, ONE target forward for every round and
prefill chunk, the shared acceptance and rollback steps. ``speculative_generate_many`` runs the same two calls, so
its lossless tests cover this code. A long prompt therefore never stalls the running jobs for more than one chunk.

γ per round comes from a ``GammaPolicy``: each job's own γ (``FixedGamma``), or with ``adaptive_gamma`` an
``AdaptiveGamma`` per job from its acceptance rate (1..``max_gamma``). ``tick_ms``: an idle worker that receives a
job waits at most this long for more jobs to share its first tick (``batching.tick_due``; 0: start at once).
Each round's newly committed tokens go out as ``Tokens`` (with their text, decoded incrementally); a finished job
ends with ``Done`` (the broker's ack). Ticks run in a thread so heartbeats keep flowing.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from protocol import errors as E
from protocol.messages import (HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, Cancel, Disconnect, Done, Error, Generate,
                               Message, Ready, Tokens)
from workers.acceptance import AcceptanceError, make_policy
from workers.batching import BatchLimits, tick_due
from workers.engine.base import Engine
from workers.link import WorkerLink
from workers.sampling import SamplingError, SamplingParams
from workers.speculation import (AdaptiveGammaPolicy, FixedGamma, FusedSession, GammaPolicy, RoundPlan,
                                 close_fused_session, eos_ids, next_order, open_fused_session, plan_round, run_round)
from workers.tokenizer_text import IncrementalDecoder, encode

log = structlog.get_logger("fused")

IDLE_WAIT_S = 0.1


@dataclass
class FusedConfig:
    gamma: int = 4  # used when a job asks for gamma <= 0
    max_gamma: int = 16  # largest γ a job may ask for; ceiling of adaptive γ
    adaptive_gamma: bool = False  # choose every job's γ each round from its acceptance (AdaptiveGamma), not the job's
    auto: bool = False  # choose every job's γ each tick with the goodput controller (workers/goodput.py)
    cost_table: str | None = None  # the controller's step-cost table (target and draft grids); None: fitted online
    tpot_slo_ms: float | None = None  # the controller keeps predicted TPOT under this
    auto_max_gamma: int = 8  # the largest γ the controller proposes
    prefill_chunk: int = 256  # prompt tokens of one job per tick (chunked prefill)
    max_batch_tokens: int = 512  # target forward tokens per tick (rounds + prefill chunks)
    max_batch_rows: int = 64  # target forward rows per tick
    tick_ms: float = 0.0  # longest an idle worker's first job waits for company
    name: str = "fused"

    @property
    def limits(self) -> BatchLimits:
        return BatchLimits(max_batch_tokens=self.max_batch_tokens, max_batch_rows=self.max_batch_rows,
                           prefill_chunk=self.prefill_chunk, tick_ms=self.tick_ms)


def make_gamma_policy(config: FusedConfig) -> GammaPolicy:
    if config.auto:
        from workers.goodput import fused_policy

        return fused_policy(config.cost_table, min(config.auto_max_gamma, config.max_gamma),
                            config.tpot_slo_ms)  # type: ignore[return-value]
    if config.adaptive_gamma:
        return AdaptiveGammaPolicy(config.max_gamma)
    return FixedGamma(config.gamma)


@dataclass
class Job:
    msg: Generate
    prompt: list[int]
    gamma: int
    params: SamplingParams
    policy: object
    decoder: IncrementalDecoder
    started: float  # time.perf_counter() when it arrived
    run: FusedSession | None = None  # once admitted: both slots, prefill progress, tokens, counters
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.run is not None and self.run.target.finished

    @property
    def tokens(self) -> list[int]:
        return self.run.result.tokens if self.run is not None else []


class FusedServer:
    """The worker's state, free of sockets so tests drive it directly: ``check`` a job, queue it on ``waiting``,
    ``step`` (a thread) admits and runs one tick, ``answer`` turns its progress into messages."""

    def __init__(self, draft: Engine, target: Engine, tokenizer, config: FusedConfig | None = None,
                 gamma_policy: GammaPolicy | None = None) -> None:
        self.draft, self.target, self.tokenizer = draft, target, tokenizer
        self.config = config or FusedConfig()
        self.limits = self.config.limits
        self.gamma_policy = gamma_policy or make_gamma_policy(self.config)
        self.eos = eos_ids(target.info)
        self.capacity = min(draft.info.num_slots, target.info.num_slots)
        self.jobs: dict[str, Job] = {}  # admitted, in round-robin order (a job that had a round goes last)
        self.waiting: list[Job] = []  # checked, not admitted yet (the next tick takes them)
        self.counters = {"jobs": 0, "ticks": 0, "rounds": 0, "prefill_rows": 0, "prefill_tokens": 0, "drafted": 0,
                         "accepted": 0, "errors": 0, "tokens": 0, "rows": 0, "cancelled": 0, "busy_ms": 0.0}
        self.tick_ms = 0.0
        self.last_rows = 0
        self.last_tokens = 0

    @property
    def chooses_gamma(self) -> bool:
        """Does the worker choose every job's γ (adaptive or goodput) instead of taking the job's own?"""
        return self.config.adaptive_gamma or self.config.auto

    # ------------------------------------------------------------------ jobs in
    def check(self, msg: Generate) -> Job | Error:
        """Validate a job (on the loop, cheap) into a ``Job`` waiting for its prefill, or an ``Error``."""
        def err(code: str, text: str) -> Error:
            self.counters["errors"] += 1
            return Error(code=code, message=text, job=msg.job, incarnation=msg.incarnation)

        if msg.job in self.jobs or any(j.msg.job == msg.job for j in self.waiting):
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
        """Allocate both slots (the prompt is prefilled tick by tick). Raises ``NoFreeSlot``; nothing is held then."""
        job.run = open_fused_session(self.draft, self.target, job.msg.job, job.prompt, job.msg.max_new_tokens,
                                     job.params, job.policy, gamma=None if self.chooses_gamma else job.gamma)
        self.jobs[job.msg.job] = job

    def cancel(self, jid: str) -> bool:
        """Drop a job nobody waits for (``Cancel``) and free its slots; True when it was here (one credit back)."""
        job = next((j for j in self.waiting if j.msg.job == jid), None)
        if job is not None:
            self.waiting.remove(job)
        else:
            job = self.jobs.pop(jid, None)
            if job is None:
                return False  # over already: its Done or Error went out and returned the credit
            self.release(job)
        self.counters["cancelled"] += 1
        return True

    def release(self, job: Job) -> None:
        if job.run is not None:
            close_fused_session(self.draft, self.target, job.run)
            self.gamma_policy.forget(job.run)

    # ------------------------------------------------------------------ when to tick (loop)
    def running(self) -> int:
        return sum(1 for j in self.jobs.values() if not j.done)

    def due(self, now: float) -> bool:
        """Run a tick now? Running jobs always have a round to run; new jobs on an idle worker wait up to
        ``tick_ms`` for company (``tick_due``), unless they fill every slot or the token budget."""
        running = self.running()
        if not running and not self.waiting:
            return False
        if len(self.jobs) + len(self.waiting) >= self.capacity:
            return True
        oldest = min((j.started for j in self.waiting), default=now)
        tokens = running + sum(len(j.prompt) - 1 for j in self.waiting)
        return tick_due(now, oldest, tokens, running + len(self.waiting), self.limits, active_rows=running)

    def wait_s(self, now: float) -> float:
        """How long the loop may wait for messages before the next tick is due."""
        if self.due(now):
            return 0.0
        if not self.waiting:
            return IDLE_WAIT_S
        oldest = min(j.started for j in self.waiting)
        return min(IDLE_WAIT_S, max(0.0, oldest + self.limits.tick_ms / 1000.0 - now))

    def take_waiting(self) -> list[Job]:
        new, self.waiting = self.waiting, []
        return new

    # ------------------------------------------------------------------ one tick (thread)
    def step(self, new: list[Job]) -> list[tuple[Job, list[int]]]:
        """Admit ``new`` jobs, then one tick (``plan_round`` + ``run_round``): rounds for running jobs, prompt
        chunks for new ones. Returns [(job, newly committed tokens)] for the jobs that had a round or failed."""
        out: list[tuple[Job, list[int]]] = []
        for job in new:
            try:
                self.admit(job)
            except Exception as exc:  # NoFreeSlot, or anything an engine raises
                job.error = f"{type(exc).__name__}: {exc}"
                out.append((job, []))
        plan = plan_round([j.run for j in self.jobs.values()], self.gamma_policy, self.limits)
        if not plan:
            return out
        accepted = sum(s.result.accepted for s, _ in plan.rounds)
        t0 = time.perf_counter()
        try:
            fresh = run_round(self.draft, self.target, plan, self.gamma_policy, self.eos)
        except Exception as exc:  # the caches of every job in the tick are unknown now: end those jobs
            log.error("tick.failed", error=repr(exc), rows=plan.rows)
            for s in [s for s, _ in plan.rounds] + [s for s, _ in plan.prefills]:
                job = self.jobs[s.key]
                job.error = f"{type(exc).__name__}: {exc}"
                out.append((job, []))
            return out
        ms = (time.perf_counter() - t0) * 1000.0
        for (s, _), tokens in zip(plan.rounds, fresh):
            job = self.jobs[s.key]
            job.error = job.error or s.error
            out.append((job, tokens))
        order = next_order([j.run for j in self.jobs.values()], plan)
        self.jobs = {s.key: self.jobs[s.key] for s in order} | {k: j for k, j in self.jobs.items() if j.run.done}
        self.count_tick(plan, ms, sum(s.result.accepted for s, _ in plan.rounds) - accepted)
        return out

    def count_tick(self, plan: RoundPlan, ms: float, accepted: int) -> None:
        c = self.counters
        c["ticks"] += 1
        c["rounds"] += len(plan.rounds)
        c["prefill_rows"] += len(plan.prefills)
        c["prefill_tokens"] += sum(n for _, n in plan.prefills)
        c["rows"] += plan.rows
        c["busy_ms"] += ms  # the tick's drafting and verify forwards: the device's busy fraction over a window
        c["drafted"] += sum(g for _, g in plan.rounds)
        c["accepted"] += accepted
        self.last_rows, self.last_tokens = plan.rows, plan.tokens
        self.tick_ms = ms if c["ticks"] == 1 else 0.8 * self.tick_ms + 0.2 * ms
        sessions = [s for s, _ in plan.rounds] + [s for s, _ in plan.prefills]
        context = sum(s.target.pos for s in sessions) / len(sessions)
        self.gamma_policy.observe_tick(plan.rows, plan.tokens, context, ms)

    # ------------------------------------------------------------------ answers (loop)
    def answer(self, progress: list[tuple[Job, list[int]]]) -> tuple[list[Message], int]:
        """Tokens / Done / Error for one tick's progress, and how many jobs ended (credits to give back). Each echoes
        its job's ``incarnation``: the broker drops them if the link re-registered while the tick ran."""
        out: list[Message] = []
        ended = 0
        for j, fresh in progress:
            jid = j.msg.job
            if j.error:
                self.counters["errors"] += 1
                self.jobs.pop(jid, None)
                self.release(j)
                out.append(Error(code=E.WORKER_ERROR, message=j.error, job=jid, incarnation=j.msg.incarnation))
                ended += 1
                continue
            index = len(j.tokens) - len(fresh)
            text = j.decoder.push(fresh) if fresh else ""
            if j.done:
                text += j.decoder.flush()
            if j.msg.stream and (fresh or text):
                out.append(Tokens(job=jid, tokens=fresh, text=text, index=index, incarnation=j.msg.incarnation))
            if j.done:
                self.jobs.pop(jid, None)
                self.release(j)
                wall = time.perf_counter() - j.started
                self.counters["jobs"] += 1
                self.counters["tokens"] += len(j.tokens)
                r = j.run.result
                out.append(Done(job=jid, token_ids=j.tokens, text=j.decoder.text, finish_reason=r.finish_reason,
                                stats={"drafted": r.drafted, "accepted": r.accepted, "rounds": r.rounds,
                                       "rejections": j.run.rejections,
                                       "acceptance_rate": round(r.accepted / r.drafted, 4) if r.drafted else 0.0,
                                       "prompt_tokens": len(j.prompt), "new_tokens": len(j.tokens),
                                       "gamma": "auto" if j.run.gamma is None else j.gamma,
                                       "mean_gamma": round(r.drafted / r.rounds, 3) if r.rounds else 0.0,
                                       "wall_s": round(wall, 4),
                                       "tokens_per_s": round(len(j.tokens) / wall, 2) if wall > 0 else 0.0,
                                       "delivery": j.msg.delivery, "worker": self.config.name},
                                incarnation=j.msg.incarnation))
                ended += 1
        return out, ended

    def reset(self) -> None:
        for j in list(self.jobs.values()):
            self.release(j)
        self.jobs.clear()
        self.waiting.clear()

    def stats(self) -> dict:
        c = self.counters
        # a tick: one batched draft pass + ONE target forward; its rows are job rounds plus prompt chunks
        return {"jobs_running": len(self.jobs), "slots_used": len(self.jobs), "slots_total": self.capacity,
                "jobs_waiting": len(self.waiting), "jobs_done": c["jobs"], "rounds": c["rounds"],
                "drafted": c["drafted"], "accepted": c["accepted"], "tick_ms": round(self.tick_ms, 3),
                "tokens": c["tokens"], "errors": c["errors"], "jobs_cancelled": c["cancelled"], "ticks": c["ticks"],
                "rows": c["rows"], "busy_ms": round(c["busy_ms"], 3),
                **(self.gamma_policy.controller.stats() if hasattr(self.gamma_policy, "controller") else {}),
                "prefill_rows": c["prefill_rows"], "prefill_tokens": c["prefill_tokens"],
                "batch_rows": self.last_rows, "batch_tokens": self.last_tokens,
                "mean_batch": round(c["rows"] / c["ticks"], 3) if c["ticks"] else 0.0}


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
                      stop: asyncio.Event | None = None, heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
                      liveness: int = HEARTBEAT_LIVENESS, on_server=None) -> None:
    """Serve generate jobs until ``stop`` is set; Disconnect on the way out."""
    server = FusedServer(draft, target, tokenizer, config)
    if on_server is not None:
        on_server(server)
    stop = stop or asyncio.Event()
    link = WorkerLink(broker, ready_message(server), heartbeat_interval=heartbeat_interval, liveness=liveness,
                      stats=server.stats, initial_credit=server.capacity)
    cfg = server.config
    log.info("fused.serving", broker=broker, target=target.info.model_id, draft=draft.info.model_id,
             jobs=server.capacity, device=target.info.device, gamma="auto" if server.chooses_gamma else cfg.gamma,
             prefill_chunk=cfg.prefill_chunk, max_batch_tokens=cfg.max_batch_tokens, tick_ms=cfg.tick_ms)
    async with link:
        while not stop.is_set():
            msgs = await link.recv_batch(timeout=server.wait_s(time.perf_counter()))
            replies: list[Message] = []
            ended = 0
            for m in msgs:
                if isinstance(m, Disconnect):  # re-registered: the broker redelivers our jobs elsewhere
                    server.reset()
                elif isinstance(m, Generate):
                    job = server.check(m)
                    if isinstance(job, Error):
                        replies.append(job)
                        ended += 1
                    else:
                        server.waiting.append(job)
                elif isinstance(m, Cancel):
                    ended += int(server.cancel(m.job))
            await _send_all(link, replies)
            if server.due(time.perf_counter()):
                progress = await asyncio.to_thread(server.step, server.take_waiting())
                answers, n = server.answer(progress)
                await _send_all(link, answers)
                ended += n
            link.grant(ended)
    log.info("fused.stopped", **server.stats())

"""A fused worker: draft and target models in one process, pulling whole jobs from the generate queue.

Continuous batching: each step it tops up its jobs from the queue (credit = free slots), plans the step with the
same ``plan_tick`` as targets (decoding jobs verify γ+1 tokens, new jobs prefill in chunks), and prices it as γ
draft steps for the decoding rows plus one target forward. No network inside; the client's link adds delay to
what the client sees (first token, last token).
"""
from __future__ import annotations

import random

import simpy

from simulator.costs import CostModel
from simulator.entities.generate_queue import GenerateQueue
from simulator.entities.links import Link
from simulator.metrics import Metrics
from workers.batching import BatchLimits, plan_tick


class Job:
    __slots__ = ("req", "prefill_left", "context", "committed", "acceptance")

    def __init__(self, req, acceptance) -> None:
        self.req, self.acceptance = req, acceptance
        self.prefill_left = req.prompt_tokens
        self.context = 0
        self.committed = 0


class FusedWorker:
    def __init__(self, env: simpy.Environment, name: str, queue: GenerateQueue, limits: BatchLimits, slots: int,
                 gamma: int, cost: CostModel, rng: random.Random, metrics: Metrics, client_link: Link,
                 acceptance_for) -> None:
        self.env, self.name, self.queue, self.limits, self.slots = env, name, queue, limits, slots
        self.gamma, self.cost, self.rng, self.metrics = gamma, cost, rng, metrics
        self.stats = metrics.worker(name, limits.max_batch_rows, limits.max_batch_tokens)
        self.link = client_link
        self.acceptance_for = acceptance_for
        self.jobs: list[Job] = []
        self.wake: simpy.Event | None = None
        self.proc = env.process(self.run())

    def poke(self) -> None:
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def run(self):
        env, m, st, g = self.env, self.metrics, self.stats, self.gamma
        while True:
            while len(self.jobs) < self.slots and self.queue.jobs:
                self.jobs.append(Job(self.queue.jobs.popleft(), self.acceptance_for("fused", self.name)))
                st.sessions += 1
            if not self.jobs:
                self.wake = env.event()
                self.queue.idle.append(self)
                yield self.wake
                continue
            decoding = [(j, g + 1) for j in self.jobs if j.prefill_left <= 0]
            prefilling = [(j, j.prefill_left) for j in self.jobs if j.prefill_left > 0]
            plan = plan_tick(decoding, prefilling, self.limits)
            tokens = ctx = 0
            for j in plan.verify:
                tokens += g + 1
                ctx += j.context
            for j, take in plan.prefill:
                tokens += take
                ctx += j.context
            rows = plan.rows
            ms = self.cost.verify_ms(rows, tokens, ctx / rows)
            if plan.verify:
                ms += g * self.cost.draft_step_ms(len(plan.verify), ctx / rows)
            start = env.now
            if m.start <= start <= m.end:
                st.ticks += 1
                st.rows += rows
                st.tokens += tokens
                st.busy_s += ms / 1000.0
            yield env.timeout(ms / 1000.0)
            now = env.now
            finished = False
            for j in plan.verify:
                k = j.acceptance.draw(g, self.rng)
                m.rounds += 1
                m.accepted += k
                m.drafted += g
                n = min(k + 1, j.req.output_tokens - j.committed)
                j.committed += n
                j.context += n
                j.req.committed = j.committed
                j.req.rounds += 1
                m.tokens(now, n)
                finished |= j.committed >= j.req.output_tokens
            for j, take in plan.prefill:
                j.prefill_left -= take
                j.context += take
                if j.prefill_left <= 0:
                    j.committed = j.req.committed = 1
                    j.req.first_token = now + self.link.delay(64, self.rng)
                    m.tokens(now, 1)
                    finished |= j.committed >= j.req.output_tokens
            if finished:
                keep = []
                for j in self.jobs:
                    if j.committed >= j.req.output_tokens:
                        j.req.finished = max(j.req.first_token, now + self.link.delay(64, self.rng))
                    else:
                        keep.append(j)
                self.jobs = keep

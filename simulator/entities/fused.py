"""A fused worker: draft and target models in one process, pulling whole jobs from the generate queue.

It models ``workers.fused_worker.FusedServer`` step for step. Jobs arrive by credit (free slots); an idle worker
waits for company as long as ``FusedServer.due`` says (``tick_due`` over the waiting jobs, at most ``tick_ms``).
Each tick is planned with the same ``plan_tick`` call as ``speculation.plan_round``: running jobs in round-robin
order ask for γ+1 tokens (γ clipped to what the job still needs, as ``round_gamma`` does), jobs still prefilling
ask for their remaining prompt tokens but the last (the pending token is never cached). A prefill chunk rides in
the tick's first draft forward and in its target forward; the first tokens come from the job's first round. The
tick costs its draft forwards (as many as the largest γ, each over the rounds still drafting) plus one target
forward. No network inside; the client's link adds delay to what the client sees (first token, last token).
"""
from __future__ import annotations

import random

import simpy

from simulator.costs import CostModel
from simulator.entities.generate_queue import GenerateQueue
from simulator.entities.links import Link
from simulator.metrics import Metrics
from workers.batching import BatchLimits, plan_tick, tick_due

EPS = 1e-9


class Job:
    __slots__ = ("req", "prefill_left", "context", "committed", "acceptance", "arrived")

    def __init__(self, req, acceptance, arrived: float) -> None:
        self.req, self.acceptance, self.arrived = req, acceptance, arrived
        self.prefill_left = max(0, req.prompt_tokens - 1)  # prompt[:-1]: the last prompt token is the pending one
        self.context = 0
        self.committed = 0

    def gamma(self, g: int) -> int:
        """``speculation.round_gamma``: at least 1, no more than the job still needs."""
        return max(1, min(g, self.req.output_tokens - self.committed - 1))


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

    def due(self, waiting: list[Job]) -> bool:
        """``FusedServer.due``: running jobs never wait; new jobs on an idle worker wait for company."""
        running = len(self.jobs)
        if not running and not waiting:
            return False
        if running + len(waiting) >= self.slots:
            return True
        oldest = min((j.arrived for j in waiting), default=self.env.now)
        tokens = running + sum(j.prefill_left for j in waiting)
        return tick_due(self.env.now + EPS, oldest, tokens, running + len(waiting), self.limits, active_rows=running)

    def run(self):
        env, m, st = self.env, self.metrics, self.stats
        waiting: list[Job] = []
        while True:
            while len(self.jobs) + len(waiting) < self.slots and self.queue.jobs:
                waiting.append(Job(self.queue.jobs.popleft(), self.acceptance_for("fused", self.name), env.now))
            if not self.due(waiting):
                self.wake = env.event()
                self.queue.idle.append(self)
                if waiting:  # wait for company, at most until the oldest has waited tick_ms
                    left = min(j.arrived for j in waiting) + self.limits.tick_ms / 1000.0 - env.now
                    yield env.any_of([self.wake, env.timeout(max(0.0, left))])
                else:
                    yield self.wake
                if self in self.queue.idle:
                    self.queue.idle.remove(self)
                continue
            st.sessions += len(waiting)
            self.jobs += waiting
            waiting = []
            gammas = {j: j.gamma(self.gamma) for j in self.jobs if j.prefill_left <= 0}
            plan = plan_tick([(j, g + 1) for j, g in gammas.items()],
                             [(j, j.prefill_left) for j in self.jobs if j.prefill_left > 0], self.limits)
            rounds = [(j, gammas[j]) for j in plan.verify]
            tokens = sum(g + 1 for _, g in rounds) + sum(take for _, take in plan.prefill)
            rows = plan.rows
            ctx = (sum(j.context for j, _ in rounds) + sum(j.context for j, _ in plan.prefill)) / rows
            ms = self.cost.verify_ms(rows, tokens, ctx)
            drafting = [g for _, g in rounds]
            for step in range(max(drafting, default=1 if plan.prefill else 0)):  # draft_batch's forwards
                batch = sum(1 for g in drafting if g > step) + (len(plan.prefill) if step == 0 else 0)
                ms += self.cost.draft_step_ms(batch, ctx)
            start = env.now
            if m.start <= start <= m.end:
                st.ticks += 1
                st.rows += rows
                st.tokens += tokens
                st.busy_s += ms / 1000.0
            yield env.timeout(ms / 1000.0)
            now = env.now
            for j, g in rounds:
                k = j.acceptance.draw(g, self.rng)
                m.rounds += 1
                m.accepted += k
                m.drafted += g
                n = min(k + 1, j.req.output_tokens - j.committed)
                if j.committed == 0 and n > 0:
                    j.req.first_token = now + self.link.delay(64, self.rng)
                j.committed += n
                j.context += n
                j.req.committed = j.committed
                j.req.rounds += 1
                m.tokens(now, n)
            for j, take in plan.prefill:
                j.prefill_left -= take
                j.context += take
            served = {j for j, _ in rounds}
            keep = []
            for j in [j for j in self.jobs if j not in served] + [j for j, _ in rounds]:  # round-robin order
                if j.committed >= j.req.output_tokens:
                    j.req.finished = max(j.req.first_token, now + self.link.delay(64, self.rng))
                else:
                    keep.append(j)
            self.jobs = keep

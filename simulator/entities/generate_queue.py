"""The shared generate queue: whole jobs pulled by fused workers when they have free capacity (credit).

Bounded: a put to a full queue is refused (BUSY) and the client retries later; nothing is dropped silently.
"""
from __future__ import annotations

from collections import deque


class GenerateQueue:
    def __init__(self, max_jobs: int) -> None:
        self.jobs: deque = deque()
        self.max_jobs = max_jobs
        self.idle: list = []  # fused workers waiting for work
        self.busy_refusals = 0

    def put(self, job) -> bool:
        if len(self.jobs) >= self.max_jobs:
            self.busy_refusals += 1
            return False
        self.jobs.append(job)
        if self.idle:
            self.idle.pop(0).poke()
        return True

    def __len__(self) -> int:
        return len(self.jobs)

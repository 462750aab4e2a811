"""The target's tick batching policy: what goes into one forward pass. Shared by the target worker and simulator.

A tick fires when the oldest waiting item has waited ``tick_ms`` or the pending work already fills the batch.
Verify chunks (decodes) go first, all of them up to the token budget: they are latency-critical and small. Prefills
then fill the leftover budget in chunks of at most ``prefill_chunk`` tokens, so a long prompt never stalls the
decodes of other sessions (chunked prefill, as in Sarathi / vLLM).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence


@dataclass
class BatchLimits:
    max_batch_tokens: int = 512  # tokens in one forward pass (verify + prefill)
    max_batch_rows: int = 64  # sequences in one forward pass
    prefill_chunk: int = 256  # most prompt tokens of one session per tick
    tick_ms: float = 2.0  # longest a queued item waits for company


@dataclass
class TickPlan:
    verify: list[Hashable] = field(default_factory=list)  # keys of chunks verified this tick
    prefill: list[tuple[Hashable, int]] = field(default_factory=list)  # (key, tokens to prefill this tick)

    @property
    def rows(self) -> int:
        return len(self.verify) + len(self.prefill)

    def __bool__(self) -> bool:
        return bool(self.verify or self.prefill)


def tick_due(now: float, oldest_enqueued: float | None, pending_tokens: int, pending_rows: int,
             limits: BatchLimits, active_rows: int | None = None) -> bool:
    """Should the target run a tick now? ``now`` and ``oldest_enqueued`` in seconds.

    ``active_rows``: how many sessions could send work at all (open, unfinished sessions on this target). When
    every one of them already has work waiting, nobody else can join the batch, so waiting ``tick_ms`` for company
    would only add latency: the tick fires at once (a lone session pays no batching delay).
    """
    if oldest_enqueued is None:
        return False
    if pending_tokens >= limits.max_batch_tokens or pending_rows >= limits.max_batch_rows:
        return True
    if active_rows is not None and 0 < active_rows <= pending_rows:
        return True
    return (now - oldest_enqueued) * 1000.0 >= limits.tick_ms


def plan_tick(verifies: Sequence[tuple[Hashable, int]], prefills: Sequence[tuple[Hashable, int]],
              limits: BatchLimits) -> TickPlan:
    """Choose this tick's work from FIFO-ordered ``(key, tokens)`` lists.

    ``verifies``: chunks waiting (tokens = draft length + 1 when the last committed token is re-fed, or the draft
    length; the caller decides). ``prefills``: sessions with prompt tokens still to prefill (tokens = remaining).
    Always makes progress: the first item is taken even if it alone exceeds the budget.
    """
    plan = TickPlan()
    budget = limits.max_batch_tokens
    for key, n in verifies:
        if plan.rows >= limits.max_batch_rows or (n > budget and plan.rows):
            break
        plan.verify.append(key)
        budget -= n
    for key, remaining in prefills:
        if plan.rows >= limits.max_batch_rows or budget <= 0:
            break
        take = min(remaining, limits.prefill_chunk, budget)
        if take <= 0:
            break
        plan.prefill.append((key, take))
        budget -= take
    if not plan and prefills:  # budget was spent by nothing: still make progress
        key, remaining = prefills[0]
        plan.prefill.append((key, min(remaining, limits.prefill_chunk)))
    return plan

"""Slot bookkeeping shared by every backend: which slots are taken, how many tokens each caches, row validation.

Rollback is ``lengths[slot] -= n``: the backend's cache keeps stale entries past the length and masks them.
"""
from __future__ import annotations

from typing import Sequence

from workers.engine.base import Engine, EngineError, NoFreeSlot


class SlotTable:
    def __init__(self, num_slots: int, max_context: int, vocab_size: int) -> None:
        self.max_context, self.vocab_size = max_context, vocab_size
        self.lengths: list[int] = [0] * num_slots
        self.taken: list[bool] = [False] * num_slots

    def allocate(self) -> int:
        for slot, taken in enumerate(self.taken):
            if not taken:
                self.taken[slot], self.lengths[slot] = True, 0
                return slot
        raise NoFreeSlot(f"all {len(self.taken)} slots are in use")

    def check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(self.taken):
            raise EngineError(f"slot {slot!r} out of range [0, {len(self.taken)})")
        if not self.taken[slot]:
            raise EngineError(f"slot {slot} is not allocated")

    def free(self, slot: int) -> None:
        self.check_slot(slot)
        self.taken[slot], self.lengths[slot] = False, 0

    def length(self, slot: int) -> int:
        self.check_slot(slot)
        return self.lengths[slot]

    def rollback(self, slot: int, n: int) -> None:
        self.check_slot(slot)
        if not isinstance(n, int) or n < 0 or n > self.lengths[slot]:
            raise EngineError(f"cannot roll slot {slot} back by {n!r} (it holds {self.lengths[slot]} tokens)")
        self.lengths[slot] -= n

    def check_rows(self, rows: Sequence[tuple[int, Sequence[int]]], last_only: Sequence[bool] | None
                   ) -> tuple[list[int], list[list[int]], list[bool]]:
        """Validate a forward's rows before any cache is touched; returns (slots, token lists, last_only)."""
        if not rows:
            raise EngineError("forward needs at least one row")
        if last_only is None:
            last_only = [False] * len(rows)
        elif len(last_only) != len(rows):
            raise EngineError(f"last_only has {len(last_only)} entries for {len(rows)} rows")
        slots: list[int] = []
        tokens: list[list[int]] = []
        for slot, toks in rows:
            self.check_slot(slot)
            if slot in slots:
                raise EngineError(f"slot {slot} appears twice in one forward")
            toks = [int(t) for t in toks]
            if not toks:
                raise EngineError(f"row for slot {slot} has no tokens")
            bad = [t for t in toks if not 0 <= t < self.vocab_size]
            if bad:
                raise EngineError(f"token id {bad[0]} out of range [0, {self.vocab_size}) in slot {slot}")
            if self.lengths[slot] + len(toks) > self.max_context:
                raise EngineError(f"context overflow in slot {slot}: {self.lengths[slot]} cached + {len(toks)} "
                                  f"new > max_context {self.max_context}")
            slots.append(slot)
            tokens.append(toks)
        return slots, tokens, [bool(x) for x in last_only]


class SlotTableEngine(Engine):
    """Slot bookkeeping of every backend: allocate / free / length / rollback are ``self.table``'s (a length change;
    the KV data is never touched). Subclasses set ``self.table`` and implement ``forward``."""

    table: SlotTable

    def allocate(self) -> int:
        return self.table.allocate()

    def free(self, slot: int) -> None:
        self.table.free(slot)

    def length(self, slot: int) -> int:
        return self.table.length(slot)

    def rollback(self, slot: int, n: int) -> None:
        self.table.rollback(slot, n)

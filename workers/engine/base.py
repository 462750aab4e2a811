"""The engine interface every backend implements (torch CPU/CUDA). See protocol/FLOW.md "Token positions".

Slots hold one session's KV cache each. ``forward`` appends tokens to several slots in ONE forward pass (rows of
different lengths at different positions) and returns their logits; ``rollback`` is a length change, never a copy.
Compiled backends (CUDA graphs; a Neuron engine, see docs/backends.md) run fixed (batch, tokens) buckets:
``buckets()`` lists them and the caller pads a tick's work up to one; eager backends return ``None`` (any shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class EngineError(Exception):
    """A request the engine cannot serve (no free slot, context overflow, bad token id...)."""


class NoFreeSlot(EngineError):
    pass


@dataclass
class EngineInfo:
    model_id: str  # e.g. the model directory's name
    vocab_size: int
    max_context: int  # tokens per slot
    num_slots: int
    eos_token_id: int | None
    dtype: str
    device: str
    tokenizer_fingerprint: str = ""
    eos_token_ids: tuple[int, ...] = ()  # every EOS id (Llama-3 has several); eos_token_id is the first


class Engine:
    info: EngineInfo

    def allocate(self) -> int:
        """Reserve a free slot (empty cache) and return its id. Raises ``NoFreeSlot``."""
        raise NotImplementedError

    def free(self, slot: int) -> None:
        raise NotImplementedError

    def length(self, slot: int) -> int:
        """Tokens currently cached in ``slot``."""
        raise NotImplementedError

    def forward(self, rows: Sequence[tuple[int, Sequence[int]]], last_only: Sequence[bool] | None = None
                ) -> list[torch.Tensor]:
        """Append ``tokens`` to each ``slot`` in one forward pass and return float32 logits per row.

        Row i's logits are ``[len(tokens_i), vocab]``, or ``[1, vocab]`` for its last token when ``last_only[i]``
        (prefill chunks). Raises ``EngineError`` on context overflow or out-of-range ids, before touching any cache.
        """
        raise NotImplementedError

    def rollback(self, slot: int, n: int) -> None:
        """Forget the last ``n`` cached tokens of ``slot`` (a length change)."""
        raise NotImplementedError

    def buckets(self) -> list[tuple[int, int]] | None:
        """Compiled (batch, tokens) shapes, or None when any shape runs."""
        return None

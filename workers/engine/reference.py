"""The recompute engine: any HF ``AutoModelForCausalLM``, no KV cache, the whole sequence recomputed per forward.

Slow on purpose and obviously correct: it is the test oracle for the fast backends and the generic path for
architectures ``llama.py`` does not cover. A slot is a token list; rollback drops its tail.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from workers.engine.base import EngineError, EngineInfo
from workers.engine.model_dir import dtype_name, eos_token_ids, parse_device, parse_dtype, read_config
from workers.engine.slots import SlotTable, SlotTableEngine
from workers.engine.tokenizer_id import tokenizer_fingerprint


class ReferenceEngine(SlotTableEngine):
    def __init__(self, model: Any, info: EngineInfo) -> None:
        self.model = model
        self.info = info
        self.device = torch.device(info.device)
        self.table = SlotTable(info.num_slots, info.max_context, info.vocab_size)
        self.seqs: list[list[int]] = [[] for _ in range(info.num_slots)]

    def allocate(self) -> int:
        slot = super().allocate()
        self.seqs[slot] = []
        return slot

    def free(self, slot: int) -> None:
        super().free(slot)
        self.seqs[slot] = []

    def rollback(self, slot: int, n: int) -> None:
        super().rollback(slot, n)
        del self.seqs[slot][self.table.lengths[slot]:]

    def forward(self, rows: Sequence[tuple[int, Sequence[int]]], last_only: Sequence[bool] | None = None
                ) -> list[torch.Tensor]:
        slots, tokens, last = self.table.check_rows(rows, last_only)
        out: list[torch.Tensor] = []
        with torch.inference_mode():
            for slot, toks, lo in zip(slots, tokens, last):  # one row at a time: no padding to get wrong
                seq = self.seqs[slot] + toks
                ids = torch.tensor([seq], dtype=torch.long, device=self.device)
                logits = self.model(input_ids=ids, use_cache=False).logits[0, len(self.seqs[slot]):].float()
                out.append(logits[-1:] if lo else logits)
        for slot, toks in zip(slots, tokens):
            self.seqs[slot].extend(toks)
            self.table.lengths[slot] += len(toks)
        return out


def load_reference_engine(model_dir: str | Path, device: str = "cpu", dtype: str = "float32", slots: int = 8,
                          max_context: int | None = None) -> ReferenceEngine:
    """Load any causal LM transformers knows (``AutoModelForCausalLM``) as a recompute engine."""
    path, cfg = read_config(model_dir)
    dev, dt = parse_device(device), parse_dtype(dtype)
    if not isinstance(slots, int) or slots < 1:
        raise EngineError(f"slots must be a positive integer, got {slots!r}")
    try:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt)
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError(f"{path}: transformers cannot load this model: {exc}") from exc
    model = model.to(dev).eval()
    vocab = int(model.config.vocab_size)
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    ctx = max_context if max_context is not None else min(int(limit), 2048)
    eos = eos_token_ids(path, cfg)
    info = EngineInfo(model_id=path.resolve().name, vocab_size=vocab, max_context=ctx, num_slots=slots,
                      eos_token_id=eos[0] if eos else None, dtype=dtype_name(dt), device=str(dev),
                      tokenizer_fingerprint=tokenizer_fingerprint(path), eos_token_ids=eos)
    return ReferenceEngine(model, info)

"""An emulated model: a profiled device's step times and a known acceptance rate, with no weights and no compute.

Everything between a drafter and a target that is not the forward pass (broker hops, serialisation, the workers'
loops, the gather windows, the goodput controller) is software, and it behaves on a laptop as on the GPU host only
if the forward passes take as long as they do there. This engine makes them: ``forward`` sleeps for the step time
its cost table (``specmq profile``) gives the tick's shape, with the GIL released as a GPU kernel releases it, and
answers with logits that cost next to nothing to build and to judge. So ``specmq up`` / ``specmq bench capacity``
on a CPU run the real system against an "H200 running an 8B target", and what they measure beyond the table is the
software path (docs/emulation.md).

Tokens: the target's next token after token ``t`` at position ``p`` is a hash of (t, p); the draft's equals it with
probability ``acceptance`` (another hash of (t, p), so the same position is accepted or rejected in every run),
otherwise it is a different token. Greedy speculative output therefore equals the emulated target's own greedy
output, and the lossless check of a capacity run still means something. Logits are ``logit_scale`` on the chosen
token and 0 elsewhere over a small vocabulary (temperature sampling and rejection sampling work unchanged).

An emulated model directory holds only ``config.json``::

    {"model_type": "specmq-emulated", "role": "target", "vocab_size": 512,
     "cost_table": "../../configs/profiles/h200-grown-8b-1b.yaml", "max_position_embeddings": 8192}

``role`` "target" prices a forward with the table's target grid at (rows, tokens, mean context); "draft" with its
draft grid at (rows, mean context), a step of more than ``draft_flat_tokens`` tokens (a catch-up or prefill) costing
proportionally more. ``acceptance`` (draft only, default 0.7) and ``seed`` set the tokens; ``time_scale`` multiplies
every step time (0 makes a free model for tests). A ``cost_table`` path is relative to the directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from workers.engine.base import EngineError, EngineInfo
from workers.engine.slots import SlotTable, SlotTableEngine

MODEL_TYPE = "specmq-emulated"
ROLES = ("target", "draft")
FIRST_TOKEN = 3  # ids below it (BOS, EOS, PAD in the shipped tokenizer) are never produced
_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3's finaliser) of int64 values below 2**32: products stay below 2**63."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def target_tokens(prev: torch.Tensor, pos: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    """The emulated target's greedy next token after ``prev`` at ``pos`` (elementwise)."""
    h = _mix(prev * 0x9E3779B1 + _mix(pos + seed * 0x85EBCA6B))
    return FIRST_TOKEN + h % (vocab - FIRST_TOKEN)


def draft_tokens(prev: torch.Tensor, pos: torch.Tensor, vocab: int, seed: int, acceptance: float) -> torch.Tensor:
    """The draft's next token: the target's where a (prev, pos) hash falls under ``acceptance``, else another."""
    want = target_tokens(prev, pos, vocab, seed)
    coin = _mix(prev * 0x27D4EB2F + _mix(pos * 0x165667B1 + seed + 1)).double() / float(1 << 32)
    other = FIRST_TOKEN + (want - FIRST_TOKEN + 1 + _mix(pos + prev) % (vocab - FIRST_TOKEN - 1)) % (vocab - FIRST_TOKEN)
    return torch.where(coin < acceptance, want, other)


class EmulatedEngine(SlotTableEngine):
    """Slots and lengths like every backend; a forward sleeps for its priced step time and returns one-hot logits."""

    def __init__(self, info: EngineInfo, role: str, step_ms: Any, *, acceptance: float = 0.7, seed: int = 0,
                 logit_scale: float = 12.0) -> None:
        self.info, self.role, self.step_ms = info, role, step_ms
        self.acceptance, self.seed, self.logit_scale = acceptance, seed, logit_scale
        # a token depends only on the token fed and its position: the slots need their lengths, nothing more
        self.table = SlotTable(info.num_slots, info.max_context, info.vocab_size)
        self.forwards = 0
        self.slept_ms = 0.0

    def cost_ms(self, rows: int, tokens: int, context: float) -> float:
        """The priced step time of a forward of ``rows`` rows, ``tokens`` new tokens, ``context`` mean length."""
        return float(self.step_ms(rows, tokens, context))

    def forward(self, rows: Sequence[tuple[int, Sequence[int]]], last_only: Sequence[bool] | None = None
                ) -> list[torch.Tensor]:
        slots, tokens, last = self.table.check_rows(rows, last_only)
        starts = [self.table.lengths[s] for s in slots]
        n_tokens = sum(len(t) for t in tokens)
        context = sum(st + len(t) for st, t in zip(starts, tokens)) / len(slots)
        t0 = time.perf_counter()
        prev = torch.tensor([t for toks in tokens for t in toks], dtype=torch.int64)
        pos = torch.tensor([st + i for st, toks in zip(starts, tokens) for i in range(len(toks))], dtype=torch.int64)
        vocab = self.info.vocab_size
        ids = (target_tokens(prev, pos, vocab, self.seed) if self.role == "target"
               else draft_tokens(prev, pos, vocab, self.seed, self.acceptance))
        logits = torch.zeros(len(ids), vocab)
        logits[torch.arange(len(ids)), ids] = self.logit_scale
        out, at = [], 0
        for toks, lo in zip(tokens, last):
            row = logits[at:at + len(toks)]
            out.append(row[-1:] if lo else row)
            at += len(toks)
        for slot, toks in zip(slots, tokens):
            self.table.lengths[slot] += len(toks)
        wait = self.cost_ms(len(slots), n_tokens, context) / 1000.0 - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)  # the device's step: releases the GIL as a GPU kernel does
        self.forwards += 1
        self.slept_ms += max(0.0, wait) * 1000.0
        return out


def _number(cfg: dict, key: str, default: float, path: Path, lo: float, hi: float | None = None) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value > hi):
        span = f"[{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise EngineError(f"{path}: {key} must be a number in {span}, got {value!r}")
    return float(value)


def load_emulated_engine(model_dir: str | Path, cfg: dict[str, Any], slots: int = 8,
                         max_context: int | None = None) -> EmulatedEngine:
    """The engine an emulated model directory describes (see the module docstring); errors name the bad key."""
    path = Path(model_dir)
    role = cfg.get("role", "target")
    if role not in ROLES:
        raise EngineError(f"{path}: role must be one of {', '.join(ROLES)}, got {role!r}")
    vocab = cfg.get("vocab_size", 512)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < FIRST_TOKEN + 2:
        raise EngineError(f"{path}: vocab_size must be an integer >= {FIRST_TOKEN + 2}, got {vocab!r}")
    if not isinstance(slots, int) or slots < 1:
        raise EngineError(f"slots must be a positive integer, got {slots!r}")
    acceptance = _number(cfg, "acceptance", 0.7, path, 0.0, 1.0)
    scale = _number(cfg, "time_scale", 1.0, path, 0.0)
    flat = int(_number(cfg, "draft_flat_tokens", 64, path, 1.0))
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EngineError(f"{path}: seed must be a non-negative integer, got {seed!r}")
    table_name = cfg.get("cost_table")
    if not isinstance(table_name, str) or not table_name:
        raise EngineError(f"{path}: cost_table (the profile table that prices each forward) is missing")
    from workers.cost_table import CostTableError, load_table

    table_path = (path / table_name) if not Path(table_name).is_absolute() else Path(table_name)
    try:
        table = load_table(table_path)
    except (CostTableError, OSError) as exc:
        raise EngineError(f"{path}: cost_table {str(table_path)!r}: {exc}") from None
    if role == "target":
        def step_ms(rows: int, tokens: int, context: float) -> float:
            return scale * table.verify_ms(rows, tokens, context)
    else:
        def step_ms(rows: int, tokens: int, context: float) -> float:
            return scale * table.draft_step_ms(rows, context) * max(1.0, tokens / (rows * flat))
    limit = int(_number(cfg, "max_position_embeddings", 8192, path, 1.0))
    ctx = min(limit, max_context) if max_context is not None else limit
    info = EngineInfo(model_id=path.resolve().name, vocab_size=vocab, max_context=ctx, num_slots=slots,
                      eos_token_id=None, dtype="emulated", device="emulated:" + (table.hardware or table.device),
                      tokenizer_fingerprint="emulated-" + str(seed), eos_token_ids=())
    return EmulatedEngine(info, role, step_ms, acceptance=acceptance, seed=seed)


def is_emulated(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds an emulated model (its config.json says ``model_type: specmq-emulated``)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False

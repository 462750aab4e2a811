"""Step-latency profiling: time a target's verify step and its draft's decode step over a grid of shapes.

The verify step is timed against (batch rows, new tokens per row, cached context per row); the table's ``tokens``
axis is the pass's TOTAL new tokens (``simulator/costs.py``), so each (batch, total) point is measured as ``batch``
rows sharing ``total`` tokens as evenly as possible (totals below ``batch`` run one token per row). The draft table
is one decode step (batch rows x 1 token) against context. Each point is the median wall time of ``--reps`` steps,
each ending in a device sync (a worker reads the logits back every step), after a warm-up step (graph capture).

Random weights for ``--shape`` (the shape, not the weights, sets the time); caches are filled with random values and
slot lengths set directly, so no prefill is needed. On CUDA the engine is the CUDA-graph engine, on CPU the eager
engine: what the product runs on that device.
``specmq profile`` runs this and writes the result as a cost table (``workers.cost_table``).
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from protocol.errors import SpecmqError


class ProfileError(SpecmqError):
    """A profile that cannot run as asked (unknown shape, no CUDA device, an engine that cannot be built)."""


def int_list(text: str) -> list[int]:
    try:
        vals = sorted(set(int(x) for x in str(text).split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or vals[0] < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return vals


class Progress:
    """A one-line progress bar on stderr (no dependency; quiet when stderr is not a terminal except every 10%)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.done, self.label, self.t0 = max(total, 1), 0, label, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_decile = -1

    def step(self, what: str = "") -> None:
        self.done += 1
        frac = self.done / self.total
        bar = "#" * int(frac * 30)
        line = f"{self.label} [{bar:<30}] {self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s {what}"
        if self.tty:
            print("\r" + line[:120].ljust(120), end="" if self.done < self.total else "\n", file=sys.stderr,
                  flush=True)
        elif int(frac * 10) != self.last_decile:
            self.last_decile = int(frac * 10)
            print(line, file=sys.stderr, flush=True)


def sync(engine: Any) -> Callable[[], None]:
    import torch

    if getattr(engine, "device", None) is not None and engine.device.type == "cuda":
        return lambda: torch.cuda.synchronize(engine.device)
    return lambda: None


def step_ms(engine: Any, counts: Sequence[int], context: int, reps: int, seed: int = 0) -> float:
    """Median ms of one forward of ``len(counts)`` rows (row i appends counts[i] tokens to ``context`` cached ones),
    rolled back after each step. Uses slots 0..B-1 (allocated on first use) with lengths set directly."""
    import random

    rng = random.Random(seed)
    table = engine.table
    B = len(counts)
    while sum(table.taken) < B:
        engine.allocate()
    slots = list(range(B))
    for s in slots:
        table.lengths[s] = context
    rows = [(s, [rng.randrange(engine.info.vocab_size) for _ in range(n)]) for s, n in zip(slots, counts)]
    done = sync(engine)
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        engine.forward(rows)
        done()
        if i:  # the first step captures/warms up
            times.append((time.perf_counter() - t0) * 1e3)
        for s, n in zip(slots, counts):
            engine.rollback(s, n)
    return statistics.median(times)


def even_counts(batch: int, total: int) -> list[int]:
    """``total`` tokens over ``batch`` rows, as evenly as possible, at least one each."""
    total = max(total, batch)
    q, r = divmod(total, batch)
    return [q + 1] * r + [q] * (batch - r)


def build_engine(model_dir: str | None, shape: str | None, device: str, dtype: str, slots: int, max_context: int,
                 grow: str | None = None):
    """An engine with random cache contents: ``shape``'s random weights, else the model directory's (grown in
    memory to ``grow``'s shape when given: the grown model is what a worker started with ``--grow`` runs)."""
    from workers.engine.base import EngineError
    from workers.engine.cuda_shapes import fill_cache_randomly, random_engine

    from workers.engine.emulated import is_emulated

    if model_dir and not shape and is_emulated(model_dir):  # no cache to fill: its forwards are priced, not run
        from workers.engine import load_engine

        try:
            return load_engine(model_dir, slots=slots, max_context=max_context)
        except EngineError as exc:
            raise ProfileError(f"cannot build the engine: {exc}") from None
    try:
        if shape:
            eng = random_engine(shape, device=device, dtype=dtype, slots=slots, max_context=max_context)
        elif grow:
            from workers.engine import load_engine

            eng = load_engine(model_dir, device=device, dtype=dtype, slots=slots, max_context=max_context,
                              backend="cuda" if device.startswith("cuda") else "llama", grow=grow)
        elif device.startswith("cuda"):
            from workers.engine.cuda_engine import load_cuda_engine
            eng = load_cuda_engine(model_dir, device=device, dtype=dtype, slots=slots, max_context=max_context)
        else:
            from workers.engine.torch_engine import load_torch_engine
            eng = load_torch_engine(model_dir, device=device, dtype=dtype, slots=slots, max_context=max_context)
    except (EngineError, KeyError) as exc:
        raise ProfileError(f"cannot build the engine: {exc}") from None
    fill_cache_randomly(eng)
    return eng


def hardware(device: str) -> str:
    import os

    import torch

    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


@dataclass
class Measured:
    """The grids of one profile run, indexed as the cost table's axes."""

    target_id: str
    draft_id: str
    totals: list[int]  # the target table's tokens axis: total new tokens per pass
    target_ms: list  # [batch][total tokens][context]
    draft_ms: list  # [batch][context]


def measure(model: str | None, shape: str | None, draft_model: str | None, draft_shape: str | None, device: str,
            dtype: str, batches: list[int], per_row: list[int], contexts: list[int], reps: int,
            grow: str | None = None, draft_grow: str | None = None) -> Measured:
    """Time the target over (batch, total tokens, context) and its draft over (batch, context), with progress on
    stderr. ``totals`` are every ``batch x tokens per row``; each point is ``batch`` rows sharing them evenly."""
    import gc

    import torch

    from workers.engine.cuda_shapes import DRAFT_OF, SHAPES

    if bool(model) == bool(shape):
        raise ProfileError("give exactly one of --model DIR or --shape NAME")
    if shape and shape not in SHAPES:
        raise ProfileError(f"--shape {shape!r} unknown (choose from {', '.join(SHAPES)})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProfileError("--device cuda but torch.cuda.is_available() is False")
    if 0 in batches or 0 in per_row:
        raise ProfileError("--batches and --tokens must be positive")
    totals = sorted({b * t for b in batches for t in per_row})
    max_ctx = max(contexts) + max(max(per_row), math.ceil(max(totals) / min(batches)))
    max_ctx = -(-max_ctx // 128) * 128
    slots = max(batches)

    # ---- target: (batch, total tokens, context)
    if grow and not model:
        raise ProfileError("--grow needs --model (the directory to grow)")
    eng = build_engine(model, shape, device, dtype, slots, max_ctx, grow=grow)
    target_id = shape or (f"{Path(model).name} grown to {grow}" if grow else Path(model).name)
    cache: dict[tuple, float] = {}
    grid = [[[0.0] * len(contexts) for _ in totals] for _ in batches]
    bar = Progress(len(batches) * len(totals) * len(contexts), "target")
    for i, b in enumerate(batches):
        for j, n in enumerate(totals):
            counts = even_counts(b, n)
            for k, c in enumerate(contexts):
                shape_for = getattr(eng, "shape_for", None)
                key = (shape_for(b, max(counts), c + max(counts))[:3] if shape_for else (b, tuple(counts)), c)
                if key not in cache:
                    cache[key] = step_ms(eng, counts, c, reps)
                grid[i][j][k] = cache[key]
                bar.step(f"B={b} N={n} ctx={c}: {grid[i][j][k]:.2f} ms")
    del eng, cache
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    # ---- draft: (batch, context), one token per row
    draft_shape = None if draft_model else (draft_shape or DRAFT_OF.get(shape or "", None))
    draft_dir = draft_model or (None if draft_shape else model)
    draft_id = draft_shape or (f"{Path(draft_dir).name} grown to {draft_grow}" if draft_grow else Path(draft_dir).name)
    deng = build_engine(draft_dir, draft_shape, device, dtype, slots, max_ctx, grow=draft_grow)
    dgrid = [[0.0] * len(contexts) for _ in batches]
    bar = Progress(len(batches) * len(contexts), "draft ")
    for i, b in enumerate(batches):
        for k, c in enumerate(contexts):
            dgrid[i][k] = step_ms(deng, [1] * b, c, reps)
            bar.step(f"B={b} ctx={c}: {dgrid[i][k]:.2f} ms")
    return Measured(target_id, draft_id, totals, grid, dgrid)

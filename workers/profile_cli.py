"""``specmq profile``: measure a target's verify step and its draft's decode step; write the simulator's cost table.

The verify step is timed against (batch rows, new tokens per row, cached context per row); the table's ``tokens``
axis is the pass's TOTAL new tokens (``simulator/costs.py``), so each (batch, total) point is measured as ``batch``
rows sharing ``total`` tokens as evenly as possible (totals below ``batch`` run one token per row). The draft table
is one decode step (batch rows x 1 token) against context. Each point is the median wall time of ``--reps`` steps,
each ending in a device sync (a worker reads the logits back every step), after a warm-up step (graph capture).

Random weights for ``--shape`` (the shape, not the weights, sets the time); caches are filled with random values and
slot lengths set directly, so no prefill is needed. On CUDA the engine is the CUDA-graph engine, on CPU the eager
engine: what the product runs on that device.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from specmq.cliutil import CommandError, add_command, print_json

EXAMPLE = ("specmq profile --shape llama-3.1-8b --device cuda --dtype bfloat16 --out configs/profiles/h100.yaml "
           "--batches 1,4,16,64 --tokens 1,5,9 --contexts 512,2048")


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


def build_engine(model_dir: str | None, shape: str | None, device: str, dtype: str, slots: int, max_context: int):
    from workers.engine.base import EngineError
    from workers.engine.cuda_shapes import fill_cache_randomly, random_engine

    try:
        if shape:
            eng = random_engine(shape, device=device, dtype=dtype, slots=slots, max_context=max_context)
        elif device.startswith("cuda"):
            from workers.engine.cuda_engine import load_cuda_engine
            eng = load_cuda_engine(model_dir, device=device, dtype=dtype, slots=slots, max_context=max_context)
        else:
            from workers.engine.torch_engine import load_torch_engine
            eng = load_torch_engine(model_dir, device=device, dtype=dtype, slots=slots, max_context=max_context)
    except (EngineError, KeyError) as exc:
        raise CommandError(f"cannot build the engine: {exc}") from None
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


def run(args: argparse.Namespace) -> int:
    import gc

    import torch

    from simulator.costs import write_table
    from workers.engine.cuda_shapes import DRAFT_OF, SHAPES

    if bool(args.model) == bool(args.shape):
        raise CommandError("give exactly one of --model DIR or --shape NAME")
    if args.shape and args.shape not in SHAPES:
        raise CommandError(f"--shape {args.shape!r} unknown (choose from {', '.join(SHAPES)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, per_row, contexts = args.batches, args.tokens, args.contexts
    if 0 in batches or 0 in per_row:
        raise CommandError("--batches and --tokens must be positive")
    totals = sorted({b * t for b in batches for t in per_row})
    max_ctx = max(contexts) + max(max(per_row), math.ceil(max(totals) / min(batches)))
    max_ctx = -(-max_ctx // 128) * 128
    slots = max(batches)

    # ---- target: (batch, total tokens, context)
    eng = build_engine(args.model, args.shape, args.device, args.dtype, slots, max_ctx)
    target_id = args.shape or Path(args.model).name
    cache: dict[tuple, float] = {}
    grid = [[[0.0] * len(contexts) for _ in totals] for _ in batches]
    bar = Progress(len(batches) * len(totals) * len(contexts), "target")
    for i, b in enumerate(batches):
        for j, n in enumerate(totals):
            counts = even_counts(b, n)
            for k, c in enumerate(contexts):
                shape = getattr(eng, "shape_for", None)
                key = (shape(b, max(counts), c + max(counts))[:3] if shape else (b, tuple(counts)), c)
                if key not in cache:
                    cache[key] = step_ms(eng, counts, c, args.reps)
                grid[i][j][k] = cache[key]
                bar.step(f"B={b} N={n} ctx={c}: {grid[i][j][k]:.2f} ms")
    del eng, cache
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    # ---- draft: (batch, context), one token per row
    draft_shape = None if args.draft_model else (args.draft_shape or DRAFT_OF.get(args.shape or "", None))
    draft_dir = args.draft_model or (None if draft_shape else args.model)
    draft_id = draft_shape or Path(draft_dir).name
    deng = build_engine(draft_dir, draft_shape, args.device, args.dtype, slots, max_ctx)
    dgrid = [[0.0] * len(contexts) for _ in batches]
    bar = Progress(len(batches) * len(contexts), "draft ")
    for i, b in enumerate(batches):
        for k, c in enumerate(contexts):
            dgrid[i][k] = step_ms(deng, [1] * b, c, args.reps)
            bar.step(f"B={b} ctx={c}: {dgrid[i][k]:.2f} ms")
    table = write_table(
        args.out, model=target_id, device=args.device, dtype=args.dtype, hardware=hardware(args.device),
        target_axes={"batch": batches, "tokens": totals, "context": contexts}, target_latency_ms=grid,
        draft_axes={"batch": batches, "context": contexts}, draft_latency_ms=dgrid, draft_model=draft_id,
        note=(f"measured by specmq profile: median of {args.reps} steps, each synced; tokens = total new tokens "
              f"in the pass (rows share them evenly); {'random weights, ' if args.shape else ''}"
              f"engine {'cuda-graphs' if args.device.startswith('cuda') else 'torch eager'}"))
    summary = {"out": str(args.out), "model": target_id, "draft_model": draft_id,
               "verify_ms_b1_t1": table.verify_ms(batches[0], 1, contexts[0]),
               "draft_ms_b1": table.draft_step_ms(batches[0], contexts[0])}
    if getattr(args, "json", False):
        print_json(summary)
    else:
        print(f"wrote {args.out}: target {target_id} ({len(batches)}x{len(totals)}x{len(contexts)} points), "
              f"draft {draft_id}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "profile", help="measure a model's step-latency table for the simulator", example=EXAMPLE,
                    func=run, json_flag=True)
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", default=None, help="HF Llama model directory (real weights)")
    src.add_argument("--shape", default=None, help="named shape with random weights: llama-3.1-8b, llama-3.2-1b, tiny")
    p.add_argument("--draft-model", default=None, help="draft model directory (default: the draft shape of --shape, "
                                                       "else --model itself)")
    p.add_argument("--draft-shape", default=None, help="draft shape (default: llama-3.2-1b for the 8B shape)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--out", type=Path, required=True, help="cost table YAML to write")
    p.add_argument("--batches", type=int_list, default=int_list("1,4,16,64"), help="rows per pass (default 1,4,16,64)")
    p.add_argument("--tokens", type=int_list, default=int_list("1,5,9"),
                   help="new tokens per row (default 1,5,9); the table's axis is batch x these")
    p.add_argument("--contexts", type=int_list, default=int_list("512,2048"),
                   help="cached tokens per row (default 512,2048)")
    p.add_argument("--reps", type=int, default=10, help="timed steps per point (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_with_defaults)


def _with_defaults(args: argparse.Namespace) -> int:
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    for name in ("batches", "tokens", "contexts"):
        val = getattr(args, name)
        if isinstance(val, (str, int)):  # from --config YAML
            setattr(args, name, int_list(str(val)))
        elif isinstance(val, list):
            setattr(args, name, sorted(set(int(v) for v in val)))
    if args.reps < 1:
        raise CommandError("--reps must be >= 1")
    return run(args)

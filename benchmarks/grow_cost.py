"""``specmq bench grow_cost``: does a grown model cost what a model of its shape costs? (needs CUDA)

The shipped target grown to Llama-3.1-8B's body (``workers/engine/grow.py``: zero-padded dims, pass-through
layers) against random weights of exactly the same shape (same vocabulary, same RoPE), both on the CUDA-graph
engine in bf16. For each (B x T, context) a verify step of each runs alternately, ``--reps`` times (the order
flips every rep, so clock and temperature drift fall on both); the row's ratio is grown / random of the medians.
Why: on an H200, bf16 products with zero-padded weights cost the same as random ones while memory-bound but can
differ by several percent when compute-bound (zeros draw less power); growth keeps zeros only where the function
needs them, and this says whether that is close enough (goal: every ratio within ``--goal`` of 1). Also reported:
the share of zero weights, and how often the grown bf16 model's argmax agrees with the small model's (bf16 can
flip near-ties; float32 agreement is exact, tests/test_grow.py).

    python -m specmq.cli bench grow_cost [--json] [--points 1x1,16x5,64x5,64x1] [--contexts 512,2048]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import BenchmarkError, print_rows_json
from workers.profiling import int_list, sync

HELP = "grown 8B (same outputs as the shipped target) vs random weights of its shape: verify-step cost ratio (CUDA)"
EXAMPLE = "specmq bench grow_cost --json --points 1x1,16x5,64x5,64x1 --contexts 512,2048"
ROOT = Path(__file__).resolve().parents[1]


def point_list(text: str) -> list[tuple[int, int]]:
    """``"1x1,16x5"`` -> [(1, 1), (16, 5)]: batch x new tokens per row."""
    try:
        pts = [tuple(int(v) for v in p.lower().split("x")) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxT pairs such as 1x1,16x5, got {text!r}") from None
    if not pts or any(len(p) != 2 or min(p) < 1 for p in pts):
        raise argparse.ArgumentTypeError(f"expected BxT pairs of positive integers, got {text!r}")
    return pts  # type: ignore[return-value]


def interleaved_ms(engines: list[Any], batch: int, tokens: int, context: int, reps: int, seed: int = 0
                   ) -> list[float]:
    """Median ms of one verify step (``batch`` rows of ``tokens`` new tokens on ``context`` cached ones) per
    engine, the engines taking turns every rep (order flipped each rep); each step is rolled back."""
    import random

    rng = random.Random(seed)
    vocab = min(e.info.vocab_size for e in engines)
    rows = [(s, [rng.randrange(vocab) for _ in range(tokens)]) for s in range(batch)]
    for e in engines:
        while sum(e.table.taken) < batch:
            e.allocate()
        for s in range(batch):
            e.table.lengths[s] = context
    done = [sync(e) for e in engines]

    def step(i: int) -> float:
        t0 = time.perf_counter()
        engines[i].forward(rows)
        done[i]()
        ms = (time.perf_counter() - t0) * 1e3
        for s in range(batch):
            engines[i].rollback(s, tokens)
        return ms

    for i in range(len(engines)):  # capture the bucket's graph, warm up
        for _ in range(2):
            step(i)
    times: list[list[float]] = [[] for _ in engines]
    for r in range(reps):
        order = range(len(engines)) if r % 2 == 0 else reversed(range(len(engines)))
        for i in order:
            times[i].append(step(i))
    return [statistics.median(t) for t in times]


def argmax_agreement(grown: Any, small: Any, prompts: list[list[int]]) -> float:
    """Share of prompt positions where the grown and the small engine's argmax agree (teacher-forced)."""
    agree = total = 0
    for ids in prompts:
        outs = []
        for e in (grown, small):
            slot = e.allocate()
            outs.append(e.forward([(slot, ids)])[0])
            e.free(slot)
        agree += int((outs[0].argmax(-1) == outs[1].argmax(-1)).sum())
        total += len(ids)
    return agree / max(total, 1)


def check_prompts(source: Path, n: int = 8, length: int = 256) -> list[list[int]]:
    """``n`` windows of ``length`` tokens of real text for the agreement check: this repo's own Python sources."""
    from workers.tokenizer_text import encode, load_tokenizer

    tok = load_tokenizer(source)
    files = sorted((ROOT / "workers").rglob("*.py"))[:n]
    out = [encode(tok, f.read_text())[:length] for f in files]
    return [ids for ids in out if len(ids) > 1]


def run(args: argparse.Namespace) -> int:
    import torch

    from workers.engine.base import EngineError, EngineInfo
    from workers.engine.cuda_engine import load_cuda_engine, make_engine
    from workers.engine.cuda_shapes import fill_cache_randomly, random_model, weight_bytes
    from workers.engine.grow import plan_growth
    from workers.engine.llama import ModelArgs
    from workers.engine.model_dir import read_config

    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise BenchmarkError("grow_cost needs a CUDA device (torch.cuda.is_available() is False)")
    t_start = time.monotonic()
    source = Path(args.source)
    slots = max(b for b, _ in args.points)
    max_ctx = max(args.contexts) + max(t for _, t in args.points)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    try:
        growth = plan_growth(read_config(source)[1], args.shape)
        say(f"growing {source.name} to {growth.label} on {args.device} ...")
        grown = load_cuda_engine(source, device=args.device, dtype=args.dtype, slots=slots, max_context=max_ctx,
                                 grow=args.shape, graphs=on_cuda)
    except EngineError as exc:
        raise BenchmarkError(str(exc)) from None
    args_big = ModelArgs.from_hf_config(growth.config)
    info = EngineInfo(model_id=f"random-{growth.label}", vocab_size=args_big.vocab_size, max_context=max_ctx,
                      num_slots=slots, eos_token_id=None, dtype=args.dtype, device=args.device)
    dev, dt = grown.device, grown.model.output.weight.dtype
    rand = make_engine(random_model(args_big, dev, dt), info, graphs=on_cuda)
    for e in (grown, rand):
        fill_cache_randomly(e)
    params = list(dict.fromkeys(grown.model.parameters()))  # tied embedding once
    zeros = sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)
    head = {"device": torch.cuda.get_device_name(dev) if on_cuda else "cpu", "torch": torch.__version__,
            "source": str(source), "shape": growth.label, "vocab_size": growth.vocab_size,
            "grown_weight_bytes": weight_bytes(grown.model), "random_weight_bytes": weight_bytes(rand.model),
            "grown_zero_share": round(zeros, 4), "engine_path": getattr(grown, "path", None),
            "goal": args.goal}
    say(f"{head['device']}: weights {head['grown_weight_bytes'] / 1e9:.2f} GB (grown) vs "
        f"{head['random_weight_bytes'] / 1e9:.2f} GB (random); {zeros:.1%} of the grown weights are zero")
    rows = []
    for c in args.contexts:
        for b, t in args.points:
            g_ms, r_ms = interleaved_ms([grown, rand], b, t, c, args.reps)
            rows.append({"batch": b, "tokens": t, "rows_x_tokens": b * t, "context": c, "grown_ms": round(g_ms, 3),
                         "random_ms": round(r_ms, 3), "ratio": round(g_ms / r_ms, 4)})
            say(f"  C={c:5d} B={b:3d} T={t:2d}: grown {g_ms:8.3f} ms  random {r_ms:8.3f} ms  x{g_ms / r_ms:.3f}")
    if not args.skip_check:
        del rand
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        small = load_cuda_engine(source, device=args.device, dtype=args.dtype, slots=slots, max_context=max_ctx,
                                 graphs=False)
        for slot, taken in enumerate(list(grown.table.taken)):
            if taken:
                grown.free(slot)
        prompts = check_prompts(source, length=min(256, max_ctx))
        head["argmax_agreement"] = round(argmax_agreement(grown, small, prompts), 4)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    head.update(worst_ratio_error=round(worst, 4), within_goal=worst <= args.goal,
                wall_s=round(time.monotonic() - t_start, 1))
    if args.json:
        print_rows_json(head, rows)
        return 0
    print(f"# {head['device']}, torch {head['torch']}: {source.name} grown to {growth.label} "
          f"({head['grown_weight_bytes'] / 1e9:.2f} GB, {zeros:.1%} zeros) vs random weights of the same shape")
    print(f"{'ctx':>5s} {'B':>3s} {'T':>2s} {'grown ms':>9s} {'random ms':>10s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['context']:5d} {r['batch']:3d} {r['tokens']:2d} {r['grown_ms']:9.3f} {r['random_ms']:10.3f} "
              f"{r['ratio']:7.3f}")
    agree = head.get("argmax_agreement")
    print(f"worst |ratio - 1| = {worst:.3f} (goal {args.goal:.3f}: {'met' if worst <= args.goal else 'NOT met'})"
          + (f"; {args.dtype} argmax agreement with the small model {agree:.3f}" if agree is not None else "")
          + f"; {head['wall_s']} s")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=str(ROOT / "models" / "tiny-target"),
                   help="the small model directory to grow (default: the shipped tiny-target)")
    p.add_argument("--shape", default="llama-3.1-8b", help="shape to grow to (default: llama-3.1-8b)")
    p.add_argument("--points", type=point_list, default=point_list("1x1,16x5,64x5,64x1"),
                   help="verify steps as BATCHxTOKENS (default: 1x1,16x5,64x5,64x1)")
    p.add_argument("--contexts", type=int_list, default=int_list("512,2048"),
                   help="cached tokens per row (default: 512,2048)")
    p.add_argument("--reps", type=int, default=30, help="timed steps per engine and point (default: 30)")
    p.add_argument("--goal", type=float, default=0.03, help="largest |ratio - 1| called a match (default: 0.03)")
    p.add_argument("--skip-check", action="store_true", help="skip the argmax agreement check")
    p.add_argument("--device", default="cuda", help="cuda[:N], or cpu for a smoke run of a small shape (default: cuda)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32 (default: bfloat16)")

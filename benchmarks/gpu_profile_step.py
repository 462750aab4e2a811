"""Where one graph-replayed verify step spends its time, on the engine's shipped path.

For the Llama-3.1-8B shape (bf16, random weights, ctx 512) and the 1B draft: per (B, T) the step's wall time
(median of ``--reps`` synced ``engine.forward`` calls, host work included) and its GPU time (CUDA events around the
graph replay alone), and a torch.profiler per-kernel-name table (total us per kernel name per step) for a few
shapes. ``--accuracy``: the bf16 logits against a float32 engine (same weights, same cache). One device call:

    python benchmarks/gpu_profile_step.py [--reps 20] [--out DIR]    # ~1 min on an H100
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.engine.cuda_shapes import fill_cache_randomly, random_engine  # noqa: E402
from workers.profiling import step_ms  # noqa: E402

CTX = 512

def log(*a) -> None:
    print(*a, flush=True)


def rows_for(eng, B: int, T: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    while sum(eng.table.taken) < B:
        eng.allocate()
    for s in range(B):
        eng.table.lengths[s] = CTX
    return [(s, [rng.randrange(eng.info.vocab_size) for _ in range(T)]) for s in range(B)]


def forward_once(eng, rows) -> torch.Tensor:
    out = torch.cat(eng.forward(rows))
    for s, t in rows:
        eng.rollback(s, len(t))
    return out


def replay_ms(eng, B: int, T: int, reps: int) -> float:
    """GPU time of the bucket's graph replay alone (CUDA events), median of ``reps``."""
    bucket = eng._buckets[eng.shape_for(B, T, CTX + T)[:3]]
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        bucket.graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def kernel_table(eng, rows, steps: int = 5) -> tuple[dict[str, tuple[float, float]], int]:
    """{kernel name: (us per step, launches per step)} from a chrome trace of ``steps`` synced forwards."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            forward_once(eng, rows)
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    tot: dict[str, float] = collections.defaultdict(float)
    cnt: dict[str, int] = collections.defaultdict(int)
    for e in trace.get("traceEvents", []):
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            name = e.get("name", "?")[:100]
            tot[name] += e["dur"]
            cnt[name] += 1
    n = sum(cnt.values())
    return {k: (tot[k] / steps, cnt[k] / steps) for k in tot}, n // steps


def short(name: str) -> str:
    for key, tag in (("gemv", "gemv"), ("gemm", "gemm"), ("sm90_xmma", "gemm"), ("cutlass", "gemm"), ("nvjet", "gemm"),
                     ("flash", "flash-attn"), ("rms", "rms_norm"), ("index_put", "index_put"),
                     ("indexing_backward", "index_put"), ("index_elementwise", "index"), ("rope", "fused rope_kv"),
                     ("add_rms", "fused add_rms_norm"), ("silu_mul", "fused silu_mul"), ("silu", "silu"),
                     ("CatArrayBatched", "cat"), ("Memcpy", "memcpy"), ("Memset", "memset"),
                     ("elementwise", "elementwise"), ("reduce", "reduce")):
        if key.lower() in name.lower():
            return tag
    return "other"


def profile_shapes(eng, label: str, shapes, reps: int, results: list) -> None:
    for B, T in shapes:
        try:
            rows_for(eng, B, T)
            t0 = time.perf_counter()
            ms = step_ms(eng, [T] * B, CTX, reps)
            gpu = replay_ms(eng, B, T, reps)
            rec = {"model": label, "path": eng.path, "batch": B, "tokens": T, "context": CTX, "ms": round(ms, 3),
                   "replay_ms": round(gpu, 3), "setup_s": round(time.perf_counter() - t0, 1)}
            results.append(rec)
            log(f"{label} B={B:3d} T={T}: step {ms:7.3f} ms  replay {gpu:7.3f} ms")
        except Exception as exc:  # one failing shape must not sink the call
            log(f"{label} B={B} T={T}: FAILED {type(exc).__name__}: {str(exc)[:400]}")
            results.append({"model": label, "batch": B, "tokens": T, "error": str(exc)[:400]})


def accuracy(B: int = 4, T: int = 5) -> None:
    """bf16 logits of the engine against a float32 engine (the portable path; same weights, same cache
    contents): how far the shipped kernels sit from exact math."""
    from workers.engine.base import EngineInfo
    from workers.engine.cuda_engine import make_engine
    from workers.engine.cuda_shapes import SHAPES, random_model

    args = SHAPES["llama-3.1-8b"]
    m32 = random_model(args, "cuda", torch.float32)
    m16 = random_model(args, "cuda", torch.float32)
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to(torch.bfloat16)
    info = EngineInfo(model_id="random-8b", vocab_size=args.vocab_size, max_context=CTX + 16, num_slots=B,
                      eos_token_id=None, dtype="bfloat16", device="cuda")
    e32 = make_engine(m32, info, graphs=False)
    fill_cache_randomly(e32)
    e = make_engine(m16, info, graphs=True)
    for (k, v), (k32, v32) in zip(e.kv, e32.kv):
        k.copy_(k32)
        v.copy_(v32)
    got = forward_once(e, rows_for(e, B, T, seed=3))
    want = forward_once(e32, rows_for(e32, B, T, seed=3))
    err = float((got - want).norm() / want.norm())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    log(f"accuracy 8B bf16 ({e.path} path) vs float32 B={B} T={T}: rel err {err:.4f}, argmax agree {agree:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--accuracy", action="store_true", help="only the bf16-vs-float32 logits check")
    args = p.parse_args()
    if args.accuracy:
        accuracy()
        return 0
    if os.environ.get("STEP_ACCURACY"):
        accuracy()
    os.makedirs(args.out, exist_ok=True)
    results: list = []
    tables: dict = {}
    log(torch.cuda.get_device_name(), "torch", torch.__version__)
    t_start = time.perf_counter()

    eng = random_engine("llama-3.1-8b", device="cuda", dtype="bfloat16", slots=64, max_context=CTX + 16)
    fill_cache_randomly(eng)
    log(f"8B engine path={eng.path} flash_layout={eng.flash_layout} why_portable={eng.why_portable!r} "
        f"({time.perf_counter() - t_start:.0f} s)")
    shapes = [(1, 1), (1, 5), (1, 9), (4, 5), (4, 9), (16, 1), (16, 5), (32, 5), (64, 1), (64, 5)]
    profile_shapes(eng, "8B", shapes, args.reps, results)
    for B, T in [(1, 1), (1, 5), (16, 5), (64, 1)]:
        rows = rows_for(eng, B, T)
        forward_once(eng, rows)  # capture outside the trace
        table, n = kernel_table(eng, rows)
        key = f"8B B={B} T={T}"
        if n < 50:  # the trace did not see the kernels inside the graph: trace the same forward eagerly
            eng.graphs = False
            table, n = kernel_table(eng, rows)
            eng.graphs = True
            key += " (eager)"
        tables[key] = table
        tot = sum(v[0] for v in table.values())
        log(f"\n== {key}: {n} kernels/step, {tot / 1e3:.3f} ms kernel time/step")
        groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        for name, (us, c) in table.items():
            g = groups[short(name)]
            g[0] += us
            g[1] += c
        for g, (us, c) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
            log(f"   {g:20s} {us:9.1f} us  {c:6.0f} launches")
        for name, (us, c) in sorted(table.items(), key=lambda kv: -kv[1][0])[:14]:
            log(f"     {us:9.1f} us {c:5.0f}x  {name}")
    log(f"8B done at {time.perf_counter() - t_start:.0f} s")
    del eng
    gc.collect()
    torch.cuda.empty_cache()

    d = random_engine("llama-3.2-1b", device="cuda", dtype="bfloat16", slots=64, max_context=CTX + 16)
    fill_cache_randomly(d)
    profile_shapes(d, "1B", [(1, 1), (16, 1), (64, 1)], args.reps, results)
    log(f"all done at {time.perf_counter() - t_start:.0f} s")
    with open(os.path.join(args.out, "gpu_profile_step.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results,
                   "kernel_tables": {k: {n: [round(us, 2), c] for n, (us, c) in v.items()}
                                     for k, v in tables.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

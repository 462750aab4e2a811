"""``specmq bench gpu_engine``: the CUDA-graph verify step vs HF eager (dynamic cache) vs the memory floor.

Llama-3.1-8B-shaped random bf16 weights. For each context C, batch B and new tokens T: the specmq engine (B slots
holding C cached tokens each, append T, roll back), transformers' ``LlamaForCausalLM`` forward with a
``DynamicCache`` (what a user would write: B sequences prefilled to C, then T new tokens, ``crop`` back), and the
floor = (weight bytes + KV bytes read: B*C*per-token KV) / the MEASURED device-to-device copy bandwidth. Also the
Llama-3.2-1B-shaped draft decode step (B x 1 token) vs its floor. Each time is the median of ``--reps`` steps, each
ending in a device sync. ``--json`` prints one object per row.

    specmq bench gpu_engine [--json] [--contexts 512,2048] [--skip-hf]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Any

from benchmarks import BenchmarkError, print_rows_json
from workers.profiling import int_list

HELP = "CUDA-graph engine vs HF eager vs the memory floor (needs CUDA)"
HF_WARMUP = 3  # untimed HF steps per point (allocator, kernels); HF's host-bound times still vary run to run
EXAMPLE = "specmq bench gpu_engine --json --batches 1,4,16,32,64 --tokens 1,5,9 --contexts 512,2048"


def copy_bandwidth(device, nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import torch

    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def _set_attn(model, impl: str) -> None:
    """Switch transformers' attention implementation in place (the prefill always runs SDPA: eager attention
    would materialise B x H x C x C scores)."""
    try:
        model.set_attn_implementation(impl)
    except (AttributeError, ValueError, TypeError):
        model.config._attn_implementation = impl


def hf_rows(shape: str, batches, tokens, contexts, reps: int, floor_of, attns=("sdpa",)) -> list[dict[str, Any]]:
    """HF eager mode (no compile, no graphs) + DynamicCache for every (C, B, T), once per attention
    implementation in ``attns`` ("sdpa": transformers' default; "eager": its matmul-softmax attention)."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from workers.engine.cuda_shapes import SHAPES

    a = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.n_layer, num_attention_heads=a.n_head, num_key_value_heads=a.n_kv_head,
                      head_dim=a.head_dim, rms_norm_eps=a.norm_eps, max_position_embeddings=a.max_position_embeddings,
                      rope_theta=a.rope_theta, rope_scaling=a.rope_scaling, tie_word_embeddings=a.tie_word_embeddings)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    out = []
    with torch.inference_mode():
        for c in contexts:
            for b in batches:
                try:
                    cache = DynamicCache(config=cfg)
                except TypeError:
                    cache = DynamicCache()
                ids = torch.randint(0, a.vocab_size, (b, c), device="cuda")
                _set_attn(model, "sdpa")
                model.model(input_ids=ids, past_key_values=cache, use_cache=True)
                del ids
                for impl, t in ((i, t) for i in attns for t in tokens):
                    _set_attn(model, impl)
                    new = torch.randint(0, a.vocab_size, (b, t), device="cuda")
                    times = []
                    for i in range(reps + HF_WARMUP):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        model(input_ids=new, past_key_values=cache, use_cache=True)
                        torch.cuda.synchronize()
                        if i >= HF_WARMUP:
                            times.append((time.perf_counter() - t0) * 1e3)
                        cache.crop(c)
                    ms = statistics.median(times)
                    out.append({"engine": "hf-eager", "hf_attn": impl, "model": shape, "batch": b, "tokens": t,
                                "context": c, "ms": round(ms, 3), "floor_ms": round(floor_of(b, c), 3)})
                    print(f"  hf/{impl:5s} C={c:5d} B={b:3d} T={t}: {ms:8.2f} ms", file=sys.stderr, flush=True)
                del cache
                torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def engine_rows(shape: str, batches, tokens, contexts, reps: int, bw: float, kind: str) -> list[dict[str, Any]]:
    import torch

    from workers.engine.cuda_shapes import SHAPES, kv_bytes_per_token, weight_bytes
    from workers.profiling import build_engine, step_ms

    max_ctx = -(-(max(contexts) + max(tokens)) // 128) * 128
    eng = build_engine(None, shape, "cuda", "bfloat16", max(batches), max_ctx)
    wbytes, kvtok = weight_bytes(eng.model), kv_bytes_per_token(SHAPES[shape], torch.bfloat16)
    floor_of = lambda b, c: (wbytes + b * c * kvtok) / bw * 1e3  # noqa: E731
    out = []
    for c in contexts:
        for b in batches:
            for t in tokens:
                ms = step_ms(eng, [t] * b, c, reps)
                f = floor_of(b, c)
                out.append({"engine": kind, "model": shape, "batch": b, "tokens": t, "context": c,
                            "ms": round(ms, 3), "floor_ms": round(f, 3), "ratio_to_floor": round(ms / f, 3),
                            "bucket": list(eng.shape_for(b, t, c + t)[:3])})
                print(f"  {kind:5s} C={c:5d} B={b:3d} T={t}: {ms:8.2f} ms  floor {f:6.2f}  x{ms / f:5.2f}",
                      file=sys.stderr, flush=True)
    info = {"weight_bytes": wbytes, "kv_bytes_per_token": kvtok, "path": eng.path, "flash_layout": eng.flash_layout,
            "attention": "triton split-kv" if eng.path == "fused" else "gather + sdpa",
            "why_portable": eng.why_portable}
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return out, floor_of, info


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise BenchmarkError("gpu_engine needs a CUDA device (torch.cuda.is_available() is False)")
    bw = copy_bandwidth(torch.device("cuda"))
    name = torch.cuda.get_device_name()
    head = {"device": name, "torch": torch.__version__, "copy_bandwidth_GBps": round(bw / 1e9, 1)}
    print(f"{name}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write)", file=sys.stderr, flush=True)
    rows, floor_of, info = engine_rows("llama-3.1-8b", args.batches, args.tokens, args.contexts, args.reps, bw,
                                       "specmq")
    head.update(info)
    drows, _, dinfo = engine_rows("llama-3.2-1b", args.batches, [1], args.contexts, args.reps, bw, "specmq")
    for r in drows:
        r["engine"] = "specmq-draft"
    attns = [a for a in args.hf_attn.split(",") if a]
    hf = [] if args.skip_hf else hf_rows("llama-3.1-8b", args.batches, args.tokens, args.contexts, args.hf_reps,
                                         floor_of, attns)
    ours = {(r["batch"], r["tokens"], r["context"]): r for r in rows}
    for r in hf:
        r["ratio_to_floor"] = round(r["ms"] / r["floor_ms"], 3)
        mine = ours.get((r["batch"], r["tokens"], r["context"]))
        if mine:
            tag = "" if r["hf_attn"] == attns[0] else f"_{r['hf_attn']}"  # hf_ms: the first (default sdpa)
            mine[f"hf{tag}_ms"] = r["ms"]
            mine[f"speedup_vs_hf{tag}"] = round(r["ms"] / mine["ms"], 2)
    if args.json:
        print_rows_json(head, rows + drows + hf)
        return 0
    print(f"# {name}, torch {torch.__version__}, attention {info['attention']}, copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"8B weights {info['weight_bytes'] / 1e9:.2f} GB, 1B weights {dinfo['weight_bytes'] / 1e9:.2f} GB")
    print(f"{'model':14s} {'ctx':>5s} {'B':>3s} {'T':>2s} {'specmq ms':>10s} {'floor ms':>9s} {'x floor':>8s} "
          f"{'hf ms':>8s} {'speedup':>8s} {'hf eager-attn ms':>16s} {'speedup':>8s}")
    nan = float("nan")
    for r in rows + drows:
        print(f"{r['model']:14s} {r['context']:5d} {r['batch']:3d} {r['tokens']:2d} {r['ms']:10.2f} "
              f"{r['floor_ms']:9.2f} {r['ratio_to_floor']:8.2f} {r.get('hf_ms', nan):8.2f} "
              f"{r.get('speedup_vs_hf', nan):8.2f} {r.get('hf_eager_ms', nan):16.2f} "
              f"{r.get('speedup_vs_hf_eager', nan):8.2f}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int_list, default=int_list("1,4,16,32,64"))
    p.add_argument("--tokens", type=int_list, default=int_list("1,5,9"))
    p.add_argument("--contexts", type=int_list, default=int_list("512,2048"))
    p.add_argument("--reps", type=int, default=20, help="timed steps per point, specmq engine (default 20)")
    p.add_argument("--hf-reps", type=int, default=5, help="timed steps per point, HF (default 5)")
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--hf-attn", default="sdpa,eager",
                   help="transformers attention implementations to time, first = the hf_ms column (default "
                        "sdpa,eager)")

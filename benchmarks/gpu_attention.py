"""Verify attention alone on the device: FA2 (plain, token rows) against the Triton split-KV kernel and its knobs.

One layer of the Llama-3.1-8B shape (32 query heads, 8 KV heads, head_dim 128) and of the 1B (head_dim 64), the
engine's cache layout ``[slots, cols, Hkv, D]`` with random contents, every row at ``ctx`` cached tokens. Per
(B, T, ctx): microseconds per call (``triton.testing.do_bench_cudagraph``: replayed from a CUDA graph, as the
engine runs it), the KV bytes floor (bytes of K and V read / the measured copy bandwidth) and the ratio.
Device-only developer tool; results in ``benchmarks/results/``.

    python3 benchmarks/gpu_attention.py --out $OUT
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.engine.cuda_attention import (flash_attention, flash_meta, reference_attention,  # noqa: E402
                                           split_attention)

KNOBS = [dict(block_n=bn, num_warps=w, num_stages=st, target=tg)
         for bn, w, st, tg in itertools.product((32, 64, 128), (4, 8), (2, 3), (264, 528))]


def token_rows_meta(slots: torch.Tensor, start: torch.Tensor, T: int, cols: int, n_slots: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA2 metadata ("offsets" layout) with each of the B*T queries its own one-query row over its row's slot,
    ``seqused = start + t + 1`` (causality by length), so that FA2 takes its split-KV decode kernel. A variant the
    engine does not run (it re-reads the keys once per token: a win only up to B x T ~ 20); its numbers are quoted
    in ``results/gpu_engine_h100.md``."""
    rows = slots.repeat_interleave(T)
    cu_q = torch.arange(0, rows.numel() + 1, device=slots.device, dtype=torch.int32)
    offsets = torch.cat([rows * cols, rows.new_full((1,), n_slots * cols)]).to(torch.int32)
    seqused = (start[:, None] + torch.arange(1, T + 1, device=start.device)[None, :]).flatten().to(torch.int32)
    return cu_q, offsets, seqused


def copy_gbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    from triton.testing import do_bench

    ms = do_bench(lambda: y.copy_(x), warmup=5, rep=50)
    return 2 * x.numel() / ms / 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--full", action="store_true", help="sweep every knob at every shape (default: a few shapes)")
    args = p.parse_args()
    from triton.testing import do_bench_cudagraph

    bw = copy_gbs()
    print(f"{torch.cuda.get_device_name()} copy {bw:.0f} GB/s", flush=True)
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for label, H, Hkv, D in (("8B", 32, 8, 128), ("1B", 32, 8, 64)):
        for ctx in (512, 2048):
            cols = ctx + 256
            n_slots = 65
            k, v = (torch.randn((n_slots, cols, Hkv, D), generator=g, device="cuda").to(torch.bfloat16)
                    for _ in range(2))
            for B, T in ((1, 1), (1, 5), (1, 9), (4, 5), (4, 9), (16, 1), (16, 5), (16, 9), (32, 5), (64, 1),
                         (64, 5), (64, 9)):
                if label == "1B" and T > 1:
                    continue
                q = torch.randn((B * T, H, D), generator=g, device="cuda").to(torch.bfloat16)
                slots = torch.arange(B, device="cuda")
                start = torch.full((B,), ctx, device="cuda")
                span = ctx + T
                floor_us = 2 * B * (ctx + T) * Hkv * D * 2 / bw / 1e3
                ref = reference_attention(q[: T * min(B, 2)], k, v, slots[:2], start[:2], T) if B >= 1 else None
                cands = {}
                meta = flash_meta(slots, start, T, cols, n_slots, "offsets")
                cands["flash"] = lambda: flash_attention(q, k, v, T, "offsets", meta)
                if T > 1 and B * T <= 64:
                    meta_r = token_rows_meta(slots, start, T, cols, n_slots)
                    cands["flash rows"] = lambda: flash_attention(q, k, v, 1, "offsets", meta_r)
                knobs = KNOBS if args.full or (B, T) in ((1, 5), (16, 5), (64, 1), (4, 9)) else KNOBS[:1] + [
                    dict(block_n=64, num_warps=4, num_stages=2, target=528),
                    dict(block_n=32, num_warps=4, num_stages=3, target=264)]
                for kn in knobs:
                    cands["split " + ",".join(f"{a}={b}" for a, b in kn.items())] = (
                        lambda kn=kn: split_attention(q, k, v, slots, start, T, span, **kn))
                cands["split default"] = lambda: split_attention(q, k, v, slots, start, T, span)
                for name, fn in cands.items():
                    try:
                        out = fn()
                        err = float((out[: ref.shape[0]].float() - ref).norm() / ref.norm())
                        us = do_bench_cudagraph(fn, rep=20) * 1e3
                    except Exception as exc:  # a knob that does not compile (shared memory) must not sink the run
                        print(f"{label} ctx={ctx} B={B} T={T} {name}: FAILED {type(exc).__name__}: {str(exc)[:200]}",
                              flush=True)
                        continue
                    row = {"model": label, "ctx": ctx, "B": B, "T": T, "kernel": name, "us": round(us, 2),
                           "floor_us": round(floor_us, 2), "x_floor": round(us / floor_us, 2),
                           "rel_err": round(err, 4)}
                    rows.append(row)
                best = min((r for r in rows if r["model"] == label and r["ctx"] == ctx and r["B"] == B
                            and r["T"] == T), key=lambda r: r["us"], default=None)
                for r in rows:
                    if r["model"] == label and r["ctx"] == ctx and r["B"] == B and r["T"] == T and (
                            not r["kernel"].startswith("split ") or r["kernel"] == "split default" or r is best):
                        print(f"{label} ctx={ctx:5d} B={B:3d} T={T}: {r['kernel']:55s} {r['us']:8.2f} us "
                              f"(floor {floor_us:6.2f}, x{r['x_floor']:5.2f}) err {r['rel_err']:.4f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_attention.jsonl"), "w") as f:
        f.write(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbs": round(bw, 1),
                            "torch": torch.__version__}) + "\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Skinny GEMMs (2..64 rows) on the device: a Triton kernel against cuBLAS at the 8B's weight shapes.

Why: a verify step multiplies B x T <= 64 rows by every weight matrix, so it is a weight read; the question was
whether cuBLAS streams the weights at copy bandwidth for so few rows. Measured on an H100 it does (2.0-2.8 TB/s on
the 8B's projections, ``results/gpu_engine_h100.md``) and this kernel won only on the lm_head (~5%, 0.02 ms a
step), so the engine runs every projection through cuBLAS and the kernel lives here. It streams ``W`` once: each
program owns ``BLOCK_N`` output columns, walks K in ``BLOCK_K`` steps and multiplies the (padded to 16) rows with
``tl.dot``.

Per (N, K, M): cuBLAS's time, each kernel config's time (or why it did not run), the faster of them and the weight
bandwidth it reaches. Device-only developer tool; results in ``benchmarks/results/``:

    python3 benchmarks/gpu_gemm.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.engine.cuda_shapes import SHAPES  # noqa: E402

CONFIGS = ((16, 256, 4, 4), (32, 128, 4, 5))  # BLOCK_N, BLOCK_K, num_warps, num_stages
ROWS = (4, 16, 64)
_kernel: Any = None


def _build() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def skinny_gemm(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[:, None] * K + offs_k[None, :]
        m_mask = offs_m[:, None] < M
        n_mask = offs_n[:, None] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=m_mask, other=0.0)
            w = tl.load(w_ptrs, mask=n_mask, other=0.0)
            acc += tl.dot(x, tl.trans(w))
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask & (offs_n[None, :] < N))

    return skinny_gemm


def skinny_linear(x: Tensor, weight: Tensor, cfg: tuple[int, int, int, int]) -> Tensor:
    """``x [..., K] @ weight[N, K].T`` with one kernel config; rows (prod of leading dims) must be <= 64 and K a
    multiple of the config's BLOCK_K."""
    global _kernel
    if _kernel is None:
        _kernel = _build()
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    M, N = x2.shape[0], weight.shape[0]
    bn, bk, warps, stages = cfg
    bm = max(16, 1 << (M - 1).bit_length())
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _kernel[((N + bn - 1) // bn,)](x2, weight, y, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                   num_stages=stages)
    return y.view(*x.shape[:-1], N)


def time_ms(fn, reps: int = 10) -> float:
    """Best of 3 mean times of ``reps`` calls (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / reps)
    return best


@torch.no_grad()
def compare(w: Tensor, M: int) -> dict[str, Any]:
    """One row: cuBLAS and every kernel config on ``M`` random rows times ``w [N, K]``; a config must agree with
    ``F.linear`` (relative error < 1e-2) and beat cuBLAS by 3% to be ``chosen``."""
    N, K = w.shape
    x = torch.randn((M, K), device=w.device, dtype=torch.float32).to(w.dtype)
    ref = F.linear(x, w)
    row: dict[str, Any] = {"N": N, "K": K, "M": M, "cublas_ms": round(time_ms(lambda: F.linear(x, w)), 4)}
    best, best_ms = None, row["cublas_ms"] * 0.97
    for cfg in CONFIGS:
        if K % cfg[1]:
            continue
        try:
            err = float((skinny_linear(x, w, cfg).float() - ref.float()).norm() / ref.float().norm())
            if not err < 1e-2:
                row[f"cfg{cfg}"] = f"error {err:.3g}"
                continue
            ms = time_ms(lambda: skinny_linear(x, w, cfg))
        except Exception as exc:  # no triton, or the kernel does not build here: keep cuBLAS
            row[f"cfg{cfg}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        row[f"cfg{cfg}"] = round(ms, 4)
        if ms < best_ms:
            best, best_ms = cfg, ms
    row["chosen"] = "cublas" if best is None else str(best)
    chosen_ms = row["cublas_ms"] if best is None else best_ms
    row["weight_GBps"] = round(N * K * w.element_size() / (chosen_ms / 1e3) / 1e9, 1)
    return row


def weight_shapes(shape: str = "llama-3.1-8b") -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of a named shape, in the engine's fused layout."""
    a = SHAPES[shape]
    q, kv = a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    return {"wqkv": (q + 2 * kv, a.dim), "wo": (a.dim, q), "w13": (2 * a.intermediate_size, a.dim),
            "w2": (a.dim, a.intermediate_size), "lm_head": (a.vocab_size, a.dim)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_gemm needs a CUDA device", file=sys.stderr)
        return 1
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (N, K) in weight_shapes(args.shape).items():
        w = (torch.randn((N, K), generator=g, device="cuda") * K ** -0.5).to(torch.bfloat16)
        for M in ROWS:
            row = {"weight": name, **compare(w, M)}
            rows.append(row)
            print(f"{name:8s} {N:6d} x {K:5d} M={M:2d}: cuBLAS {row['cublas_ms']:.4f} ms, chosen {row['chosen']} "
                  f"({row['weight_GBps']} GB/s)", flush=True)
        del w
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_gemm.jsonl"), "w") as f:
        f.write(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}) + "\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

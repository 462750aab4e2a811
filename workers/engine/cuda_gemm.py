"""Skinny GEMMs (2..64 rows) in Triton, used per weight shape only where they MEASURE faster than cuBLAS.

Why: a verify step multiplies B x T <= 64 rows by every weight matrix, so it is a weight read. We suspected cuBLAS
of being slow for 4..64 rows; measured on an H100 it is not (2.0-2.8 TB/s on the 8B's projections, see
benchmarks/results/gpu_engine_h100.md): this kernel only won on the lm_head (~5%), so the engine's default is
cuBLAS and this is opt-in (``CudaGraphEngine(gemm="auto")``). The kernel streams ``W`` once: each program owns ``BLOCK_N``
output columns, walks K in ``BLOCK_K`` steps and multiplies the (padded to 16) rows with ``tl.dot``.

``SkinnyLinear`` decides lazily per (N, K, M) the first time a shape runs outside graph capture: it times cuBLAS
and two kernel configs on random data, checks the kernel's result against ``F.linear`` and keeps the faster. During
capture an undecided shape uses cuBLAS (timing would synchronize). ``log`` keeps every decision with its times.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIGS = ((16, 256, 4, 4), (32, 128, 4, 5))  # BLOCK_N, BLOCK_K, num_warps, num_stages
MAX_ROWS = 64
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
    """``x [..., K] @ weight[N, K].T`` with one kernel config; rows (prod of leading dims) must be <= 64."""
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


def _time_ms(fn, reps: int = 10) -> float:
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


class SkinnyLinear:
    """``linear(x, module)``: the Triton kernel where it measured faster for this (N, K, rows), else ``module(x)``."""

    def __init__(self) -> None:
        self.choice: dict[tuple[int, int, int], tuple[int, int, int, int] | None] = {}
        self.log: list[dict[str, Any]] = []

    def __call__(self, x: Tensor, module: nn.Linear) -> Tensor:
        w = module.weight
        M = x.numel() // x.shape[-1]
        if module.bias is not None or M < 2 or M > MAX_ROWS or not w.is_cuda:
            return module(x)
        key = (w.shape[0], w.shape[1], M)
        if key not in self.choice:
            if torch.cuda.is_current_stream_capturing():
                return module(x)
            self.choice[key] = self._decide(w, M)
        cfg = self.choice[key]
        return module(x) if cfg is None else skinny_linear(x, w, cfg)

    @torch.no_grad()
    def _decide(self, w: Tensor, M: int) -> tuple[int, int, int, int] | None:
        N, K = w.shape
        x = torch.randn((M, K), device=w.device, dtype=torch.float32).to(w.dtype)
        ref = F.linear(x, w)
        entry: dict[str, Any] = {"N": N, "K": K, "M": M, "cublas_ms": round(_time_ms(lambda: F.linear(x, w)), 4)}
        best, best_ms = None, entry["cublas_ms"] * 0.97
        for cfg in CONFIGS:
            if K % cfg[1]:
                continue
            try:
                err = float((skinny_linear(x, w, cfg).float() - ref.float()).norm() / ref.float().norm())
                if not err < 1e-2:
                    entry[f"cfg{cfg}"] = f"error {err:.3g}"
                    continue
                ms = _time_ms(lambda: skinny_linear(x, w, cfg))
            except Exception as exc:  # no triton, or the kernel does not build here: keep cuBLAS
                entry[f"cfg{cfg}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            entry[f"cfg{cfg}"] = round(ms, 4)
            if ms < best_ms:
                best, best_ms = cfg, ms
        entry["chosen"] = "cublas" if best is None else str(best)
        chosen_ms = entry["cublas_ms"] if best is None else best_ms
        entry["weight_GBps"] = round(N * K * w.element_size() / (chosen_ms / 1e3) / 1e9, 1)
        self.log.append(entry)
        return best

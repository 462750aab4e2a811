"""``benchmarks/gpu_gemm.py``: the skinny-GEMM Triton kernel it times against cuBLAS computes ``x @ W.T``.

On a CUDA device in bf16 (and the benchmark's row); where triton is installed without a GPU, under triton's CPU
interpreter in float32. The weight shapes it measures are plain Python and always checked.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_gemm import CONFIGS, compare, skinny_linear, weight_shapes
from tests.triton_interp import interpreter_only, run_interpreted

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def worst_error(device: str, dtype: torch.dtype) -> float:
    """Largest relative error of every kernel config against float32 ``x @ W.T`` over a few row counts."""
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn((1000, 512), generator=g, device=device).to(dtype)
    worst = 0.0
    for M in (2, 5, 17, 64):
        x = torch.randn((M, 512), generator=g, device=device).to(dtype)
        ref = x.float() @ w.float().T
        for cfg in CONFIGS:
            worst = max(worst, float((skinny_linear(x, w, cfg).float() - ref).norm() / ref.norm()))
    return worst


def test_weight_shapes_are_the_8b_projections():
    assert weight_shapes() == {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
                               "lm_head": (128256, 4096)}


@cuda
def test_skinny_gemm_matches_cublas_on_cuda():
    assert worst_error("cuda", torch.bfloat16) < 1e-2
    w = torch.randn((1000, 512), device="cuda").to(torch.bfloat16)
    row = compare(w, 12)
    assert row["N"] == 1000 and row["M"] == 12 and row["cublas_ms"] > 0 and row["weight_GBps"] > 0
    assert row["chosen"] in ("cublas", *map(str, CONFIGS))


@interpreter_only
@pytest.mark.slow
def test_skinny_gemm_matches_reference_in_triton_interpreter():
    out = run_interpreted("import torch\nfrom test_gpu_gemm_bench import worst_error\n"
                          "print(worst_error('cpu', torch.float32))\n")
    assert float(out.split()[-1]) < 1e-4

"""The Triton split-KV verify attention (workers/engine/cuda_attention.py) against plain float32 attention.

On a CUDA device the kernel runs for real (bf16 and fp16, GQA groups, T from 1 to 16, several split counts). Where
triton is installed but there is no GPU, the same kernel runs under triton's CPU interpreter (float32, fp16: the
interpreter's bf16 dot is not faithful). CI installs no triton and has no GPU: those two skip there; the split
planner is plain Python and always runs.
"""
from __future__ import annotations

import pytest
import torch

from tests.triton_interp import interpreter_only, run_interpreted
from workers.engine.cuda_attention import flash_layout, plan_splits

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("B,Hkv,keys,block", [(1, 8, 517, 64), (16, 8, 517, 64), (64, 8, 2057, 32), (4, 1, 30, 64),
                                               (2, 8, 4096, 64)])
def test_plan_splits_covers_every_key_and_fills_the_gpu(B, Hkv, keys, block):
    splits, chunk = plan_splits(B, Hkv, keys, block)
    assert chunk % block == 0
    assert splits * chunk >= keys > (splits - 1) * chunk  # every key in exactly one split, no empty split
    assert splits == 1 or chunk >= 128 - block  # no split far below MIN_SPLIT_KEYS
    # a short row (512 keys) in a grid planned for the longest still keeps the GPU busy: ~264 programs, or as many
    # as 128-key splits allow
    short = min(keys, 512)
    busy = B * Hkv * -(-short // chunk)
    assert busy >= min(264, B * Hkv * max(1, short // 128)) // 2


def test_flash_layout_says_why_flash_cannot_run():
    """Where FA2's op does not run (here: on CPU), the probe answers None and why, layout by layout, and raises
    nothing: the engine then takes its portable path."""
    layout, why = flash_layout(16, torch.float32, torch.device("cpu"))
    assert layout is None and why.startswith("paged: ") and "; offsets: " in why


def _grid(device: str, dtypes) -> float:
    from workers.engine.cuda_attention import worst_error

    cases = ((1, 1, (300,), 320), (3, 5, (0, 131, 400), 448), (2, 9, (64, 0), 128), (1, 16, (7,), 128))
    return max(worst_error(H, Hkv, D, dtype, torch.device(device), cases, cols=512, seed=1)
               for dtype in dtypes for H, Hkv, D in ((8, 2, 64), (32, 8, 128), (4, 4, 32)))


@cuda
def test_split_attention_matches_reference_on_cuda():
    assert _grid("cuda", (torch.bfloat16, torch.float16)) < 2e-2


@interpreter_only
@pytest.mark.slow
def test_split_attention_matches_reference_in_triton_interpreter():
    out = run_interpreted("import torch\nfrom test_cuda_attention import _grid\n"
                          "print(_grid('cpu', (torch.float32,)))\n")
    assert float(out.split()[-1]) < 1e-4

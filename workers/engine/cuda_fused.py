"""Fused glue kernels (Triton) for the CUDA engine's static forward: fewer, bigger kernels per layer.

Why: at small batch an 8B verify step is a weight read (~5.5 ms on an H100), and what sits above that floor is
mostly ~25 tiny kernels a layer (norms, rope, cache writes, residual adds, silu*up), a few microseconds each even
when replayed from a CUDA graph. Three kernels replace most of them:

* ``add_rms_norm(x, r, w)``: the residual add and the next RMSNorm in one pass (``x + r`` and ``norm(x + r) * w``);
* ``silu_mul(gu)``: ``silu(gate) * up`` straight from the fused w1|w3 projection output;
* ``rope_kv(qkv, ...)``: rotary embedding of q and k, the K/V cache writes at ``(slot, min(start + t, cols-1))``
  and a contiguous q for the attention, from the fused wqkv projection output (replaces ~7 kernels).

Math in float32, one rounding to the activation dtype at the end (the portable torch glue rounds after every op;
both are within bf16 error of the float32 reference). The row count is a runtime argument: one compile per dtype
and width, reused by every (batch, tokens) bucket. The engine's fused path (``cuda_engine.FusedOps``) runs them
once ``self_check`` passes at engine start.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_k: dict[str, Any] = {}


def _build() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, xo_ptr, h_ptr, N, eps, HAS_R: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_R:
            xr = (x + tl.load(r_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)).to(xo_ptr.dtype.element_ty)
            tl.store(xo_ptr + row * N + offs, xr, mask=m)
            x = xr.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * N + offs, (x * rstd * w).to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def silu_mul_kernel(gu_ptr, out_ptr, I, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < I
        g = tl.load(gu_ptr + row * 2 * I + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * I + I + offs, mask=m, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row * I + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, start_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, T, cols, H, HKV,
                       HALF: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        b = row // T
        pos = tl.load(start_ptr + b).to(tl.int64) + row % T
        wpos = tl.minimum(pos, cols - 1)
        offs = tl.arange(0, HALF)
        src = qkv_ptr + row.to(tl.int64) * ((H + 2 * HKV) * D) + head * D
        x1 = tl.load(src + offs).to(tl.float32)
        x2 = tl.load(src + HALF + offs).to(tl.float32)
        c1 = tl.load(cos_ptr + wpos * D + offs)
        c2 = tl.load(cos_ptr + wpos * D + HALF + offs)
        s1 = tl.load(sin_ptr + wpos * D + offs)
        s2 = tl.load(sin_ptr + wpos * D + HALF + offs)
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
        if head < H:
            dst = q_ptr + (row.to(tl.int64) * H + head) * D
            tl.store(dst + offs, o1.to(q_ptr.dtype.element_ty))
            tl.store(dst + HALF + offs, o2.to(q_ptr.dtype.element_ty))
        else:
            j = head - H
            cell = ((tl.load(slot_ptr + b).to(tl.int64) * cols + wpos) * HKV + j) * D
            tl.store(k_ptr + cell + offs, o1.to(k_ptr.dtype.element_ty))
            tl.store(k_ptr + cell + HALF + offs, o2.to(k_ptr.dtype.element_ty))
            vsrc = src + HKV * D  # v head j sits HKV heads after k head j
            tl.store(v_ptr + cell + offs, tl.load(vsrc + offs))
            tl.store(v_ptr + cell + HALF + offs, tl.load(vsrc + HALF + offs))

    return {"add_rms_norm": add_rms_norm_kernel, "silu_mul": silu_mul_kernel, "rope_kv": rope_kv_kernel}


def _kernels() -> dict[str, Any]:
    if not _k:
        _k.update(_build())
    return _k


def add_rms_norm(x: Tensor, r: Tensor | None, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(x + r, rms_norm(x + r) * w)`` over the last dim (``r=None``: ``(x, rms_norm(x) * w)``)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    h = torch.empty_like(x2)
    xo = torch.empty_like(x2) if r is not None else x2
    r2 = r.reshape(-1, N) if r is not None else x2
    block = 1 << (N - 1).bit_length()
    _kernels()["add_rms_norm"][(x2.shape[0],)](x2, r2, w, xo, h, N, eps, HAS_R=r is not None, BLOCK=block,
                                               num_warps=8 if block >= 2048 else 4)
    return xo.view(x.shape), h.view(x.shape)


def silu_mul(gu: Tensor) -> Tensor:
    """``silu(gate) * up`` where ``gu = [..., gate | up]`` (the fused w1|w3 output)."""
    I = gu.shape[-1] // 2
    g2 = gu.reshape(-1, 2 * I)
    out = torch.empty((g2.shape[0], I), dtype=gu.dtype, device=gu.device)
    block = 1024
    _kernels()["silu_mul"][(g2.shape[0], -(-I // block))](g2, out, I, BLOCK=block, num_warps=4)
    return out.view(*gu.shape[:-1], I)


def rope_kv(qkv: Tensor, cos: Tensor, sin: Tensor, start: Tensor, slots: Tensor, k_cache: Tensor,
            v_cache: Tensor, H: int, T: int) -> Tensor:
    """Rotate q and k of ``qkv [B*T, (H + 2*Hkv) * D]`` (positions ``start[b] + t``), write k and v into the
    caches ``[slots, cols, Hkv, D]`` at ``(slots[b], min(start[b] + t, cols - 1))``; return q ``[B*T, H, D]``."""
    _, cols, Hkv, D = k_cache.shape
    BT = qkv.shape[0]
    q = torch.empty((BT, H, D), dtype=qkv.dtype, device=qkv.device)
    _kernels()["rope_kv"][(BT, H + Hkv)](qkv, cos, sin, start, slots, q, k_cache, v_cache, T, cols, H, Hkv,
                                          HALF=D // 2, D=D, num_warps=1 if D <= 128 else 2)
    return q


def self_check(dim: int, inter: int, H: int, Hkv: int, D: int, dtype: torch.dtype, device: torch.device
               ) -> str | None:
    """Run the three kernels once at the model's widths against plain torch; None if they agree, else why not
    (no triton, a build error, a mismatch): the engine then keeps the unfused glue."""
    import torch.nn.functional as F

    try:
        g = torch.Generator(device=device).manual_seed(0)
        rnd = lambda *s: torch.randn(s, generator=g, device=device).to(dtype)  # noqa: E731
        x, r, w = rnd(3, dim), rnd(3, dim), rnd(dim)
        xo, h = add_rms_norm(x, r, w, 1e-5)
        ref = F.rms_norm(x.float() + r.float(), (dim,), w.float(), 1e-5)
        errs = {"add_rms_norm": float((h.float() - ref).norm() / ref.norm())}
        gu = rnd(3, 2 * inter)
        ref = F.silu(gu[:, :inter].float()) * gu[:, inter:].float()
        errs["silu_mul"] = float((silu_mul(gu).float() - ref).norm() / ref.norm())
        T, cols = 3, 8
        qkv = rnd(T, (H + 2 * Hkv) * D)
        ang = torch.rand((cols, D // 2), generator=g, device=device) * 6
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        kc, vc = torch.zeros((2, cols, Hkv, D), dtype=dtype, device=device), torch.zeros((2, cols, Hkv, D),
                                                                                        dtype=dtype, device=device)
        one = torch.ones(1, dtype=torch.long, device=device)
        q = rope_kv(qkv, cos, sin, one * 6, one, kc, vc, H, T)  # positions 6, 7, 7 (clamped): last write wins
        x4 = qkv.float().view(T, H + 2 * Hkv, D)
        pos = torch.tensor([6, 7, 7], device=device)
        rot = x4[:, :H + Hkv] * cos[pos][:, None] + torch.cat((-x4[:, :H + Hkv, D // 2:], x4[:, :H + Hkv, :D // 2]),
                                                               -1) * sin[pos][:, None]
        errs["rope_q"] = float((q.float() - rot[:, :H]).norm() / rot[:, :H].norm())
        errs["rope_k"] = float((kc[1, 6].float() - rot[0, H:]).norm() / rot[0, H:].norm())
        errs["v"] = float((vc[1, 6].float() - x4[0, H + Hkv:]).norm())
        bad = {k: v for k, v in errs.items() if not v < 2e-2}
        return f"mismatch {bad}" if bad else None
    except Exception as exc:  # no triton here, or the kernels do not build on this device
        return f"{type(exc).__name__}: {str(exc)[:300]}"

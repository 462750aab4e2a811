"""The CUDA engine's attention, three ways: split-KV (Triton) for verify rows, FA2's varlen kernel for prefill
rows, gather + SDPA where neither runs (CPU, float32, a torch without the flash op).

Split-KV attention for verify steps: T draft tokens per row, query heads packed by KV head.

Why: a verify step has T = gamma + 1 queries per row over that row's slot. FA2 (as torch ships it) takes its fast
split-KV, GQA-packed kernel only for one-query rows; for T > 1 it runs its plain kernel, B x H blocks that each
stream the row's keys alone, so every key is read H / Hkv times and a small batch fills few SMs (measured on an
H200: 40-80 us a layer at B=16 T=5 ctx 512 for 32 MB of KV, ~11 us of bandwidth). Running each token as its own
one-query row wins only up to B x T ~ 20 because it re-reads the keys once per token
(``benchmarks/gpu_attention.py`` measures both).

This kernel does what a verify step needs and nothing else:

* one program per (row, KV head, split of the row's keys): its ``T x G`` queries (G = H / Hkv query heads sharing
  the KV head, times T tokens) form ONE tile, so each key and value is read once per KV head, and the splits
  spread a small batch over the whole GPU;
* causality by position: query t of row b sees the keys ``<= start_b + t`` of slot ``slots_b``, read in place
  from the engine's cache ``[slots, cols, Hkv, D]`` (no gather, no page table);
* the splits' partial outputs and log-sum-exps are merged by a second small kernel (skipped with one split).

The grid depends only on (B, T, span), so a CUDA graph per bucket captures it. Math in float32, output in the
activation dtype. ``split_attention`` is checked against SDPA at engine start (``self_check``).

Prefill rows (longer than the largest token bucket) take ``flash_attention``: FA2's varlen kernel, made for long
queries, reading each row's slot in place. Everything here reads the same cache layout and the same causal rule.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_k: dict[str, Any] = {}
TARGET_PROGRAMS = 264  # ~2 programs per SM on an H100/H200 (132 SMs): enough in flight to stream the KV
MIN_SPLIT_KEYS = 128   # fewer keys a split and the merge costs more than the parallelism gains
SHORT_ROW = 512        # the grid is planned for the longest row; rows this short still get ~TARGET_PROGRAMS


def _build() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, start_ptr, o_ptr, lse_ptr, out_ptr,
                       T, G, H, HKV, cols, chunk, NSPLIT, scale,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        start = tl.load(start_ptr + b).to(tl.int64)
        m = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        t = m // G
        head = kvh * G + m % G
        valid_m = m < T * G
        q_rows = (b * T + t).to(tl.int64) * H + head  # [BLOCK_M] row index into q viewed as [B*T*H, D]
        q = tl.load(q_ptr + q_rows[:, None] * D + d[None, :], mask=valid_m[:, None], other=0.0)
        pos = start + t  # the last key each query sees
        lo = split.to(tl.int64) * chunk
        hi = tl.minimum(lo + chunk, start + T)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        kv_base = (slot * cols) * HKV + kvh
        qk_scale = scale * 1.4426950408889634  # exp2
        for n0 in range(lo, hi, BLOCK_N):  # the row's own keys only: a split past its end does no work
            n = n0 + tl.arange(0, BLOCK_N)
            valid_n = n < hi
            cell = (kv_base + n.to(tl.int64) * HKV) * D
            k = tl.load(k_ptr + cell[:, None] + d[None, :], mask=valid_n[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            see = valid_n[None, :] & (n[None, :] <= pos[:, None])
            s = tl.where(see, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            v = tl.load(v_ptr + cell[:, None] + d[None, :], mask=valid_n[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        if SINGLE:
            tl.store(out_ptr + q_rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=valid_m[:, None])
        else:
            # natural-log lse of the split (-inf when it saw no key), for the merge
            lse = tl.where(has, m_i / 1.4426950408889634 + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
            cell_o = ((b * HKV + kvh) * NSPLIT + split).to(tl.int64) * BLOCK_M + m
            tl.store(lse_ptr + cell_o, lse, mask=valid_m)
            # a query that saw no key here stores only its lse (-inf): the merge never reads its output, so a
            # split past a row's end (the grid is planned for the longest row) writes next to nothing
            tl.store(o_ptr + cell_o[:, None] * D + d[None, :], out, mask=(valid_m & has)[:, None])

    @triton.jit
    def merge_kernel(o_ptr, lse_ptr, out_ptr, T, G, H, HKV, NSPLIT,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS: tl.constexpr):
        r = tl.program_id(0)  # query row b*T + t
        head = tl.program_id(1)
        b = r // T
        t = r % T
        kvh = head // G
        m = t * G + head % G
        s = tl.arange(0, SPLITS)
        valid = s < NSPLIT
        cell = ((b * HKV + kvh) * NSPLIT + s).to(tl.int64) * BLOCK_M + m
        lse = tl.load(lse_ptr + cell, mask=valid, other=float("-inf"))
        top = tl.max(lse, 0)
        seen = lse != float("-inf")
        w = tl.where(seen, tl.exp(lse - top), 0.0)
        d = tl.arange(0, D)
        o = tl.load(o_ptr + cell[:, None] * D + d[None, :], mask=(valid & seen)[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out_ptr + (r.to(tl.int64) * H + head) * D + d, out.to(out_ptr.dtype.element_ty))

    return {"partial": partial_kernel, "merge": merge_kernel}


def _kernels() -> dict[str, Any]:
    if not _k:
        _k.update(_build())
    return _k


def plan_splits(B: int, Hkv: int, keys: int, block_n: int, target: int = TARGET_PROGRAMS,
                min_keys: int = MIN_SPLIT_KEYS, short: int = SHORT_ROW) -> tuple[int, int]:
    """``(splits, keys per split)`` for rows of at most ``keys`` keys: enough programs to fill the GPU
    (``B * Hkv * splits ~ target``) even when the rows hold only ``short`` keys (the grid is static, planned for
    the longest row; a split past a row's end exits at once), no split under ``min_keys`` keys; keys per split a
    multiple of ``block_n``."""
    want = max(1, -(-target * -(-keys // short) // (B * Hkv)))
    splits = max(1, min(want, keys // min_keys))
    chunk = -(-keys // splits)
    chunk = -(-chunk // block_n) * block_n
    return -(-keys // chunk), chunk


def split_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, start: Tensor, T: int,
                    span: int, *, block_n: int = 32, num_warps: int = 4, num_stages: int = 3,
                    target: int = TARGET_PROGRAMS) -> Tensor:
    """Causal attention of q ``[B*T, H, D]`` (row b's token t at position ``start[b] + t``) over the keys
    ``0 .. start[b] + t`` of cache slot ``slots[b]`` (``[slots, cols, Hkv, D]``). ``span`` bounds
    ``start[b] + (valid tokens)`` of every row (the engine's span bucket): it sizes the static grid.
    The keyword arguments are tuning knobs: ``benchmarks/gpu_attention.py`` swept 24 settings on an H100 over 10
    shapes (8B and 1B heads, B 1-64, T 1-9, ctx 512/2048); these defaults were within 6% of each shape's best."""
    BT, H, D = q.shape
    B = BT // T
    Hkv, cols = k_cache.shape[2], k_cache.shape[1]
    G = H // Hkv
    block_m = max(16, 1 << (T * G - 1).bit_length())
    keys = min(span + T, cols)
    splits, chunk = plan_splits(B, Hkv, keys, block_n, target)
    out = torch.empty_like(q)
    single = splits == 1
    if single:
        o = lse = out  # unused
    else:
        o = torch.empty((B, Hkv, splits, block_m, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, Hkv, splits, block_m), dtype=torch.float32, device=q.device)
    kern = _kernels()
    kern["partial"][(B, Hkv, splits)](q, k_cache, v_cache, slots, start, o, lse, out, T, G, H, Hkv, cols, chunk,
                                      splits, D ** -0.5, D=D, BLOCK_M=block_m, BLOCK_N=block_n,
                                      SINGLE=single, num_warps=num_warps, num_stages=num_stages)
    if not single:
        kern["merge"][(BT, H)](o, lse, out, T, G, H, Hkv, splits, D=D, BLOCK_M=block_m,
                               SPLITS=max(2, 1 << (splits - 1).bit_length()), num_warps=1)
    return out


def reference_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, start: Tensor, T: int) -> Tensor:
    """The same attention in plain float32 torch (SDPA per row): what ``split_attention`` is checked against."""
    BT, H, D = q.shape
    B = BT // T
    G = H // k_cache.shape[2]
    out = torch.empty((BT, H, D), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(start[b]) + T
        k = k_cache[int(slots[b]), :n].float().repeat_interleave(G, 1).transpose(0, 1)  # [H, n, D]
        v = v_cache[int(slots[b]), :n].float().repeat_interleave(G, 1).transpose(0, 1)
        qb = q[b * T:(b + 1) * T].float().transpose(0, 1)  # [H, T, D]
        mask = torch.arange(n, device=q.device)[None, :] <= (int(start[b]) + torch.arange(T, device=q.device))[:, None]
        out[b * T:(b + 1) * T] = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask).transpose(0, 1)
    return out


def worst_error(H: int, Hkv: int, D: int, dtype: torch.dtype, device: torch.device,
                cases: Sequence[tuple[int, int, Sequence[int], int]], cols: int, seed: int = 0) -> float:
    """Largest relative error of ``split_attention`` against ``reference_attention`` over ``cases`` of
    ``(B, T, starts, span)`` on random queries and a random ``[B + 2, cols, Hkv, D]`` cache (rows in shuffled
    slots). Raises ``ValueError`` if an output has the wrong shape or dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_slots = max(b for b, *_ in cases) + 2
    k, v = (torch.randn((n_slots, cols, Hkv, D), generator=g, device=device).to(dtype) for _ in range(2))
    worst = 0.0
    for B, T, starts, span in cases:
        q = torch.randn((B * T, H, D), generator=g, device=device).to(dtype)
        slots = torch.tensor([n_slots - 1 - 2 * b % n_slots for b in range(B)], device=device)
        start = torch.tensor(list(starts), device=device)
        ref = reference_attention(q, k, v, slots, start, T)
        out = split_attention(q, k, v, slots, start, T, span)
        if out.shape != q.shape or out.dtype != dtype:
            raise ValueError(f"split_attention gave {tuple(out.shape)} {out.dtype} for {tuple(q.shape)} {dtype}")
        worst = max(worst, float((out.float() - ref).norm() / ref.norm()))
    return worst


SELF_CHECK_CASES = ((3, 1, (0, 700, 17), 768), (3, 5, (0, 300, 900), 1000), (2, 9, (130, 5), 256), (1, 16, (40,), 128))


def self_check(H: int, Hkv: int, D: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Run ``split_attention`` on random data (several T, starts and split counts) against the float32
    reference; None if it agrees, else why not (no triton, a build error, a mismatch)."""
    try:
        worst = worst_error(H, Hkv, D, dtype, device, SELF_CHECK_CASES, cols=1024)
        return None if worst < 2e-2 else f"relative error {worst:.3g}"
    except Exception as exc:  # no triton here, or the kernel does not build on this device
        return f"{type(exc).__name__}: {str(exc)[:300]}"


# ----------------------------------------------------------------------------------------------- prefill rows: FA2
PAGE = 256  # FA2's paged-KV page size (it wants a multiple of 256): the engine rounds its cache columns up to it
FLASH_LAYOUTS = ("paged", "offsets")  # how the cache is handed to FA2; flash_layout() picks the one this torch runs


def flash_meta(slots: Tensor, start: Tensor, T: int, cols: int, n_slots: int, layout: str
               ) -> tuple[Tensor, Tensor, Tensor]:
    """``(cu_seqlens_q, page table | key offsets, seqused_k)`` of one step: the same for every layer, so the engine
    builds them once a step. ``seqused_k[b] = start_b + T``: FA2 aligns the causal mask bottom-right, so query t
    sees keys ``<= start_b + t``."""
    B = slots.shape[0]
    cu_q = torch.arange(0, B * T + 1, T, device=slots.device, dtype=torch.int32)
    if layout == "paged":
        pps = cols // PAGE
        table = slots[:, None] * pps + torch.arange(pps, device=slots.device)[None, :]
    else:
        table = torch.cat([slots * cols, slots.new_full((1,), n_slots * cols)])
    return cu_q, table.to(torch.int32), (start + T).to(torch.int32)


def flash_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, T: int, layout: str,
                    meta: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Causal attention of q ``[B*T, H, D]`` over each row's own slot of the cache ``[slots, cols, Hkv, D]``, read
    in place by FA2's varlen kernel (GQA native). ``layout="paged"``: the cache is a pool of 256-token pages and
    row b's page table is its slot's pages (torch >= 2.13 takes a ``block_table``). ``layout="offsets"``: the
    cache is one flat key sequence and row b's keys start at ``slot_b * cols`` (``cu_seqlens_k`` as offsets, the
    lengths from ``seqused_k``; what torch 2.11 runs). ``meta``: ``flash_meta(...)`` of the step."""
    n_slots, cols, Hkv, D = k_cache.shape
    cu_q, table, seqused = meta
    if layout == "paged":
        pps = cols // PAGE
        return torch.ops.aten._flash_attention_forward(
            q, k_cache.view(n_slots * pps, PAGE, Hkv, D), v_cache.view(n_slots * pps, PAGE, Hkv, D), cu_q, cu_q, T,
            cols, 0.0, True, False, seqused_k=seqused, block_table=table)[0]
    return torch.ops.aten._flash_attention_forward(
        q, k_cache.view(n_slots * cols, Hkv, D), v_cache.view(n_slots * cols, Hkv, D), cu_q, table, T, cols, 0.0,
        True, False, seqused_k=seqused)[0]


def flash_layout(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[str | None, str]:
    """``(layout, "")`` for the first of ``FLASH_LAYOUTS`` that this torch build runs and that agrees with the
    float32 reference on random data, else ``(None, why not)``."""
    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, Hkv, cols = 3, 4, 8, 2, 2 * PAGE
    q = torch.randn((B * T, H, head_dim), generator=g, device=device).to(dtype)
    k, v = (torch.randn((B + 1, cols, Hkv, head_dim), generator=g, device=device).to(dtype) for _ in range(2))
    slots = torch.tensor([2, 0, 3], device=device)
    start = torch.tensor([0, 300, 17], device=device)
    ref = reference_attention(q, k, v, slots, start, T)
    why = []
    for layout in FLASH_LAYOUTS:
        try:
            out = flash_attention(q, k, v, T, layout, flash_meta(slots, start, T, cols, B + 1, layout))
            err = float((out.float() - ref).norm() / ref.norm())
            if err < 2e-2:
                return layout, ""
            why.append(f"{layout}: relative error {err:.3g}")
        except Exception as exc:  # the op is missing or rejects these arguments in this build
            why.append(f"{layout}: {type(exc).__name__}: {str(exc)[:300]}")
    return None, "; ".join(why)


# ----------------------------------------------------------------------------------------------- portable: SDPA
def gather_mask(positions: Tensor, span: int, group: int) -> Tensor:
    """``[B, 1, group*T, span]`` mask for ``sdpa_gather_attention``: key j is seen by token t of row b iff
    ``j <= positions[b, t]``; row ``g*T + t`` of the grouped queries is token t."""
    mask = torch.arange(span, device=positions.device)[None, None, None, :] <= positions[:, None, :, None]
    return mask.repeat(1, 1, group, 1)


def sdpa_gather_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, mask: Tensor, T: int
                          ) -> Tensor:
    """The portable attention (CPU, float32, no flash op): gather each row's first ``span`` cache columns and run
    SDPA with the position mask (``gather_mask``). Query heads are grouped by KV head, so K/V are not expanded."""
    BT, H, D = q.shape
    B, span = slots.shape[0], mask.shape[-1]
    Hkv = k_cache.shape[2]
    G = H // Hkv
    keys = k_cache[:, :span].index_select(0, slots).transpose(1, 2)  # [B, Hkv, S, D]
    values = v_cache[:, :span].index_select(0, slots).transpose(1, 2)
    qg = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
    y = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)  # [B, Hkv, G*T, D]
    return y.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(BT, H, D)

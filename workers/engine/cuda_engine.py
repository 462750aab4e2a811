"""CUDA target engine: our Llama (``llama.py``) run as a static-shape forward, replayed from CUDA graphs.

Why: at small batch a verify step of an 8B model is a weight read (~16 GB, ~5 ms on an H100), but the eager path
launches ~30 kernels per layer from Python and has data-dependent shapes. Here every shape is fixed per bucket
``(batch B, tokens T)`` so one graph per bucket replays the whole forward with no Python in the loop (the
attention kernels read each row's length at run time; only the portable SDPA path also buckets the span ``S``).
``capture()`` records every bucket up front (the workers do it at start, ``serving.capture_graphs``); a call
whose rows include some longer than the largest token bucket (prefill chunks) runs those rows eagerly, apart:

* the cache is the engine's own, ``[num_slots + 1, cols, Hkv, D]`` per layer: the last slot is the *padding
  slot* and ``cols`` = max_context + the largest token bucket, rounded up to 256-token pages. A call is padded up
  to the smallest (B, T) bucket: dummy rows point at the padding slot; every token, padding included, writes its
  K/V at ``length + t`` of its own slot, i.e. past the slot's length (harmless, like stale entries after a
  rollback), so the write is one index_put of static shape;
* attention (CUDA, bf16/fp16) reads each row's KV in place, once per KV head: by default the Triton split-KV
  kernel of ``cuda_attention`` (all T x G queries of a KV head in one tile, keys split across programs), else
  FA2's flash attention from torch (``seqused_k = length + T``, causal bottom-right, GQA native).
  Elsewhere (CPU, float32, a torch without the op) the portable path gathers the first ``S`` columns of each row's
  slot (``S`` = the smallest span bucket >= the batch's longest ``length + n``) and runs SDPA with a position mask,
  query heads grouped by KV head (``[B, Hkv, G*T, D]``) so K/V are not expanded;
* the step's integers (tokens, slots, lengths, counts) travel in ONE host-to-device copy into the bucket's static
  input buffer; positions, page tables, rope rows and write indices are derived inside the graph.

``graphs=False`` runs the same static-shape forward eagerly: that is how the CPU tests check it against the eager
engine (``torch_engine.py``), which stays the reference. Shapes past the largest bucket (long prefill chunks, more
rows than the largest batch bucket) also run eagerly, so any call is served.
Rollback is a length change (``SlotTable``), as in every backend.
"""
from __future__ import annotations

import bisect
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.engine.base import EngineError, EngineInfo
from workers.engine.llama import ModelArgs, Transformer, apply_rope, rope_table
from workers.engine.slots import SlotTable, SlotTableEngine

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 9, 12, 16)  # gamma+1 for gamma in 0..8 pads little
FUSE_DEFAULT = "triton"  # 19-30% faster on an H200 (benchmarks/results/gpu_engine_h100.md); else falls back to "hoist"
# flash token rows (one one-query row per token) only up to this many B x T: measured on an H200, a win up to
# B x T = 20 (ctx 2048 B=1 T=5: 7.19 -> 5.50 ms), a loss from 36 (B=4 T=9 ctx 2048: 7.47 -> 10.23 ms)
TOKEN_ROWS_MAX = 20
VERIFY_ATTN = ("split", "flash")  # the attention kernel of the fused path: see CudaGraphEngine(verify_attn=...)
SPAN_STEP = 128  # attention span buckets: multiples of this (a finer step reads fewer stale cache columns)


def span_buckets(max_context: int, step: int = SPAN_STEP) -> list[int]:
    """Static attention spans: step, 2*step, ... up to max_context (always included)."""
    spans = list(range(step, max_context, step))
    return spans + [max_context]


PAGE = 256  # flash-attention's paged-KV page size (FA2 wants a multiple of 256)
FLASH_MODES = ("paged", "offsets")  # attention that reads each row's KV in place (flash, and the split kernel)


FLASH_ERRORS: list[str] = []  # why the flash paths were rejected on this machine (diagnostics)


def flash_meta(slots: Tensor, T: int, cols: int, n_slots: int, mode: str, token_rows: bool = False
               ) -> tuple[Tensor, Tensor]:
    """``(cu_seqlens_q, page table | cu_seqlens_k offsets)`` of one step: the same for every layer, so the static
    forward builds them once per step (``hoist``) instead of ~5 tiny kernels per layer. ``token_rows``: every
    token is its own one-query row over its row's slot (see ``flash_paged_attention``)."""
    if token_rows and T > 1:
        slots, T = slots.repeat_interleave(T), 1
    B = slots.shape[0]
    cu_q = torch.arange(0, B * T + 1, T, device=slots.device, dtype=torch.int32)
    if mode == "paged":
        pps = cols // PAGE
        return cu_q, (slots[:, None] * pps + torch.arange(pps, device=slots.device)[None, :]).to(torch.int32)
    return cu_q, torch.cat([slots * cols, slots.new_full((1,), n_slots * cols)]).to(torch.int32)


def flash_seqused(start: Tensor, T: int, token_rows: bool = False) -> Tensor:
    """FA2's ``seqused_k``: ``start + T`` a row, or ``start + t + 1`` a token with ``token_rows``."""
    if token_rows and T > 1:
        return (start[:, None] + torch.arange(1, T + 1, device=start.device)[None, :]).flatten().to(torch.int32)
    return (start + T).to(torch.int32)


def flash_paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor, seqused: Tensor,
                          T: int, mode: str = "paged", meta: tuple[Tensor, Tensor] | None = None,
                          token_rows: bool = False) -> Tensor:
    """Causal attention of q ``[B*T, H, D]`` over each row's own slot, read in place (no gather copy).

    ``mode="paged"``: the cache ``[slots, cols, Hkv, D]`` is a pool of 256-token pages and row b's page table is
    its slot's pages. ``mode="offsets"``: the cache is one flat key sequence and row b's keys start at
    ``slot_b * cols`` (``cu_seqlens_k`` as offsets, lengths from ``seqused_k``). Either way
    ``seqused[b] = start_b + T`` and FA2 aligns the causal mask bottom-right: query t sees keys ``<= start_b + t``.
    ``meta``: ``flash_meta(...)`` precomputed for the step.

    ``token_rows`` (T > 1): each of the B*T queries is its own row of one query over its row's slot, with
    ``seqused = start + t + 1`` (causality by length). Why: FA2 only takes its split-KV, GQA-packed decode kernel
    for one-query rows; with T > 1 queries per row its plain kernel runs B x H blocks that each stream the row's
    keys alone (measured on an H200: 40 us a layer at B=1 T=5 ctx 512, against 11 us at T=1).
    """
    n_slots, cols, Hkv, D = k_pool.shape
    cu_q, tk = meta if meta is not None else flash_meta(slots, T, cols, n_slots, mode, token_rows)
    if token_rows:
        T = 1
    if mode == "paged":
        pps = cols // PAGE
        out = torch.ops.aten._flash_attention_forward(
            q, k_pool.view(n_slots * pps, PAGE, Hkv, D), v_pool.view(n_slots * pps, PAGE, Hkv, D), cu_q, cu_q, T,
            cols, 0.0, True, False, seqused_k=seqused, block_table=tk)
    else:
        out = torch.ops.aten._flash_attention_forward(
            q, k_pool.view(n_slots * cols, Hkv, D), v_pool.view(n_slots * cols, Hkv, D), cu_q, tk, T, cols,
            0.0, True, False, seqused_k=seqused)
    return out[0]


def sdpa_gather_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, mask: Tensor, T: int
                          ) -> Tensor:
    """The portable path (CPU, and CUDA when the flash op is missing): gather each row's first ``span`` cache
    columns and run SDPA with the position mask. Query heads are grouped by KV head, so K/V are not expanded."""
    BT, H, D = q.shape
    B, span = slots.shape[0], mask.shape[-1]
    Hkv = k_cache.shape[2]
    G = H // Hkv
    keys = k_cache[:, :span].index_select(0, slots).transpose(1, 2)  # [B, Hkv, S, D]
    values = v_cache[:, :span].index_select(0, slots).transpose(1, 2)
    qg = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
    y = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)  # [B, Hkv, G*T, D]
    return y.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(BT, H, D)


def flash_mode(head_dim: int, dtype: torch.dtype, device: torch.device, token_rows: str | None = None
               ) -> str | None:
    """Which flash path ("paged", "offsets") runs in this torch build and agrees with SDPA on random data.
    ``token_rows=mode``: check that mode's one-query-per-token form instead (returns the mode or None)."""
    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, Hkv, cols = 3, 4, 8, 2, 2 * PAGE
    q = torch.randn((B * T, H, head_dim), generator=g, device=device).to(dtype)
    k, v = (torch.randn((B + 1, cols, Hkv, head_dim), generator=g, device=device).to(dtype) for _ in range(2))
    slots = torch.tensor([2, 0, 3], device=device)
    start = torch.tensor([0, 300, 17], device=device)
    pos = start[:, None] + torch.arange(T, device=device)[None, :]
    mask = (torch.arange(cols, device=device)[None, None, None, :] <= pos[:, None, :, None]).repeat(1, 1, H // Hkv, 1)
    ref = sdpa_gather_attention(q.float(), k.float(), v.float(), slots, mask, T)
    for mode in FLASH_MODES if token_rows is None else (token_rows,):
        rows = token_rows is not None
        try:
            out = flash_paged_attention(q, k, v, slots, flash_seqused(start, T, rows), T, mode,
                                        token_rows=rows)
            err = float((out.float() - ref).norm() / ref.norm())
            if err < 2e-2:
                return mode
            FLASH_ERRORS.append(f"{mode}{' token rows' if rows else ''}: relative error {err:.3g}")
        except Exception as exc:  # the op is missing or rejects these arguments in this build
            FLASH_ERRORS.append(f"{mode}: {type(exc).__name__}: {str(exc)[:300]}")
    return None


def _triton_check(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused Triton glue cannot run here (None: it runs and agrees with torch at this model's widths)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "needs CUDA and a half dtype"
    from workers.engine.cuda_fused import self_check

    return self_check(args.dim, args.intermediate_size, args.n_head, args.n_kv_head, args.head_dim, dtype, device)


def _module_linear(x: Tensor, module: torch.nn.Linear) -> Tensor:
    return module(x)


FUSE_MODES = ("off", "hoist", "triton")


def static_forward(model: Transformer, caches: list[tuple[Tensor, Tensor]], rope: tuple[Tensor, Tensor],
                   tokens: Tensor, slots: Tensor, start: Tensor, counts: Tensor, span: int, attn: str,
                   linear: Callable[[Tensor, torch.nn.Linear], Tensor] = _module_linear, fuse: str = "off",
                   token_rows: bool = False, split: bool = False) -> Tensor:
    """Logits ``[B*T, vocab]`` for tokens ``[B, T]``; every shape depends on (B, T, span) only (graph-capturable).

    ``slots``/``start``/``counts`` are ``[B]``: the row's slot, its cached length, its number of valid tokens.
    Every token (padding too) writes its K/V at ``start + t`` of its own slot, clamped into the slot's spare
    columns: past the slot's length, so harmless (a rollback leaves such stale entries too). ``counts`` is not
    needed by the math: padding queries are computed and dropped. ``fuse`` (flash paths only): "hoist" builds the
    flash metadata once per step, "triton" also runs the fused glue kernels of ``cuda_fused``; with "triton",
    ``split`` runs attention as ``cuda_attention.split_attention`` instead of flash.
    """
    args = model.args
    B, T = tokens.shape
    dev = tokens.device
    H, Hkv, D = args.n_head, args.n_kv_head, args.head_dim
    dtype = model.output.weight.dtype
    cols = caches[0][0].shape[1]
    flash = attn in FLASH_MODES
    if not flash:
        fuse = "off"
    token_rows = token_rows and flash and fuse != "off"
    if fuse == "triton":
        return _fused_forward(model, caches, rope, tokens, slots, start, attn, linear, token_rows,
                              span if split else 0)
    ar = torch.arange(T, device=dev)
    positions = start[:, None] + ar[None, :]  # [B, T]
    write_pos = positions.clamp(max=cols - 1)
    write_slot = slots[:, None].expand(B, T)
    cos = rope[0][write_pos].to(dtype)[:, :, None]  # [B, T, 1, D]
    sin = rope[1][write_pos].to(dtype)[:, :, None]
    meta = None
    if flash:
        seqused = flash_seqused(start, T, token_rows)
        if fuse == "hoist":
            meta = flash_meta(slots, T, cols, caches[0][0].shape[0], attn, token_rows)
    else:
        mask = torch.arange(span, device=dev)[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
        mask = mask.repeat(1, 1, H // Hkv, 1)  # row g*T + t of the grouped queries is token t
    q_size, kv_size = H * D, Hkv * D
    x = model.tok_embeddings(tokens)
    for layer, (k_cache, v_cache) in zip(model.layers, caches):
        a = layer.attention
        h = F.rms_norm(x, (x.shape[-1],), layer.attention_norm.weight, layer.attention_norm.eps)
        qkv = linear(h, a.wqkv)
        qk = apply_rope(qkv[..., :q_size + kv_size].unflatten(-1, (H + Hkv, D)), cos, sin)  # one rope for q and k
        k_cache[write_slot, write_pos] = qk[:, :, H:]
        v_cache[write_slot, write_pos] = qkv[..., q_size + kv_size:].unflatten(-1, (Hkv, D))
        q = qk[:, :, :H].reshape(B * T, H, D)
        if flash:
            y = flash_paged_attention(q, k_cache, v_cache, slots, seqused, T, attn, meta, token_rows)
        else:
            y = sdpa_gather_attention(q, k_cache, v_cache, slots, mask, T)
        x = x + linear(y.reshape(B, T, q_size), a.wo)
        f = layer.feed_forward
        h = F.rms_norm(x, (x.shape[-1],), layer.ffn_norm.weight, layer.ffn_norm.eps)
        gate, up = linear(h, f.w13).chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, f.w2)
    x = F.rms_norm(x, (x.shape[-1],), model.norm.weight, model.norm.eps)
    return linear(x, model.output).view(B * T, -1)


def _fused_forward(model: Transformer, caches: list[tuple[Tensor, Tensor]], rope: tuple[Tensor, Tensor],
                   tokens: Tensor, slots: Tensor, start: Tensor, attn: str,
                   linear: Callable[[Tensor, torch.nn.Linear], Tensor], token_rows: bool = False,
                   split_span: int = 0) -> Tensor:
    """``static_forward`` with the glue in three Triton kernels a layer (``cuda_fused``): rope + cache writes,
    residual add + RMSNorm (twice), silu * up. Same math, same cache layout. ``split_span`` > 0: attention is
    ``cuda_attention.split_attention`` over at most that many keys a row, instead of flash."""
    from workers.engine.cuda_attention import split_attention
    from workers.engine.cuda_fused import add_rms_norm, rope_kv, silu_mul

    args = model.args
    B, T = tokens.shape
    H, D = args.n_head, args.head_dim
    n_slots, cols = caches[0][0].shape[:2]
    start, slots = start.contiguous(), slots.contiguous()  # columns of the bucket's input buffer: strided
    seqused = flash_seqused(start, T, token_rows)
    meta = flash_meta(slots, T, cols, n_slots, attn, token_rows)
    layers = list(model.layers)
    norms = [lay.attention_norm for lay in layers[1:]] + [model.norm]
    x = model.tok_embeddings(tokens).view(B * T, -1)
    _, h = add_rms_norm(x, None, layers[0].attention_norm.weight, layers[0].attention_norm.eps)
    for layer, nxt, (k_cache, v_cache) in zip(layers, norms, caches):
        a, f = layer.attention, layer.feed_forward
        q = rope_kv(linear(h, a.wqkv), rope[0], rope[1], start, slots, k_cache, v_cache, H, T)
        if split_span:
            y = split_attention(q, k_cache, v_cache, slots, start, T, split_span)
        else:
            y = flash_paged_attention(q, k_cache, v_cache, slots, seqused, T, attn, meta, token_rows)
        x, h = add_rms_norm(x, linear(y.view(B * T, H * D), a.wo), layer.ffn_norm.weight, layer.ffn_norm.eps)
        x, h = add_rms_norm(x, linear(silu_mul(linear(h, f.w13)), f.w2), nxt.weight, nxt.eps)
    return linear(h, model.output)


class _Bucket:
    """One captured (B, T, span) shape: its static input buffer, its graph and its static logits."""

    def __init__(self, engine: "CudaGraphEngine", B: int, T: int, span: int) -> None:
        self.B, self.T, self.span = B, T, span
        self.engine = engine
        self.inputs = torch.zeros((B, T + 3), dtype=torch.long, device=engine.device)
        self.inputs[:, T] = engine.pad_slot  # dummy rows until the first copy
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None

    def run_eager(self) -> Tensor:
        T = self.T
        x = self.inputs
        e = self.engine
        # rows longer than the token buckets (prefill chunks, run eagerly) take flash's own varlen kernel, made
        # for long queries: the split kernel tiles all T x G queries of a KV head at once (verify-sized T only),
        # and on the gather + SDPA path a first burst of 64 prefills stalled a fused worker ~2 s (measured on
        # an H100, benchmarks/results/gpu_engine_h100.md)
        split = e.use_split(self.B, T)
        return static_forward(e.model, e.kv, e.rope, x[:, :T], x[:, T], x[:, T + 1], x[:, T + 2], self.span,
                              e.attn, e.linear, e.fuse,
                              not split and e.token_rows and self.B * self.T <= TOKEN_ROWS_MAX, split)

    def capture(self, pool) -> None:
        """Warm up on a side stream (cuBLAS handles, allocator), then capture one forward."""
        stream = torch.cuda.Stream(self.engine.device)
        stream.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self.run_eager()
        torch.cuda.current_stream(self.engine.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
            self.logits = self.run_eager()
        self.graph = graph

    def run(self) -> Tensor:
        if self.graph is None:
            with torch.inference_mode():
                return self.run_eager()
        self.graph.replay()
        assert self.logits is not None
        return self.logits


class CudaGraphEngine(SlotTableEngine):
    """Static-shape Llama engine; ``graphs=True`` (CUDA only) replays one CUDA graph per bucket, captured lazily
    on first use or up front with ``capture()``."""

    def __init__(self, model: Transformer, info: EngineInfo, *, graphs: bool = True,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS, token_buckets: Sequence[int] = TOKEN_BUCKETS,
                 span_step: int = SPAN_STEP, attn: str | None = None, gemm: str = "cublas",
                 fuse: str = FUSE_DEFAULT, token_rows: bool = True, verify_attn: str = "split") -> None:
        self.model = model
        self.info = info
        self.device = next(model.parameters()).device
        if graphs and self.device.type != "cuda":
            raise EngineError("CUDA graphs need a CUDA device (use graphs=False on CPU)")
        self.graphs = graphs
        self.pad_slot = info.num_slots
        self.batch_buckets = sorted(set(int(b) for b in batch_buckets))
        self.token_buckets = sorted(set(int(t) for t in token_buckets))
        self.spans = span_buckets(info.max_context, span_step)
        self.table = SlotTable(info.num_slots, info.max_context, info.vocab_size)
        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        # the cache: [slots + padding slot, cols, Hkv, D] per layer; cols leaves room for a bucket's padding tokens
        a = model.args
        cols = -(-(info.max_context + self.token_buckets[-1]) // PAGE) * PAGE
        dtype = model.output.weight.dtype
        self.kv = [tuple(torch.zeros((info.num_slots + 1, cols, a.n_kv_head, a.head_dim), dtype=dtype,
                                     device=self.device) for _ in range(2)) for _ in range(a.n_layer)]
        cos, sin = rope_table(a, cols)
        self.rope = (cos.to(self.device), sin.to(self.device))
        if attn is None:
            attn = (flash_mode(a.head_dim, dtype, self.device) if self.device.type == "cuda" else None) or "sdpa"
        self.attn = attn  # "paged" | "offsets" (flash, in place) | "sdpa" (gather + SDPA)
        if fuse not in FUSE_MODES:
            raise EngineError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
        if fuse == "triton" and self.attn in FLASH_MODES:
            why = _triton_check(model.args, self.device, dtype)
            if why:
                FLASH_ERRORS.append(f"fused glue off: {why}")
                fuse = "hoist"
        self.fuse = fuse  # glue kernels on the flash path: "off" | "hoist" (metadata once a step) | "triton"
        # flash with T > 1: one one-query row per token (FA2's split-KV decode kernel), where it checks out here
        self.token_rows = bool(token_rows and self.attn in FLASH_MODES
                               and flash_mode(a.head_dim, dtype, self.device, token_rows=self.attn))
        # attention with the fused glue: "split" (default; cuda_attention: one program per row, KV head and key
        # split, all T x G queries of a KV head in one tile) where it checks out here, else "flash" (FA2; token
        # rows up to TOKEN_ROWS_MAX). Measured on an H100 (benchmarks/results/gpu_engine_h100.md), split beats FA2
        # at every shape: 1.6-2x at T = 1, 4-8x at T = 5..9 (B=16 T=5 ctx 512: 70 -> 16 us a layer).
        if verify_attn not in VERIFY_ATTN:
            raise EngineError(f"verify_attn must be one of {VERIFY_ATTN}, got {verify_attn!r}")
        if verify_attn != "flash" and self.fuse == "triton":
            from workers.engine.cuda_attention import self_check as split_check

            why = split_check(a.n_head, a.n_kv_head, a.head_dim, dtype, self.device)
            if why:
                FLASH_ERRORS.append(f"split attention off: {why}")
                verify_attn = "flash"
        else:
            verify_attn = "flash"
        self.verify_attn = verify_attn
        # "cublas" (default): every projection through cuBLAS, which already streams the 8B weights at 2.0-2.8 TB/s
        # for 1..64 rows on an H100. "auto": Triton skinny GEMMs where they measure faster (bf16/fp16, CUDA):
        # measured, only the lm_head gained (~5%, 0.02 ms a step); kept as an option (benchmarks/results/).
        self.linear: Callable[[Tensor, torch.nn.Linear], Tensor] = _module_linear
        if gemm == "auto" and self.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
            from workers.engine.cuda_gemm import SkinnyLinear
            self.linear = SkinnyLinear()

    def use_split(self, B: int, T: int) -> bool:
        """Whether a (B, T) bucket runs ``cuda_attention.split_attention`` (else flash)."""
        return self.verify_attn == "split" and T <= self.token_buckets[-1]

    # ---- slots: bookkeeping is SlotTableEngine's (the padding slot is never handed out)
    def buckets(self) -> list[tuple[int, int]]:
        return [(b, t) for b in self.batch_buckets for t in self.token_buckets]

    # ---- shapes
    @staticmethod
    def _fit(buckets: list[int], n: int) -> int | None:
        i = bisect.bisect_left(buckets, n)
        return buckets[i] if i < len(buckets) else None

    @property
    def span_free(self) -> bool:
        """Whether graphs ignore the attention span: flash and the split kernel read each row's length at run
        time, so one graph per (B, T) serves every context (only the gather + SDPA path sizes by span)."""
        return self.attn in FLASH_MODES

    def shape_for(self, batch: int, tokens: int, need_span: int) -> tuple[int, int, int, bool]:
        """(B, T, span, graphed) that a call of ``batch`` rows, ``tokens`` max new tokens, ``need_span`` runs as."""
        B, T = self._fit(self.batch_buckets, batch), self._fit(self.token_buckets, tokens)
        span = self._fit(self.spans, need_span)
        assert span is not None  # need_span <= max_context was checked
        if B is None or T is None:
            return batch, tokens, span, False
        return B, T, self.spans[-1] if self.span_free else span, self.graphs

    def _bucket(self, B: int, T: int, span: int, graphed: bool) -> _Bucket:
        key = (B, T, span)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self, B, T, span)
            if graphed:
                bucket.capture(self._pool)
                self._buckets[key] = bucket  # eager one-off shapes are not kept
        return bucket

    def default_shapes(self) -> list[tuple[int, int, int]]:
        """Every (B, T, span) a call can run as on graphs: batch buckets up to the one that holds every slot,
        every token bucket, and every span (one span when ``span_free``)."""
        top = self._fit(self.batch_buckets, self.info.num_slots) or self.batch_buckets[-1]
        spans = [self.spans[-1]] if self.span_free else self.spans
        return [(b, t, s) for b, t in self.buckets() if b <= top for s in spans]

    def capture(self, shapes: Sequence[tuple[int, int, int]] | None = None,
                progress: Callable[[int, int], None] | None = None) -> int:
        """Capture graphs now for (B, T, span) shapes (default: ``default_shapes()``), so that serving never
        stops to capture. ``progress(done, total)`` after each. Returns the count."""
        if not self.graphs:
            return 0
        todo = list(shapes) if shapes is not None else self.default_shapes()
        for i, (B, T, S) in enumerate(todo):
            self._bucket(B, T, S, True)
            if progress is not None:
                progress(i + 1, len(todo))
        return len(todo)

    # ---- the one forward
    def forward(self, rows: Sequence[tuple[int, Sequence[int]]], last_only: Sequence[bool] | None = None
                ) -> list[Tensor]:
        slots, tokens, last = self.table.check_rows(rows, last_only)
        # rows longer than the largest token bucket (prefill chunks) run eagerly, apart: the others (verify rows)
        # stay on their graph instead of dragging the whole batch off it. Rows hold distinct slots: order is free.
        top = self.token_buckets[-1]
        groups = [[i for i, t in enumerate(tokens) if len(t) <= top], [i for i, t in enumerate(tokens) if len(t) > top]]
        out: list[Tensor | None] = [None] * len(slots)
        with torch.inference_mode():
            for idx in (g for g in groups if g):
                logits, want = self._run([slots[i] for i in idx], [tokens[i] for i in idx], [last[i] for i in idx])
                for i, part in zip(idx, logits.split([len(w) for w in want])):
                    out[i] = part
        for s, t in zip(slots, tokens):
            self.table.lengths[s] += len(t)
        return out  # type: ignore[return-value]

    def _run(self, slots: list[int], tokens: list[list[int]], last: list[bool]) -> tuple[Tensor, list[list[int]]]:
        counts = [len(t) for t in tokens]
        lengths = [self.table.lengths[s] for s in slots]
        need_span = max(l + n for l, n in zip(lengths, counts))
        B, T, span, graphed = self.shape_for(len(slots), max(counts), need_span)
        packed = [t + [0] * (T - len(t)) + [s, l, len(t)] for t, s, l in zip(tokens, slots, lengths)]
        packed += [[0] * T + [self.pad_slot, 0, 0]] * (B - len(slots))
        bucket = self._bucket(B, T, span, graphed)
        bucket.inputs.copy_(torch.tensor(packed, dtype=torch.long), non_blocking=True)
        want = [[b * T + n - 1] if lo else list(range(b * T, b * T + n)) for b, (n, lo) in enumerate(zip(counts, last))]
        flat = torch.tensor([i for w in want for i in w], dtype=torch.long).to(self.device, non_blocking=True)
        return bucket.run().index_select(0, flat).float(), want


def make_engine(model: Transformer, info: EngineInfo, *, graphs: bool = True, **kw) -> CudaGraphEngine:
    """Wrap ``model`` (on its final device); the engine allocates its own caches."""
    return CudaGraphEngine(model, info, graphs=graphs, **kw)


def load_cuda_engine(model_dir: str | Path, device: str = "cuda", dtype: str = "bfloat16", slots: int = 8,
                     max_context: int | None = None, graphs: bool | None = None, **kw) -> CudaGraphEngine:
    """Load a Llama HF directory into a ``CudaGraphEngine`` (``graphs`` defaults to True on CUDA)."""
    from workers.engine.torch_engine import load_llama

    model, info = load_llama(model_dir, device, dtype, slots, max_context, backend="cuda")
    on_cuda = info.device.startswith("cuda")
    return make_engine(model, info, graphs=on_cuda if graphs is None else graphs, **kw)

"""CUDA target engine: our Llama's static forward (``llama.static_forward``), replayed from CUDA graphs.

Why: at small batch a verify step of an 8B model is a weight read (~16 GB, ~5 ms on an H100), but the eager path
launches ~30 kernels per layer from Python and has data-dependent shapes. Here every shape is fixed per bucket
``(batch B, tokens T)`` so one graph per bucket replays the whole forward with no Python in the loop (the
attention kernels read each row's length at run time; only the portable path also buckets the span ``S``).
``capture()`` records every bucket up front (the workers do it at start, ``serving.capture_graphs``); a call
whose rows include some longer than the largest token bucket (prefill chunks) runs those rows eagerly, apart:

* the cache is the engine's own, ``[num_slots + 1, cols, Hkv, D]`` per layer: the last slot is the *padding
  slot* and ``cols`` = max_context + the largest token bucket, rounded up to 256-token pages. A call is padded up
  to the smallest (B, T) bucket: dummy rows point at the padding slot; every token, padding included, writes its
  K/V at ``length + t`` of its own slot, i.e. past the slot's length (harmless, like stale entries after a
  rollback), so the write is one index_put of static shape;
* the step's integers (tokens, slots, lengths, counts) travel in ONE host-to-device copy into the bucket's static
  input buffer; positions, page tables, rope rows and write indices are derived inside the graph.

Two paths run that forward (``path``). **fused** (CUDA, bf16/fp16, every kernel checked against plain math when
the engine starts): the glue is three Triton kernels a layer (``cuda_fused``: rope + cache writes, residual add +
RMSNorm, silu * up); verify rows attend with the Triton split-KV kernel (``cuda_attention.split_attention``: all
T x G queries of a KV head in one tile, keys split across programs) and prefill rows with FA2's varlen kernel,
both reading each row's KV in place. **portable** (CPU, float32, a torch without the flash op, a kernel that fails
its check; ``why_portable`` says which): torch glue, and attention that gathers the first ``S`` columns of each
row's slot (``S`` = the smallest span bucket >= the batch's longest ``length + n``) and runs SDPA with a position
mask, query heads grouped by KV head (``[B, Hkv, G*T, D]``) so K/V are not expanded.

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

from workers.engine import cuda_attention, cuda_fused
from workers.engine.base import EngineError, EngineInfo
from workers.engine.cuda_attention import (PAGE, flash_attention, flash_layout, flash_meta, gather_mask,
                                           sdpa_gather_attention, split_attention)
from workers.engine.llama import ModelArgs, RMSNorm, StaticOps, Transformer, apply_rope, rope_table, static_forward
from workers.engine.slots import SlotTable, SlotTableEngine

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)  # eager past 64 rows cost ~5-10 ms of launches a step
GRAPH_LOGITS_BYTES = 512 << 20  # a bucket whose logits (B x T x vocab) outgrow this runs eagerly (memory, big vocab)
TOKEN_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 9, 12, 16)  # gamma+1 for gamma in 0..8 pads little
SPAN_STEP = 128  # attention span buckets: multiples of this (a finer step reads fewer stale cache columns)


def span_buckets(max_context: int, step: int = SPAN_STEP) -> list[int]:
    """Static attention spans: step, 2*step, ... up to max_context (always included)."""
    spans = list(range(step, max_context, step))
    return spans + [max_context]


class PortableOps:
    """``llama.StaticOps`` in plain torch; attention gathers the first ``span`` columns of each row's slot and runs
    SDPA with a position mask. Positions, rope rows, write indices and the mask are built once a step."""

    def __init__(self, rope: tuple[Tensor, Tensor], slots: Tensor, start: Tensor, T: int, span: int, cols: int,
                 n_head: int, n_kv_head: int, dtype: torch.dtype) -> None:
        B = slots.shape[0]
        positions = start[:, None] + torch.arange(T, device=slots.device)[None, :]  # [B, T]
        self.write_pos = positions.clamp(max=cols - 1)
        self.write_slot = slots[:, None].expand(B, T)
        self.cos = rope[0][self.write_pos].to(dtype)[:, :, None]  # [B, T, 1, D]
        self.sin = rope[1][self.write_pos].to(dtype)[:, :, None]
        self.mask = gather_mask(positions, span, n_head // n_kv_head)
        self.slots, self.B, self.T, self.H, self.Hkv = slots, B, T, n_head, n_kv_head

    def add_rms_norm(self, x: Tensor, r: Tensor | None, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        if r is not None:
            x = x + r
        return x, F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)

    def rope_kv(self, qkv: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        B, T, H, Hkv, D = self.B, self.T, self.H, self.Hkv, k_cache.shape[-1]
        qkv = qkv.view(B, T, H + 2 * Hkv, D)
        qk = apply_rope(qkv[:, :, :H + Hkv], self.cos, self.sin)  # one rope for q and k
        k_cache[self.write_slot, self.write_pos] = qk[:, :, H:]
        v_cache[self.write_slot, self.write_pos] = qkv[:, :, H + Hkv:]
        return qk[:, :, :H].reshape(B * T, H, D)

    def attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        return sdpa_gather_attention(q, k_cache, v_cache, self.slots, self.mask, self.T)

    def silu_mul(self, gu: Tensor) -> Tensor:
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up


class FusedOps:
    """``llama.StaticOps`` as Triton kernels (``cuda_fused``): rope of q and k + both cache writes + a contiguous q
    in one kernel, residual add + RMSNorm in one, silu * up in one. Attention: the split-KV kernel over at most
    ``split_span`` keys a row (verify rows), or with ``split_span=0`` FA2's varlen kernel in ``flash_layout``
    (prefill rows), its metadata built once a step."""

    def __init__(self, rope: tuple[Tensor, Tensor], slots: Tensor, start: Tensor, T: int, n_head: int,
                 split_span: int, flash_layout: str | None, cols: int, n_slots: int) -> None:
        self.start, self.slots = start.contiguous(), slots.contiguous()  # columns of the bucket's input buffer
        self.rope, self.T, self.H, self.split_span, self.layout = rope, T, n_head, split_span, flash_layout
        self.meta = None if split_span else flash_meta(self.slots, self.start, T, cols, n_slots, str(flash_layout))

    def add_rms_norm(self, x: Tensor, r: Tensor | None, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        return cuda_fused.add_rms_norm(x, r, norm.weight, norm.eps)

    def rope_kv(self, qkv: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        return cuda_fused.rope_kv(qkv, self.rope[0], self.rope[1], self.start, self.slots, k_cache, v_cache, self.H,
                                  self.T)

    def attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        if self.split_span:
            return split_attention(q, k_cache, v_cache, self.slots, self.start, self.T, self.split_span)
        assert self.meta is not None
        return flash_attention(q, k_cache, v_cache, self.T, str(self.layout), self.meta)

    def silu_mul(self, gu: Tensor) -> Tensor:
        return cuda_fused.silu_mul(gu)


def fused_path_check(args: ModelArgs, dtype: torch.dtype, device: torch.device) -> tuple[str | None, str]:
    """``(FA2 layout, "")`` when every kernel of the fused path runs here and agrees with plain math at this
    model's widths (flash, the Triton glue, the split-KV kernel), else ``(None, why not)``."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None, f"needs CUDA and bf16/fp16, not {device.type} {str(dtype).removeprefix('torch.')}"
    layout, why = flash_layout(args.head_dim, dtype, device)
    if layout is None:
        return None, f"flash attention: {why}"
    why = cuda_fused.self_check(args.dim, args.intermediate_size, args.n_head, args.n_kv_head, args.head_dim, dtype,
                                device)
    if why:
        return None, f"fused glue: {why}"
    why = cuda_attention.self_check(args.n_head, args.n_kv_head, args.head_dim, dtype, device)
    if why:
        return None, f"split attention: {why}"
    return layout, ""


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
        T, x, e = self.T, self.inputs, self.engine
        return static_forward(e.model, e.kv, x[:, :T], e.step_ops(x[:, T], x[:, T + 1], T, self.span))

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
                 span_step: int = SPAN_STEP) -> None:
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
        self.flash_layout, self.why_portable = fused_path_check(a, dtype, self.device)
        self.path = "portable" if self.flash_layout is None else "fused"

    def attention_for(self, T: int) -> str:
        """The attention of a step of ``T`` tokens a row: "split" (fused path, verify rows), "flash" (fused path,
        prefill rows longer than the largest token bucket) or "sdpa" (portable path: gather + SDPA)."""
        if self.path != "fused":
            return "sdpa"
        return "split" if T <= self.token_buckets[-1] else "flash"

    def step_ops(self, slots: Tensor, start: Tensor, T: int, span: int) -> StaticOps:
        """The glue and attention of one step of ``T`` tokens a row, for ``llama.static_forward``."""
        a = self.model.args
        n_slots, cols = self.kv[0][0].shape[:2]
        attention = self.attention_for(T)
        if attention == "sdpa":
            return PortableOps(self.rope, slots, start, T, span, cols, a.n_head, a.n_kv_head,
                               self.model.output.weight.dtype)
        # rows longer than the token buckets (prefill chunks, run eagerly) take flash's own varlen kernel, made for
        # long queries: the split kernel tiles all T x G queries of a KV head at once (verify-sized T only), and on
        # the gather + SDPA path a first burst of 64 prefills stalled a fused worker ~2 s (measured on an H100,
        # benchmarks/results/gpu_engine_h100.md)
        return FusedOps(self.rope, slots, start, T, a.n_head, span if attention == "split" else 0, self.flash_layout,
                        cols, n_slots)

    # ---- slots: bookkeeping is SlotTableEngine's (the padding slot is never handed out)
    def buckets(self) -> list[tuple[int, int]]:
        """(B, T) shapes served on graphs: every bucket pair whose logits buffer fits ``GRAPH_LOGITS_BYTES``."""
        return [(b, t) for b in self.batch_buckets for t in self.token_buckets if self._graphable(b, t)]

    def _graphable(self, B: int, T: int) -> bool:
        return B * T * self.info.vocab_size * self.model.output.weight.element_size() <= GRAPH_LOGITS_BYTES

    # ---- shapes
    @staticmethod
    def _fit(buckets: list[int], n: int) -> int | None:
        i = bisect.bisect_left(buckets, n)
        return buckets[i] if i < len(buckets) else None

    @property
    def span_free(self) -> bool:
        """Whether graphs ignore the attention span: flash and the split kernel read each row's length at run
        time, so one graph per (B, T) serves every context (only the portable gather + SDPA path sizes by span)."""
        return self.path == "fused"

    def shape_for(self, batch: int, tokens: int, need_span: int) -> tuple[int, int, int, bool]:
        """(B, T, span, graphed) that a call of ``batch`` rows, ``tokens`` max new tokens, ``need_span`` runs as."""
        B, T = self._fit(self.batch_buckets, batch), self._fit(self.token_buckets, tokens)
        span = self._fit(self.spans, need_span)
        assert span is not None  # need_span <= max_context was checked
        if B is None or T is None or not self._graphable(B, T):
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
                     max_context: int | None = None, graphs: bool | None = None, grow: str | dict | None = None,
                     **kw) -> CudaGraphEngine:
    """Load a Llama HF directory into a ``CudaGraphEngine`` (``graphs`` defaults to True on CUDA); ``grow``: the
    model grown in memory to that shape (``torch_engine.load_llama``)."""
    from workers.engine.torch_engine import load_llama

    if str(device).startswith("cuda:") and torch.cuda.is_available():
        # Triton launches on the current device: make it the engine's (a worker on cuda:1 of a 2-GPU host)
        torch.cuda.set_device(torch.device(device))
    model, info = load_llama(model_dir, device, dtype, slots, max_context, backend="cuda", grow=grow)
    on_cuda = info.device.startswith("cuda")
    return make_engine(model, info, graphs=on_cuda if graphs is None else graphs, **kw)

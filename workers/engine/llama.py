"""A compact Llama forward with a static per-slot KV cache (gpt-fast style), loading HF-format weights.

Read top to bottom: ``ModelArgs`` (from an HF ``config.json``), the rotary helpers (incl. Llama-3 scaling),
``KVCache``, ``Transformer`` -> ``TransformerBlock`` -> ``Attention`` / ``FeedForward`` / ``RMSNorm``, the
static-shape forward (``static_forward``), then ``load_weights``.

One forward runs a batch of rows that belong to different slots, at different positions, with different numbers
of new tokens. transformers' ``cache_position`` is one vector for the whole batch, so we do our own bookkeeping:

* the caller right-pads the rows to ``T`` tokens and passes ``positions[b, t] = length[b] + t``;
* each layer writes the new K/V of the *valid* (row, token) pairs only, with one index_put into
  ``cache[slot, :, position]``: padding is never written, so no slot is corrupted by another row's length;
* attention reads the first ``L = max(length + n)`` cache positions of the batch's slots and masks key ``j`` for
  query ``(b, t)`` unless ``j <= positions[b, t]``: causal inside the new tokens, everything cached before. Entries
  past a slot's length (stale after a rollback) are always beyond every query's position, hence masked.

Rollback is therefore a length change held by the engine; nothing here is copied back.

This eager path has data-dependent shapes (``T``, ``L``, the number of valid pairs); CUDA graphs need fixed ones.
``static_forward`` is the same math with every shape fixed by (batch, tokens): its caller (``cuda_engine``) owns
the cache, pads the batch with dummy rows pointing at a padding slot, lets padding tokens write past their row's
length (harmless, like entries left by a rollback) and brings the glue and the attention as ``ops``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------- config
@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    intermediate_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Read a Llama config.json (4.x rope_theta/rope_scaling or 5.x rope_parameters)."""
        n_head = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} not supported (only 'silu')")
        return cls(
            vocab_size=int(cfg["vocab_size"]), dim=dim, intermediate_size=int(cfg["intermediate_size"]),
            n_layer=int(cfg["num_hidden_layers"]), n_head=n_head,
            n_kv_head=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg.get("head_dim") or dim // n_head), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
        )


# ----------------------------------------------------------------------------------------------- rotary
def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> Tensor:
    """Inverse frequencies, with 'linear' or 'llama3' scaling applied (the HF conventions)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope scaling {kind!r} not supported (default, linear, llama3)")


def rope_table(args: ModelArgs, n_pos: int) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [n_pos, head_dim] in float32 (HF layout: the half-dim frequencies repeated twice)."""
    inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
    freqs = torch.arange(n_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos/sin: [B, 1, T, D]. Rotate-half convention, as the HF checkpoints expect."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------------------------- cache
class KVCache(nn.Module):
    """Static per-slot cache [slots, kv_heads, max_context, head_dim] for one layer."""

    def __init__(self, slots: int, n_kv_head: int, max_context: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        shape = (slots, n_kv_head, max_context, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, ctx: "BatchContext", k: Tensor, v: Tensor) -> None:
        """Write the valid (row, token) pairs of k, v [B, H, T, D] at (slot, position): one index_put each."""
        if ctx.all_valid:
            self.k[ctx.write_slots, :, ctx.write_pos] = k.transpose(1, 2)
            self.v[ctx.write_slots, :, ctx.write_pos] = v.transpose(1, 2)
        else:
            self.k[ctx.write_slots, :, ctx.write_pos] = k.transpose(1, 2)[ctx.valid]
            self.v[ctx.write_slots, :, ctx.write_pos] = v.transpose(1, 2)[ctx.valid]

    def read(self, ctx: "BatchContext") -> tuple[Tensor, Tensor]:
        """The first ``ctx.span`` positions of the batch's slots: a view when they are consecutive, else a gather."""
        if ctx.slot_range is not None:
            a, b = ctx.slot_range
            return self.k[a:b, :, :ctx.span], self.v[a:b, :, :ctx.span]
        return (self.k[:, :, :ctx.span].index_select(0, ctx.slots),
                self.v[:, :, :ctx.span].index_select(0, ctx.slots))


@dataclass
class BatchContext:
    """Per-forward indices shared by every layer (built once by the engine, not per layer)."""
    slots: Tensor  # [B] long
    slot_range: tuple[int, int] | None  # (first, last+1) when slots are consecutive ascending: read a view
    positions: Tensor  # [B, T] long (padding positions clamped into the rope table)
    valid: Tensor  # [B, T] bool
    all_valid: bool
    write_slots: Tensor  # [N] or [B, 1] long: the slot of each valid pair
    write_pos: Tensor  # [N] or [B, T] long: its position
    span: int  # key positions to attend over: max(length + n)
    mask: Tensor  # [B, 1, T, span] bool, True = attend
    cos: Tensor  # [B, 1, T, D]
    sin: Tensor

    @classmethod
    def build(cls, slots: list[int], lengths: list[int], counts: list[int], rope: tuple[Tensor, Tensor],
              dtype: torch.dtype, device: torch.device) -> "BatchContext":
        """Indices for rows (slot, length, n new tokens); the token tensor is right-padded to max(counts)."""
        B, T = len(slots), max(counts)
        span = max(l + n for l, n in zip(lengths, counts))
        start = torch.tensor(lengths, dtype=torch.long, device=device)
        positions = start[:, None] + torch.arange(T, device=device)[None, :]
        n = torch.tensor(counts, dtype=torch.long, device=device)
        valid = torch.arange(T, device=device)[None, :] < n[:, None]
        all_valid = min(counts) == T
        slot_t = torch.tensor(slots, dtype=torch.long, device=device)
        if all_valid:
            write_slots, write_pos = slot_t[:, None], positions
        else:
            write_slots, write_pos = slot_t[:, None].expand(B, T)[valid], positions[valid]
        mask = torch.arange(span, device=device)[None, None, None, :] <= positions[:, None, :, None]
        rope_pos = positions.clamp(max=rope[0].shape[0] - 1)
        cos = rope[0][rope_pos].to(dtype).unsqueeze(1)
        sin = rope[1][rope_pos].to(dtype).unsqueeze(1)
        consecutive = all(b == a + 1 for a, b in zip(slots, slots[1:]))
        slot_range = (slots[0], slots[-1] + 1) if consecutive else None
        return cls(slot_t, slot_range, rope_pos, valid, all_valid, write_slots, write_pos, span, mask, cos, sin)


# ----------------------------------------------------------------------------------------------- model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
        self.wqkv = nn.Linear(args.dim, q + 2 * kv, bias=args.attention_bias)  # fused q, k, v projections
        self.wo = nn.Linear(q, args.dim, bias=args.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, ctx: BatchContext) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        assert self.kv_cache is not None, "setup_caches() first"
        self.kv_cache.write(ctx, k, v)
        keys, values = self.kv_cache.read(ctx)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask,
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)  # fused gate, up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split([self.hidden, self.hidden], dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, ctx: BatchContext) -> Tensor:
        h = x + self.attention(self.attention_norm(x), ctx)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope: tuple[Tensor, Tensor] | None = None
        self.max_context = 0

    def setup_caches(self, slots: int, max_context: int) -> None:
        """Preallocate every layer's cache and the rope table (float32, cast per batch)."""
        p = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(slots, self.args.n_kv_head, max_context, self.args.head_dim,
                                               p.dtype, p.device)
        cos, sin = rope_table(self.args, max_context)
        self.rope = (cos.to(p.device), sin.to(p.device))
        self.max_context = max_context

    def forward(self, tokens: Tensor, ctx: BatchContext, select: Tensor | None = None) -> Tensor:
        """tokens [B, T] -> logits. ``select`` (flat indices into B*T) picks the rows to project, else all."""
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, ctx)
        x = x.reshape(-1, x.shape[-1])
        if select is not None:
            x = x.index_select(0, select)
        return self.output(self.norm(x))


# ----------------------------------------------------------------------------------------------- static forward
class StaticOps(Protocol):
    """One step's glue for ``static_forward``, built per step with the rows' slots and start positions; its
    methods run once per layer. The CUDA engine has two: plain torch with gather + SDPA attention, and Triton
    kernels (``cuda_engine.PortableOps`` / ``cuda_engine.FusedOps``)."""

    def add_rms_norm(self, x: Tensor, r: Tensor | None, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """``(x + r, norm(x + r))``; ``r=None``: ``(x, norm(x))``."""
        ...

    def rope_kv(self, qkv: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """Rotate q and k of ``qkv [B*T, (H + 2*Hkv) * D]``, write k and v into the layer's cache at each token's
        position; return q ``[B*T, H, D]``."""
        ...

    def attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """Causal attention of q ``[B*T, H, D]`` over each row's slot (the tokens just written included)."""
        ...

    def silu_mul(self, gu: Tensor) -> Tensor:
        """``silu(gate) * up`` from the fused w13 output ``[..., gate | up]``."""
        ...


def static_forward(model: Transformer, caches: Sequence[tuple[Tensor, Tensor]], tokens: Tensor, ops: StaticOps
                   ) -> Tensor:
    """Logits ``[B*T, vocab]`` for tokens ``[B, T]``: ``Transformer.forward``'s math with every shape fixed by
    (B, T), so that a CUDA graph can capture it. The caller owns the caches (one ``(k, v)`` per layer, written and
    read through ``ops``) and drops the logits of its padding tokens. Each residual add is fused into the norm
    that follows it (``ops.add_rms_norm``)."""
    B, T = tokens.shape
    H, D = model.args.n_head, model.args.head_dim
    layers = list(model.layers)
    next_norms = [layer.attention_norm for layer in layers[1:]] + [model.norm]
    x = model.tok_embeddings(tokens).view(B * T, -1)
    _, h = ops.add_rms_norm(x, None, layers[0].attention_norm)
    for layer, next_norm, (k_cache, v_cache) in zip(layers, next_norms, caches):
        a, f = layer.attention, layer.feed_forward
        q = ops.rope_kv(a.wqkv(h), k_cache, v_cache)
        y = ops.attention(q, k_cache, v_cache).reshape(B * T, H * D)
        x, h = ops.add_rms_norm(x, a.wo(y), layer.ffn_norm)
        x, h = ops.add_rms_norm(x, f.w2(ops.silu_mul(f.w13(h))), next_norm)
    return model.output(h)


# ----------------------------------------------------------------------------------------------- weights
def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model directory (single file or sharded index)."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index: {exc}") from exc
        missing = [s for s in shards if not (model_dir / s).exists()]
        if missing:
            raise FileNotFoundError(f"{model_dir}: weight shard(s) missing: {', '.join(missing)}")
        return [model_dir / s for s in shards]
    raise FileNotFoundError(f"{model_dir}: no weights (expected model.safetensors or model.safetensors.index.json)")


def layer_from_hf(take: Callable[[str], Tensor], i: int, args: ModelArgs) -> dict[str, Tensor]:
    """Layer ``i`` in our fused layout (keys relative to ``layers.{i}.``) from ``take(HF name)``: shared by the
    file loader and in-memory growth (``grow.py``)."""
    p = f"model.layers.{i}."
    ours = {"attention.wqkv.weight": torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
            "attention.wo.weight": take(p + "self_attn.o_proj.weight")}
    if args.attention_bias:
        ours["attention.wqkv.bias"] = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        ours["attention.wo.bias"] = take(p + "self_attn.o_proj.bias")
    ours["feed_forward.w13.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
    ours["feed_forward.w2.weight"] = take(p + "mlp.down_proj.weight")
    if args.mlp_bias:
        ours["feed_forward.w13.bias"] = torch.cat([take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")])
        ours["feed_forward.w2.bias"] = take(p + "mlp.down_proj.bias")
    ours["attention_norm.weight"] = take(p + "input_layernorm.weight")
    ours["ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
    return ours


def load_weights(model: Transformer, model_dir: Path) -> None:
    """Put HF tensors into our (fused) layout; every parameter must be filled, extra tensors are an error.

    ``model`` may live on the meta device: tensors are assigned, not copied (no random init, no double memory).
    """
    from safetensors import safe_open

    hf: dict[str, Tensor] = {}
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    hf[name] = f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{path}: cannot read weights: {exc}") from exc

    def take(name: str) -> Tensor:
        if name not in hf:
            raise ValueError(f"{model_dir}: tensor {name!r} missing from the weights")
        return hf.pop(name)

    args = model.args
    ours: dict[str, Tensor] = {"tok_embeddings.weight": take("model.embed_tokens.weight"),
                               "norm.weight": take("model.norm.weight")}
    if args.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
        ours["output.weight"] = ours["tok_embeddings.weight"]
    else:
        ours["output.weight"] = take("lm_head.weight")
    for i in range(args.n_layer):
        ours.update((f"layers.{i}.{k}", t) for k, t in layer_from_hf(take, i, args).items())
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"{model_dir}: unexpected tensors for a Llama model: {', '.join(sorted(leftover)[:5])}")
    try:
        model.load_state_dict(ours, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatch between config.json and the weights
        raise ValueError(f"{model_dir}: weights do not match config.json: {exc}") from exc
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight

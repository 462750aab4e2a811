"""Function-preserving growth: a Llama of a larger shape that computes exactly what a small one computes.

Why: no 8B weights can be fetched here and random weights accept no draft token, so large-model cost with real
acceptance comes from growing the shipped pair (DESIGN.md, "Adapting speculation to load"). The grown model's
residual stream is the small one's, padded with zeros:

* hidden, MLP and head dimensions are padded; added query heads, added MLP units and added layers feed nothing:
  the parts of ``o_proj`` / ``down_proj`` that read them are zero, so the residual passes through and keeps zeros
  outside the small model's ``d`` dimensions;
* RMSNorm over ``D`` dims of a state that is zero past ``d``: with ``eps_D = eps_d * d / D``,
  ``rms_D = sqrt(d / D) * rms_d``, so the weights are scaled by ``sqrt(d / D)`` (weights on padded dims multiply
  zeros: any value does);
* head dim ``hd`` -> ``HD = r * hd``: q is scaled by ``sqrt(HD / hd)`` to undo the softmax scale ``1/sqrt(HD)``.
  RoPE (rotate-half: pair ``(j, j + D/2)`` turns at ``theta^(-2j/D)``) keeps each pair's frequency when small dim
  ``j`` goes to big dim ``r*j`` and small dim ``j + hd/2`` to big dim ``r*j + HD/2``; the other pairs are padding,
  q is zero there (so k may hold anything), and rope never mixes a placed dim with a padded one;
* small KV head ``c`` -> big KV head ``c``; its query heads -> the first query heads of big group ``c`` (MHA ->
  GQA: one query head per KV head);
* the vocabulary, RoPE parameters and context length stay the small model's (a tied lm_head is the grown
  embedding): the body has the big shape, the embedding does not.

Dense kernels do not skip zeros, so a step costs what a step of the big shape costs. Zero-padded products draw
less power when compute-bound (DESIGN.md), so zeros are kept only where the function needs them: embedding
columns past ``d``; ``o_proj`` rows past ``d`` and columns outside the placed head dims; ``down_proj`` rows past
``d`` and columns of added units; q's padded head dims over the real input columns; added layers' ``o_proj`` and
``down_proj``. Everything that multiplies a zero input or feeds a discarded output is random, with the std of the
small tensor it extends.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import structlog
import torch
from torch import Tensor

from workers.engine.base import EngineError
from workers.engine.model_dir import dtype_name, parse_device, parse_dtype, read_config

log = structlog.get_logger()  # lazy proxy; every event names logger="grow"

SHARD_BYTES = 5 << 30  # safetensors shard size when writing (HF's default max_shard_size)
ROPE_TYPES = ("default", "linear", "llama3")  # scalings that are a function of each pair's frequency alone
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class GrowError(EngineError):
    """A growth that cannot preserve the function (a smaller or incompatible shape, an unsupported config)."""


@dataclass(frozen=True)
class GrowShape:
    """The body of a Llama (HF config key names); vocabulary and RoPE stay the small model's."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def of_config(cls, cfg: dict[str, Any]) -> "GrowShape":
        heads = int(cfg["num_attention_heads"])
        return cls(hidden_size=int(cfg["hidden_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
                   num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                   intermediate_size=int(cfg["intermediate_size"]))

    def describe(self) -> str:
        return (f"hidden {self.hidden_size}, {self.num_hidden_layers} layers, {self.num_attention_heads} heads x "
                f"{self.head_dim}, {self.num_key_value_heads} KV heads, MLP {self.intermediate_size}")


# the bodies of cuda_shapes.SHAPES (a test keeps the two tables equal; importing it here would close an import cycle)
SHAPES: dict[str, GrowShape] = {
    "llama-3.1-8b": GrowShape(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                              head_dim=128, intermediate_size=14336),
    "llama-3.2-1b": GrowShape(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                              head_dim=64, intermediate_size=8192),
}
# short keys accepted in custom shapes ("hidden=768,layers=12,...") next to the HF names
ALIASES = {"hidden": "hidden_size", "dim": "hidden_size", "layers": "num_hidden_layers",
           "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size",
           "mlp": "intermediate_size"}


def parse_shape(shape: str | dict[str, Any] | GrowShape) -> tuple[str, GrowShape]:
    """``(label, shape)`` from a name in ``SHAPES``, a mapping, or ``"hidden=768,layers=12,heads=16,kv_heads=8,
    head_dim=128,intermediate=2048"``; the label names the shape in model ids and reports."""
    if isinstance(shape, GrowShape):
        return "custom", shape
    if isinstance(shape, str):
        if shape in SHAPES:
            return shape, SHAPES[shape]
        if "=" not in shape:
            raise GrowError(f"shape {shape!r} unknown (named: {', '.join(SHAPES)}; or key=value pairs such as "
                            "hidden=768,layers=12,heads=16,kv_heads=8,head_dim=128,intermediate=2048)")
        try:
            shape = dict(kv.split("=", 1) for kv in shape.split(",") if kv.strip())
        except ValueError:
            raise GrowError(f"shape {shape!r}: expected comma-separated key=value pairs") from None
    if not isinstance(shape, dict):
        raise GrowError(f"shape must be a name, a mapping or key=value pairs, got {type(shape).__name__}")
    values: dict[str, int] = {}
    names = {f.name for f in fields(GrowShape)}
    for key, value in shape.items():
        name = ALIASES.get(str(key).strip(), str(key).strip())
        if name not in names:
            raise GrowError(f"shape key {key!r} unknown (use {', '.join(sorted(names | set(ALIASES)))})")
        try:
            values[name] = int(value)
        except (TypeError, ValueError):
            raise GrowError(f"shape key {key!r}: expected an integer, got {value!r}") from None
        if values[name] < 1:
            raise GrowError(f"shape key {key!r}: must be >= 1, got {value!r}")
    missing = sorted(names - set(values))
    if missing:
        raise GrowError(f"shape is missing {', '.join(missing)}")
    return "custom", GrowShape(**values)


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class Growth:
    """Where every small weight lands in the big model; built and checked by ``plan_growth``."""
    label: str
    small: GrowShape
    big: GrowShape
    small_config: dict[str, Any]
    config: dict[str, Any]  # the grown model's HF config
    q_rows: Tensor = field(repr=False)  # [n_head * hd]: big q row of each small q row
    q_pad_rows: Tensor = field(repr=False)  # big q rows of placed heads that hold no small dim
    kv_rows: Tensor = field(repr=False)  # [n_kv * hd]: big k/v row of each small k/v row

    @property
    def tied(self) -> bool:
        return bool(self.small_config.get("tie_word_embeddings", False))

    @property
    def vocab_size(self) -> int:
        return int(self.small_config["vocab_size"])

    @property
    def norm_scale(self) -> float:
        return math.sqrt(self.small.hidden_size / self.big.hidden_size)

    @property
    def q_scale(self) -> float:
        return math.sqrt(self.big.head_dim / self.small.head_dim)


def head_dim_map(hd: int, HD: int) -> Tensor:
    """Big head dim of each small head dim, keeping every rotary pair's frequency (rotate-half convention)."""
    r, half = HD // hd, hd // 2
    j = torch.arange(half)
    return torch.cat([r * j, r * j + HD // 2])


def plan_growth(small_cfg: dict[str, Any], shape: str | dict[str, Any] | GrowShape) -> Growth:
    """Check that ``shape`` can hold the small model and compute the placement; errors say what does not fit."""
    label, big = parse_shape(shape)
    try:
        small = GrowShape.of_config(small_cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise GrowError(f"config.json: not a complete Llama config ({exc!r})") from None
    if small_cfg.get("model_type") != "llama":
        raise GrowError(f"only Llama models grow (model_type {small_cfg.get('model_type')!r})")
    if small_cfg.get("attention_bias") or small_cfg.get("mlp_bias"):
        raise GrowError("models with attention or MLP biases do not grow (not supported)")
    rope = dict(small_cfg.get("rope_parameters") or small_cfg.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise GrowError(f"RoPE type {kind!r} does not grow (supported: {', '.join(ROPE_TYPES)})")
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "head_dim", "num_key_value_heads"):
        if getattr(big, name) < getattr(small, name):
            raise GrowError(f"{name} {getattr(big, name)} < the model's {getattr(small, name)}: growth only adds")
    s, b = small, big
    if s.num_attention_heads % s.num_key_value_heads or b.num_attention_heads % b.num_key_value_heads:
        raise GrowError("num_attention_heads must be a multiple of num_key_value_heads")
    g, G = s.num_attention_heads // s.num_key_value_heads, b.num_attention_heads // b.num_key_value_heads
    if g > G:
        raise GrowError(f"query heads per KV head {G} < the model's {g}: a KV group cannot hold its queries")
    if b.hidden_size % b.num_attention_heads:
        raise GrowError(f"hidden_size {b.hidden_size} must be a multiple of num_attention_heads "
                        f"{b.num_attention_heads} (transformers' LlamaConfig requires it)")
    if b.head_dim % s.head_dim or s.head_dim % 2 or b.head_dim % 2:
        raise GrowError(f"head_dim {b.head_dim} must be an even multiple of the model's {s.head_dim} (RoPE pairs "
                        "keep their frequencies only then)")
    dims = head_dim_map(s.head_dim, b.head_dim)
    q_heads = torch.tensor([(i // g) * G + i % g for i in range(s.num_attention_heads)])
    q_rows = (q_heads[:, None] * b.head_dim + dims[None, :]).flatten()
    kv_rows = (torch.arange(s.num_key_value_heads)[:, None] * b.head_dim + dims[None, :]).flatten()
    placed = (q_heads[:, None] * b.head_dim + torch.arange(b.head_dim)[None, :]).flatten()
    q_pad_rows = placed[~torch.isin(placed, q_rows)]
    config = {k: v for k, v in small_cfg.items()}
    config.update(asdict(big))
    config["rms_norm_eps"] = float(small_cfg.get("rms_norm_eps", 1e-6)) * s.hidden_size / b.hidden_size
    config["specmq_grown"] = {"from": asdict(small), "shape": label,
                              "note": "function-preserving growth: the body has this shape, the vocabulary is "
                                      "the small model's"}
    return Growth(label, small, big, dict(small_cfg), config, q_rows, q_pad_rows, kv_rows)


# ----------------------------------------------------------------------------------------------- growing
class _Draw:
    """Random and zero tensors on the target device and dtype (``meta``: shapes only)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        self.device, self.dtype = device, dtype
        self.meta = device.type == "meta"
        self.gen = None if self.meta else torch.Generator(device=device).manual_seed(seed)

    def random(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """N(0, std(like)): the magnitude of the weight it extends (power draw depends on the values)."""
        if self.meta:
            return torch.empty(shape, device=self.device, dtype=self.dtype)
        std = float(like.float().std()) if like.numel() > 1 else 1.0
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype).mul_(std)

    def zeros(self, shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    def put(self, t: Tensor) -> Tensor:
        """A small tensor on the target device, in float32 (scaled before the cast to the target dtype)."""
        return t.to(self.device, torch.float32)


def _norm(small: Tensor, growth: Growth, draw: _Draw) -> Tensor:
    """RMSNorm weight: the small one times sqrt(d/D), padded dims at the mean (they multiply zeros)."""
    scaled = draw.put(small) * growth.norm_scale
    fill = float(scaled.mean()) if not draw.meta else 1.0
    out = torch.full((growth.big.hidden_size,), fill, device=draw.device, dtype=draw.dtype)
    out[:growth.small.hidden_size] = scaled
    return out


def _grow_layer(small: dict[str, Tensor] | None, ref: dict[str, Tensor], growth: Growth, draw: _Draw
                ) -> dict[str, Tensor]:
    """One layer in HF names relative to ``model.layers.N.``. ``small`` None: an added layer (random, with the
    magnitudes of ``ref``, the last small layer), whose o_proj and down_proj are zero."""
    s, b = growth.small, growth.big
    d, D, inter = s.hidden_size, b.hidden_size, s.intermediate_size
    q_out, kv_out = b.num_attention_heads * b.head_dim, b.num_key_value_heads * b.head_dim
    out = {name: draw.random((rows, D), ref[name]) for name, rows in (
        ("self_attn.q_proj.weight", q_out), ("self_attn.k_proj.weight", kv_out),
        ("self_attn.v_proj.weight", kv_out), ("mlp.gate_proj.weight", b.intermediate_size),
        ("mlp.up_proj.weight", b.intermediate_size))}
    out["self_attn.o_proj.weight"] = draw.zeros((D, q_out))
    out["mlp.down_proj.weight"] = draw.zeros((D, b.intermediate_size))
    if small is None:
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[name] = _norm(ref[name], growth, draw)
        return out
    q = out["self_attn.q_proj.weight"]
    q[growth.q_pad_rows, :d] = 0.0  # padded head dims of placed heads: q·k sees only the small dims
    q[growth.q_rows, :d] = (draw.put(small["self_attn.q_proj.weight"]) * growth.q_scale).to(draw.dtype)
    for x in "kv":
        out[f"self_attn.{x}_proj.weight"][growth.kv_rows, :d] = draw.put(small[f"self_attn.{x}_proj.weight"]).to(
            draw.dtype)
    out["self_attn.o_proj.weight"][:d, growth.q_rows] = draw.put(small["self_attn.o_proj.weight"]).to(draw.dtype)
    for x in ("gate", "up"):
        out[f"mlp.{x}_proj.weight"][:inter, :d] = draw.put(small[f"mlp.{x}_proj.weight"]).to(draw.dtype)
    out["mlp.down_proj.weight"][:d, :inter] = draw.put(small["mlp.down_proj.weight"]).to(draw.dtype)
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        out[name] = _norm(small[name], growth, draw)
    return out


def grow_parts(small_sd: dict[str, Tensor], growth: Growth, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "float32", seed: int = 0) -> Iterator[tuple[str, dict[str, Tensor]]]:
    """The grown HF tensors part by part (``"embed"``, ``"layer.N"``..., ``"final"``): one layer in memory at a
    time besides what the caller keeps. A tied model gets no ``lm_head.weight`` (it is the embedding)."""
    dev = torch.device(device) if str(device) == "meta" else parse_device(device)
    draw = _Draw(dev, parse_dtype(dtype), seed)
    s, b = growth.small, growth.big
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in small_sd]
    if missing:
        raise GrowError(f"weights lack {', '.join(missing)}")
    embed = draw.zeros((growth.vocab_size, b.hidden_size))  # the residual stream: zero past d
    embed[:, :s.hidden_size] = draw.put(small_sd["model.embed_tokens.weight"]).to(draw.dtype)
    yield "embed", {"model.embed_tokens.weight": embed}
    last: dict[str, Tensor] = {}
    for i in range(b.num_hidden_layers):
        prefix = f"model.layers.{i}."
        small = None
        if i < s.num_hidden_layers:
            small = {k[len(prefix):]: v for k, v in small_sd.items() if k.startswith(prefix)}
            last = small
        try:
            layer = _grow_layer(small, last, growth, draw)
        except KeyError as exc:
            raise GrowError(f"weights lack {prefix}{exc.args[0]}") from None
        yield f"layer.{i}", {prefix + k: v for k, v in layer.items()}
    final = {"model.norm.weight": _norm(small_sd["model.norm.weight"], growth, draw)}
    if not growth.tied:
        if "lm_head.weight" not in small_sd:
            raise GrowError("weights lack lm_head.weight (and tie_word_embeddings is false)")
        head = small_sd["lm_head.weight"]
        final["lm_head.weight"] = draw.random((growth.vocab_size, b.hidden_size), head)
        final["lm_head.weight"][:, :s.hidden_size] = draw.put(head).to(draw.dtype)
    yield "final", final


def grow_state_dict(small_sd: dict[str, Tensor], small_cfg: dict[str, Any],
                    shape: str | dict[str, Any] | GrowShape, *, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "float32", seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The whole grown state dict (HF names) and its HF config; ``device="meta"`` gives shapes only."""
    growth = plan_growth(small_cfg, shape)
    sd: dict[str, Tensor] = {}
    for _, part in grow_parts(small_sd, growth, device=device, dtype=dtype, seed=seed):
        sd.update(part)
    return sd, growth.config


def read_state_dict(model_dir: str | Path) -> dict[str, Tensor]:
    """Every tensor of an HF directory's safetensors (the small model: megabytes), on CPU."""
    from safetensors.torch import load_file

    from workers.engine.llama import weight_files

    path = Path(model_dir)
    sd: dict[str, Tensor] = {}
    try:
        for f in weight_files(path):
            sd.update(load_file(str(f)))
    except (FileNotFoundError, ValueError) as exc:
        raise GrowError(str(exc)) from None
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise GrowError(f"{path}: cannot read weights: {exc}") from None
    return sd


def parameter_count(shape: GrowShape, vocab_size: int, tied: bool) -> int:
    """Parameters of a Llama body of ``shape`` with a ``vocab_size`` embedding (and lm_head unless tied)."""
    D, H, Hkv, hd = shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    layer = D * (H * hd) * 2 + D * (Hkv * hd) * 2 + 3 * D * shape.intermediate_size + 2 * D
    return shape.num_hidden_layers * layer + vocab_size * D * (1 if tied else 2) + D


# ----------------------------------------------------------------------------------------------- results
@dataclass
class GrowReport:
    """What was grown: printed by ``specmq model grow`` and logged when an engine grows in memory."""
    source: str
    shape: str
    big: dict[str, int]
    vocab_size: int
    tied: bool
    parameters: int
    weight_bytes: int
    dtype: str
    out: str | None = None
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.shape} ({GrowShape(**self.big).describe()}) from {self.source}: "
                f"{self.parameters / 1e9:.3f} B parameters, {self.weight_bytes / 1e9:.2f} GB of {self.dtype} weights; "
                f"vocabulary {self.vocab_size} is the small model's (the body has the shape, the embedding does not)")


def _report(model_dir: Path, growth: Growth, dtype: torch.dtype, out: Path | None = None,
            files: list[str] | None = None) -> GrowReport:
    n = parameter_count(growth.big, growth.vocab_size, growth.tied)
    return GrowReport(source=str(model_dir), shape=growth.label, big=asdict(growth.big), vocab_size=growth.vocab_size,
                      tied=growth.tied, parameters=n, weight_bytes=n * torch.empty((), dtype=dtype).element_size(),
                      dtype=dtype_name(dtype), out=str(out) if out else None, files=files or [])


def write_grown(model_dir: str | Path, shape: str | dict[str, Any] | GrowShape, out_dir: str | Path, *,
                dtype: str = "bfloat16", seed: int = 0, force: bool = False,
                progress: Callable[[Iterator], Iterator] | None = None) -> GrowReport:
    """Write the grown model as an HF directory (config.json, safetensors shards, the small model's tokenizer and
    generation files), one layer in memory at a time. ``progress`` wraps the part iterator (e.g. tqdm)."""
    from safetensors.torch import save_file

    path, small_cfg = read_config(model_dir)
    growth = plan_growth(small_cfg, shape)
    dt = parse_dtype(dtype)
    out = Path(out_dir)
    if out.resolve() == path.resolve():
        raise GrowError("--out must differ from the source directory")
    if out.exists() and not out.is_dir():
        raise GrowError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GrowError(f"{out} is not empty (use --force to overwrite)")
    small_sd = read_state_dict(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    # shards: whole parts, planned from their sizes so that the file names know the shard count
    sizes = _part_bytes(growth, dt)
    shard_of, shard, used = [], 0, 0
    for size in sizes:
        if used and used + size > SHARD_BYTES:
            shard, used = shard + 1, 0
        shard_of.append(shard)
        used += size
    n_shards = shard + 1
    names = ["model.safetensors"] if n_shards == 1 else [
        f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map: dict[str, str] = {}
    pending: dict[str, Tensor] = {}
    parts = grow_parts(small_sd, growth, device="cpu", dtype=dt, seed=seed)
    for k, (_, part) in enumerate(progress(parts) if progress else parts):
        pending.update(part)
        if k + 1 == len(sizes) or shard_of[k + 1] != shard_of[k]:
            name = names[shard_of[k]]
            save_file({n: t.contiguous() for n, t in pending.items()}, str(out / name), metadata={"format": "pt"})
            (out / name).chmod(0o644)  # safetensors creates its files private; the tokenizer files beside are not
            weight_map.update((n, name) for n in pending)
            pending = {}
    total = sum(sizes)
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = dict(growth.config)
    config["dtype"] = dtype_name(dt)
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copied = []
    for f in sorted(path.iterdir()):  # tokenizer and generation files: everything but config and weights
        if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES) \
                and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    report = _report(path, growth, dt, out, names + copied)
    log.info("grow.written", logger="grow", out=str(out), shape=growth.label, parameters=report.parameters,
             weight_bytes=report.weight_bytes, shards=n_shards)
    return report


def _part_bytes(growth: Growth, dtype: torch.dtype) -> list[int]:
    """Bytes of each part that ``grow_parts`` yields (embed, layers..., final), from the shapes alone."""
    b, size = growth.big, torch.empty((), dtype=dtype).element_size()
    D, q, kv = b.hidden_size, b.num_attention_heads * b.head_dim, b.num_key_value_heads * b.head_dim
    layer = (2 * D * q + 2 * D * kv + 3 * D * b.intermediate_size + 2 * D) * size
    final = (D + (0 if growth.tied else growth.vocab_size * D)) * size
    return [growth.vocab_size * D * size] + [layer] * b.num_hidden_layers + [final]


def grow_model(model_dir: str | Path, shape: str | dict[str, Any] | GrowShape, device: str | torch.device,
               dtype: str | torch.dtype, seed: int = 0):
    """The grown model as our ``Transformer``, built in memory on ``device`` in ``dtype``, layer by layer (an 8B
    directory need not be written): host memory holds the small model only. Returns ``(model, report)``."""
    from workers.engine.llama import ModelArgs, Transformer, layer_from_hf

    path, small_cfg = read_config(model_dir)
    growth = plan_growth(small_cfg, shape)
    dev, dt = parse_device(device), parse_dtype(dtype)
    args = ModelArgs.from_hf_config(growth.config)
    small_sd = read_state_dict(path)
    with torch.device("meta"):
        model = Transformer(args)
    for name, part in grow_parts(small_sd, growth, device=dev, dtype=dt, seed=seed):
        if name == "embed":
            model.tok_embeddings.load_state_dict({"weight": part["model.embed_tokens.weight"]}, assign=True)
        elif name == "final":
            model.norm.load_state_dict({"weight": part["model.norm.weight"]}, assign=True)
            head = model.tok_embeddings.weight if growth.tied else torch.nn.Parameter(part["lm_head.weight"])
            model.output.weight = head
        else:
            i = int(name.split(".")[1])
            model.layers[i].load_state_dict(layer_from_hf(part.pop, i, args), strict=True, assign=True)
    report = _report(path, growth, dt)
    log.info("grow.in_memory", logger="grow", source=str(path), shape=growth.label, device=str(dev),
             parameters=report.parameters, weight_bytes=report.weight_bytes)
    return model.eval(), report


def shape_label(shape: str | dict[str, Any] | GrowShape) -> str:
    return parse_shape(shape)[0]

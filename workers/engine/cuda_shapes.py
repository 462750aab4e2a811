"""Named Llama shapes with random weights, for profiling and benchmarks (the shape, not the weights, sets the time).

``random_engine(shape, device, dtype, slots, max_context)`` builds the engine the product would run there: the
CUDA-graph engine on CUDA, the eager ``TorchEngine`` on CPU. Weights are drawn directly in the target dtype on the
target device (no float32 copy of an 8B model).
"""
from __future__ import annotations

import torch

from workers.engine.base import Engine, EngineInfo
from workers.engine.llama import ModelArgs, Transformer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

SHAPES: dict[str, ModelArgs] = {
    "llama-3.1-8b": ModelArgs(vocab_size=128256, dim=4096, intermediate_size=14336, n_layer=32, n_head=32,
                              n_kv_head=8, head_dim=128, norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072),
    "llama-3.2-1b": ModelArgs(vocab_size=128256, dim=2048, intermediate_size=8192, n_layer=16, n_head=32,
                              n_kv_head=8, head_dim=64, norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling={**LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
                              tie_word_embeddings=True),
    # the shipped tiny pair's shapes (models/tiny-target, models/tiny-draft)
    "tiny": ModelArgs(vocab_size=8192, dim=384, intermediate_size=1024, n_layer=10, n_head=6, n_kv_head=6,
                      head_dim=64, norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=True),
    "tiny-draft": ModelArgs(vocab_size=8192, dim=128, intermediate_size=384, n_layer=2, n_head=4, n_kv_head=4,
                            head_dim=32, norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=True),
}
DRAFT_OF = {"llama-3.1-8b": "llama-3.2-1b", "llama-3.2-1b": "llama-3.2-1b", "tiny": "tiny-draft",
            "tiny-draft": "tiny-draft"}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameters (tied embeddings counted once): what one forward must read."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    return args.n_layer * 2 * args.n_kv_head * args.head_dim * torch.empty((), dtype=dtype).element_size()


@torch.no_grad()
def random_model(args: ModelArgs, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A Transformer of ``args`` with random weights (nn defaults: scaled uniform linears, N(0,1) embeddings)."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(old)
    model.tok_embeddings.weight.mul_(0.02)  # keep activations in a realistic range
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def random_engine(shape: str | ModelArgs, device: str = "cpu", dtype: str = "float32", slots: int = 8,
                  max_context: int = 2048, **kw) -> Engine:
    from workers.engine.model_dir import dtype_name, parse_device, parse_dtype

    args = SHAPES[shape] if isinstance(shape, str) else shape
    dev, dt = parse_device(device), parse_dtype(dtype)
    model = random_model(args, dev, dt)
    info = EngineInfo(model_id=f"random-{shape if isinstance(shape, str) else 'llama'}", vocab_size=args.vocab_size,
                      max_context=max_context, num_slots=slots, eos_token_id=None, dtype=dtype_name(dt),
                      device=str(dev))
    if dev.type == "cuda":
        from workers.engine.cuda_engine import make_engine
        return make_engine(model, info, **kw)
    from workers.engine.torch_engine import TorchEngine
    model.setup_caches(slots, max_context)
    return TorchEngine(model, info)


def fill_cache_randomly(engine: Engine, seed: int = 0) -> None:
    """Random K/V everywhere (timings never run on zeros), for benchmarks that set slot lengths directly."""
    torch.manual_seed(seed)
    for k, v in getattr(engine, "kv", []):  # the CUDA-graph engine's own caches
        k.normal_()
        v.normal_()
    if hasattr(engine, "kv"):
        return
    for layer in engine.model.layers:  # type: ignore[attr-defined]
        layer.attention.kv_cache.k.normal_()
        layer.attention.kv_cache.v.normal_()

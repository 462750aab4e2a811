"""Model engines: load an HF causal LM directory and serve batched, per-slot forwards (see ``base.py``).

``load_engine(model_dir, backend="auto")`` picks our compact Llama (``torch_engine``) for ``model_type == "llama"``
and the recompute engine (``reference``) for anything else transformers can load. ``backend="cuda"`` is the
CUDA-graph engine (``cuda_engine``: static per-slot cache, (batch, tokens) buckets; on CPU it runs the same
static-shape forward without graphs). A directory whose config.json says ``model_type: specmq-emulated`` loads the
emulated engine (``emulated``: a profiled device's step times, no weights). What a Neuron engine would need is written down in ``docs/backends.md``.
"""
from __future__ import annotations

from pathlib import Path

from workers.engine.base import Engine, EngineError, EngineInfo, NoFreeSlot
from workers.engine.model_dir import read_config
from workers.engine.tokenizer_id import tokenizer_fingerprint

BACKENDS = ("auto", "llama", "cuda", "reference")

__all__ = ["Engine", "EngineError", "EngineInfo", "NoFreeSlot", "load_engine", "tokenizer_fingerprint", "BACKENDS"]


def load_engine(model_dir: str | Path, device: str = "cpu", dtype: str = "float32", slots: int = 8,
                max_context: int | None = None, backend: str = "auto", grow: str | dict | None = None) -> Engine:
    """Load ``model_dir`` with the named backend; errors are ``EngineError`` with a one-line reason.

    ``grow``: a shape name (``grow.SHAPES``, e.g. "llama-3.1-8b") or mapping: the model grown in memory to that
    shape, computing what ``model_dir``'s model computes at the big shape's cost (``grow.py``; llama and cuda).
    """
    if backend not in BACKENDS:
        raise EngineError(f"backend {backend!r} unknown (choose from {', '.join(BACKENDS)})")
    _, cfg = read_config(model_dir)
    from workers.engine.emulated import MODEL_TYPE, load_emulated_engine
    if cfg.get("model_type") == MODEL_TYPE:  # no weights: any backend runs it the same way (workers/engine/emulated.py)
        if grow is not None:
            raise EngineError(f"{model_dir}: an emulated model cannot grow (its cost table sets its size)")
        return load_emulated_engine(model_dir, cfg, slots=slots, max_context=max_context)
    if backend == "auto":
        from workers.engine.torch_engine import SUPPORTED_MODEL_TYPES
        backend = "llama" if cfg.get("model_type") in SUPPORTED_MODEL_TYPES else "reference"
    if backend == "llama":
        from workers.engine.torch_engine import load_torch_engine
        return load_torch_engine(model_dir, device=device, dtype=dtype, slots=slots, max_context=max_context,
                                 grow=grow)
    if backend == "cuda":
        from workers.engine.cuda_engine import load_cuda_engine
        return load_cuda_engine(model_dir, device=device, dtype=dtype, slots=slots, max_context=max_context,
                                grow=grow)
    if grow is not None:
        raise EngineError(f"grow needs the llama or cuda backend, not {backend!r}")
    from workers.engine.reference import load_reference_engine
    return load_reference_engine(model_dir, device=device, dtype=dtype, slots=slots, max_context=max_context)

"""The torch backend (CPU, CUDA eager): our compact Llama (``llama.py``) behind the ``Engine`` interface.

One ``forward`` = one batched model call: rows are right-padded to the longest, every layer writes the valid new
K/V into each row's slot at its own positions and attends over its slot with a per-row mask (see ``llama.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from workers.engine.base import EngineError, EngineInfo
from workers.engine.llama import BatchContext, ModelArgs, Transformer, load_weights
from workers.engine.model_dir import dtype_name, eos_token_ids, parse_device, parse_dtype, read_config
from workers.engine.slots import SlotTable, SlotTableEngine
from workers.engine.tokenizer_id import tokenizer_fingerprint

SUPPORTED_MODEL_TYPES = ("llama",)
DEFAULT_MAX_CONTEXT = 2048  # cap when max_context=None: the cache is slots x layers x 2 x kv x ctx x head_dim


class TorchEngine(SlotTableEngine):
    def __init__(self, model: Transformer, info: EngineInfo) -> None:
        self.model = model
        self.info = info
        self.device = next(model.parameters()).device
        self.table = SlotTable(info.num_slots, info.max_context, info.vocab_size)

    # ---- the one forward
    def forward(self, rows: Sequence[tuple[int, Sequence[int]]], last_only: Sequence[bool] | None = None
                ) -> list[torch.Tensor]:
        slots, tokens, last = self.table.check_rows(rows, last_only)
        counts = [len(t) for t in tokens]
        lengths = [self.table.lengths[s] for s in slots]
        T = max(counts)
        padded = torch.tensor([t + [0] * (T - len(t)) for t in tokens], dtype=torch.long, device=self.device)
        # flat indices (into B*T) of the positions whose logits are wanted
        want = [[b * T + n - 1] if lo else list(range(b * T, b * T + n)) for b, (n, lo) in enumerate(zip(counts, last))]
        flat = [i for w in want for i in w]
        select = None if len(flat) == len(tokens) * T else torch.tensor(flat, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            ctx = BatchContext.build(slots, lengths, counts, self.model.rope, self.model.tok_embeddings.weight.dtype,
                                     self.device)
            logits = self.model(padded, ctx, select).float()
        for s, n in zip(slots, counts):
            self.table.lengths[s] += n
        return list(logits.split([len(w) for w in want]))


def load_llama(model_dir: str | Path, device: str, dtype: str, slots: int, max_context: int | None,
               backend: str = "llama", grow: str | dict | None = None) -> tuple[Transformer, EngineInfo]:
    """Read, check and load a Llama HF directory onto ``device`` (no caches yet); shared by the torch and CUDA
    backends so that both refuse the same bad input with the same one-line errors. ``grow``: a shape name or
    mapping (``grow.py``): the model grown to it in memory, computing what the directory's model computes."""
    path, cfg = read_config(model_dir)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(f"{path}: architecture {model_type!r} not supported by the {backend} backend "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}; use backend='reference' for others)")
    dev, dt = parse_device(device), parse_dtype(dtype)
    if not isinstance(slots, int) or slots < 1:
        raise EngineError(f"slots must be a positive integer, got {slots!r}")
    try:
        args = ModelArgs.from_hf_config(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"{path}/config.json: unsupported or incomplete Llama config: {exc!r}") from exc
    ctx = max_context if max_context is not None else min(args.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    if not isinstance(ctx, int) or ctx < 1:
        raise EngineError(f"max_context must be a positive integer, got {max_context!r}")
    model_id = path.resolve().name
    if grow is not None:
        from workers.engine.grow import grow_model

        model, report = grow_model(path, grow, dev, dt)
        model_id = f"{model_id}@{report.shape}"
    else:
        with torch.device("meta"):
            model = Transformer(args)
        try:
            load_weights(model, path)
        except (FileNotFoundError, ValueError) as exc:
            raise EngineError(str(exc)) from exc
        model = model.to(device=dev, dtype=dt).eval()
    eos = eos_token_ids(path, cfg)
    info = EngineInfo(model_id=model_id, vocab_size=args.vocab_size, max_context=ctx, num_slots=slots,
                      eos_token_id=eos[0] if eos else None, dtype=dtype_name(dt), device=str(dev),
                      tokenizer_fingerprint=tokenizer_fingerprint(path), eos_token_ids=eos)
    return model, info


def load_torch_engine(model_dir: str | Path, device: str = "cpu", dtype: str = "float32", slots: int = 8,
                      max_context: int | None = None, packed: bool | None = None,
                      grow: str | dict | None = None) -> TorchEngine:
    """Load a Llama-family HF directory (config.json + safetensors) into a ``TorchEngine``.

    ``packed``: pre-pack the linears for oneDNN (``cpu_packed``); default on for float32 on CPU, where it makes a
    verify of several tokens cost about what one decode step costs. ``grow``: see ``load_llama``.
    """
    model, info = load_llama(model_dir, device, dtype, slots, max_context, grow=grow)
    model.setup_caches(slots, info.max_context)
    if packed is None:
        packed = info.device == "cpu" and model.tok_embeddings.weight.dtype == torch.float32
    if packed:
        from workers.engine.cpu_packed import pack_linears

        pack_linears(model)
    return TorchEngine(model, info)

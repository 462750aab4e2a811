"""Reading an HF model directory and the load options shared by every backend: config, eos, device, dtype."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from workers.engine.base import EngineError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def read_config(model_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Check the directory and parse its config.json; errors name the missing or broken file."""
    path = Path(model_dir)
    if not path.exists():
        raise EngineError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise EngineError(f"model path {str(path)!r} is not a directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise EngineError(f"{path}: config.json missing (not an HF model directory?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise EngineError(f"{cfg_path}: expected a JSON object")
    return path, cfg


def eos_token_ids(model_dir: Path, cfg: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids from generation_config.json when it has them, else config.json (an int or a list in either)."""
    sources: list[Any] = []
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        except (ValueError, AttributeError):
            pass
    sources.append(cfg.get("eos_token_id"))
    for value in sources:
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return tuple(value)
    return ()


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise EngineError(f"dtype {dtype} not supported (float32, bfloat16, float16)")
    if dtype not in DTYPES:
        raise EngineError(f"dtype {dtype!r} not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineError(f"device {device!r} not understood: {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError("cuda requested but torch.cuda.is_available() is False")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EngineError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise EngineError(f"device {device!r} not supported (cpu, cuda[:N])")
    return dev


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

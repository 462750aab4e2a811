"""Text <-> token ids for whoever holds text (fused worker, verify baseline, draft worker, clients).

Uses the ``tokenizers`` library on the model directory's ``tokenizer.json`` directly: the same file the engine
fingerprints, and no transformers import (seconds faster to start). ``IncrementalDecoder`` turns a growing list of
ids into text pieces for streaming, holding back a piece while it ends in a partial UTF-8 character.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


class TokenizerError(ValueError):
    """The model directory has no usable tokenizer.json."""


def load_tokenizer(model_dir: str | Path):
    """The ``tokenizers.Tokenizer`` of ``model_dir``; ``TokenizerError`` naming the file when missing or broken."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path}: missing (the model directory needs a tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"{path}: not a valid tokenizer ({str(exc).splitlines()[0][:120]})") from None
    tok.specmq_bos_id = _bos_to_prepend(Path(model_dir), tok)
    return tok


def _bos_to_prepend(model_dir: Path, tok) -> int | None:
    """The BOS id to put before a prompt, or None.

    Models are trained on ``<bos> text``; HF tokenizers add BOS through ``add_bos_token`` in tokenizer_config.json
    (default on when a ``bos_token`` is named, as Llama's are) or through the tokenizer.json template. We prepend it
    here when the template does not already do so, so every worker encodes prompts exactly as training did.
    """
    import json

    cfg_path = model_dir / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except ValueError:
        raise TokenizerError(f"{cfg_path}: not valid JSON") from None
    bos = cfg.get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    if not bos or cfg.get("add_bos_token") is False:
        return None
    bos_id = tok.token_to_id(bos)
    if bos_id is None:
        return None
    probe = tok.encode("x").ids
    return None if probe and probe[0] == bos_id else bos_id


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as the model saw text in training (special tokens per the tokenizer's template)."""
    ids = list(tokenizer.encode(text).ids)
    bos = getattr(tokenizer, "specmq_bos_id", None)
    return [bos] + ids if bos is not None else ids


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


class IncrementalDecoder:
    """Feed ids as they are committed; get back only the new text. The pieces concatenate to ``decode(all)``
    whenever decoding is prefix-stable (byte-level BPE is); ``flush()`` returns whatever was held back."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = decode(self.tokenizer, self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""  # a partial character, or a retroactive change: wait for more tokens
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        text = decode(self.tokenizer, self.ids)
        if not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    @property
    def text(self) -> str:
        return decode(self.tokenizer, self.ids)

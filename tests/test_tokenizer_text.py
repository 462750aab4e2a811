"""Prompt encoding matches training (BOS first), and streaming decode reassembles the text."""
import json
import shutil
from pathlib import Path

import pytest

from workers.tokenizer_text import IncrementalDecoder, TokenizerError, decode, encode, load_tokenizer

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-target"


def test_shipped_tokenizer_prepends_bos_like_training():
    tok = load_tokenizer(MODEL)
    ids = encode(tok, "def f(x):\n    return x\n")
    assert ids[0] == tok.token_to_id("<|bos|>")
    assert ids.count(tok.token_to_id("<|bos|>")) == 1
    assert decode(tok, ids) == "def f(x):\n    return x\n"


def test_add_bos_token_false_is_respected(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert encode(tok, "import os")[0] != tok.token_to_id("<|bos|>")


def test_missing_and_corrupt_tokenizer_named(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer"):
        load_tokenizer(tmp_path)


def test_incremental_decoder_pieces_concatenate():
    tok = load_tokenizer(MODEL)
    text = "naïve = 'héllo wörld ✓'\n"
    ids = encode(tok, text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text

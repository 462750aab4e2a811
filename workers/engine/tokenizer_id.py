"""A short, stable fingerprint of a model directory's tokenizer, so a draft and a target can check they agree.

Draft and target workers both call ``tokenizer_fingerprint(model_dir)``; the broker compares the strings. The hash is
over the canonical JSON of ``tokenizer.json`` (keys sorted, compact), so two saves of the same tokenizer that differ
only in formatting or key order agree. Without ``tokenizer.json`` it is "" (unknown: callers may skip the check).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FINGERPRINT_CHARS = 16


def fingerprint_bytes(raw: bytes) -> str:
    """Fingerprint of tokenizer.json content (canonicalised when it parses as JSON, raw bytes otherwise)."""
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        raw = canonical.encode("utf-8")
    except (ValueError, UnicodeDecodeError):
        pass
    return hashlib.sha256(raw).hexdigest()[:FINGERPRINT_CHARS]


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """16 hex chars identifying the tokenizer in ``model_dir``, or "" when it has no tokenizer.json."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return ""
    return fingerprint_bytes(path.read_bytes())

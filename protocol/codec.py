"""One codec for every message: msgpack encode, and decode + validate untrusted frames.

Validation is driven by the dataclass field annotations in ``protocol.messages``, so adding a field to a message
is the whole change. Anything wrong raises ``ProtocolError`` with a stable code naming the problem.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache
from typing import Any

import msgpack

from protocol.errors import (
    BAD_ENCODING,
    BAD_FIELD,
    BAD_VERSION,
    TOKEN_OUT_OF_RANGE,
    TOO_LARGE,
    UNKNOWN_TYPE,
    ProtocolError,
)
from protocol.messages import MESSAGE_TYPES, VERSION, Message

DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB
MAX_TOKEN_ID = (1 << 31) - 1  # absolute bound; brokers/targets check against the real vocab
TOKEN_FIELDS = ("tokens", "prompt_ids", "token_ids")


def encode(msg: Message) -> bytes:
    """Encode a message as one msgpack frame."""
    body: dict[str, Any] = {"v": VERSION, "type": msg.TYPE}
    for f in dataclasses.fields(msg):
        body[f.name] = getattr(msg, f.name)
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes, max_frame: int = DEFAULT_MAX_FRAME, vocab_size: int | None = None) -> Message:
    """Decode and validate one untrusted frame. Raises ``ProtocolError``; never anything else."""
    if len(frame) > max_frame:
        raise ProtocolError(TOO_LARGE, f"frame of {len(frame)} bytes exceeds the limit of {max_frame}")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)  # size already checked above
    except Exception as exc:  # msgpack raises many kinds: ExtraData, ValueError, UnicodeDecodeError...
        raise ProtocolError(BAD_ENCODING, f"frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise ProtocolError(BAD_ENCODING, f"message must be a map, got {type(body).__name__}")
    version = body.pop("v", None)
    if version != VERSION:
        raise ProtocolError(BAD_VERSION, f"protocol version {version!r} is not supported (this is v{VERSION})")
    mtype = body.pop("type", None)
    cls = MESSAGE_TYPES.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {mtype!r}")
    return from_fields(cls, body, vocab_size=vocab_size)


def from_fields(cls: type[Message], body: dict[str, Any], vocab_size: int | None = None) -> Message:
    """Build ``cls`` from a field map, checking names and types."""
    spec = _field_spec(cls)
    unknown = [k for k in body if k not in spec]
    if unknown:
        raise ProtocolError(BAD_FIELD, f"{cls.TYPE}: unexpected field {str(unknown[0])!r}")
    kwargs: dict[str, Any] = {}
    for name, (hint, required) in spec.items():
        if name not in body:
            if required:
                raise ProtocolError(BAD_FIELD, f"{cls.TYPE}: missing field {name!r}")
            continue
        value = body[name]
        if not _check(value, hint):
            raise ProtocolError(
                BAD_FIELD, f"{cls.TYPE}: field {name!r} must be {_describe(hint)}, got {type(value).__name__}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and hint is int and abs(value) > (1 << 62):
            raise ProtocolError(BAD_FIELD, f"{cls.TYPE}: field {name!r} is out of range")
        if name in TOKEN_FIELDS and value is not None:
            _check_tokens(cls.TYPE, name, value, vocab_size)
        kwargs[name] = value
    if "q_ids" in kwargs or "q_probs" in kwargs:
        _check_sparse(cls.TYPE, kwargs, vocab_size)
    return cls(**kwargs)


def check_tokens(tokens: list[int], vocab_size: int, what: str = "tokens") -> None:
    """Raise TOKEN_OUT_OF_RANGE unless every id is in ``[0, vocab_size)``."""
    _check_tokens("message", what, tokens, vocab_size)


def _check_tokens(mtype: str, name: str, tokens: list[int], vocab_size: int | None) -> None:
    hi = vocab_size if vocab_size else MAX_TOKEN_ID
    for t in tokens:
        if t < 0 or t >= hi:
            raise ProtocolError(TOKEN_OUT_OF_RANGE, f"{mtype}: {name} holds token id {t}, outside [0, {hi})")


def _check_sparse(mtype: str, kw: dict[str, Any], vocab_size: int | None) -> None:
    ids, probs = kw.get("q_ids"), kw.get("q_probs")
    if (ids is None) != (probs is None):
        raise ProtocolError(BAD_FIELD, f"{mtype}: q_ids and q_probs must be given together")
    if ids is None:
        return
    n = len(kw.get("tokens", []))
    if len(ids) != n or len(probs) != n:
        raise ProtocolError(BAD_FIELD, f"{mtype}: q_ids/q_probs need one entry per draft token ({n})")
    for row_ids, row_p in zip(ids, probs):
        if len(row_ids) != len(row_p) or not row_ids:
            raise ProtocolError(BAD_FIELD, f"{mtype}: each q_ids row needs a matching non-empty q_probs row")
        _check_tokens(mtype, "q_ids", row_ids, vocab_size)
        for p in row_p:
            if not (0.0 <= p <= 1.0):  # also rejects NaN
                raise ProtocolError(BAD_FIELD, f"{mtype}: q_probs holds {p!r}, outside [0, 1]")


@lru_cache(maxsize=None)
def _field_spec(cls: type[Message]) -> dict[str, tuple[Any, bool]]:
    hints = typing.get_type_hints(cls)
    spec = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        spec[f.name] = (hints[f.name], required)
    return spec


def _check(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_check(v, inner) for v in value)
    if hint is list:
        return isinstance(value, list)
    return False


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")

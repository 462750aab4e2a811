"""One codec for every message: msgpack encode, and decode + validate untrusted frames.

Validation is driven by the dataclass field annotations in ``protocol.messages``, so adding a field to a message
is the whole change. Anything wrong raises ``ProtocolError`` with a stable code naming the problem.

A draft distribution q travels as packed arrays (``Verify.q_ids`` / ``q_probs`` / ``q_lens``): ``pack_q`` builds
them, ``check_q`` validates them with vectorised checks (a full-vocabulary q is tens of thousands of numbers per
draft token; element-by-element Python checks of that cost more than the verify itself), ``unpack_q`` returns the
rows.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache
from typing import Any, Sequence

import msgpack
import numpy as np

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


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """A message class's field names, looked up once (``dataclasses.fields`` per message cost more than packing)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def encode(msg: Message) -> bytes:
    """Encode a message as one msgpack frame."""
    body: dict[str, Any] = {"v": VERSION, "type": msg.TYPE}
    for name in _field_names(type(msg)):
        body[name] = getattr(msg, name)
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
    if "q_ids" in kwargs or "q_probs" in kwargs or "q_lens" in kwargs:
        check_q(len(kwargs.get("tokens") or ()), kwargs.get("q_ids"), kwargs.get("q_probs"), kwargs.get("q_lens"),
                vocab_size, cls.TYPE)
    return cls(**kwargs)


def check_tokens(tokens: list[int], vocab_size: int, what: str = "tokens") -> None:
    """Raise TOKEN_OUT_OF_RANGE unless every id is in ``[0, vocab_size)``."""
    _check_tokens("message", what, tokens, vocab_size)


def _check_tokens(mtype: str, name: str, tokens: list[int], vocab_size: int | None) -> None:
    hi = vocab_size if vocab_size else MAX_TOKEN_ID
    for t in tokens:
        if t < 0 or t >= hi:
            raise ProtocolError(TOKEN_OUT_OF_RANGE, f"{mtype}: {name} holds token id {t}, outside [0, {hi})")


# --------------------------------------------------------------------------- draft distributions on the wire
Q_ID_DTYPE = np.dtype("<u4")  # q_ids: uint32, little-endian
Q_PROB_DTYPE = np.dtype("<f4")  # q_probs: float32, little-endian
Q_SUM_TOLERANCE = 1e-3  # a q row must sum to 1 within this


def pack_q(rows: Sequence[tuple[Any, Any]]) -> tuple[bytes | None, bytes, list[int] | None]:
    """``Verify``'s ``(q_ids, q_probs, q_lens)`` for one chunk's draft distributions, one ``(ids, probs)`` per token.

    ``ids`` None means ``probs`` is dense (entry j is q(j)); otherwise ``probs[j]`` is q(ids[j]) and q is zero
    elsewhere. Probabilities travel as float32: the drafter must draw its token from these float32 values (as
    ``workers.sampling.sample_draft_q`` does), so the target judges the exact q the token came from. Rows that are
    all dense and of one length go dense (``q_ids`` and ``q_lens`` None, 4 bytes per vocabulary entry); otherwise
    every row goes sparse (8 bytes per support entry, ids ascending).
    """
    if not rows:
        raise ValueError("pack_q needs at least one row")
    probs = [np.asarray(p) for _, p in rows]
    if all(ids is None for ids, _ in rows) and len({p.shape for p in probs}) == 1:
        return None, np.ascontiguousarray(np.stack(probs), dtype=Q_PROB_DTYPE).tobytes(), None
    id_parts, prob_parts = [], []
    for (ids, _), p in zip(rows, probs):
        if ids is None:
            ids = np.flatnonzero(p)
            p = p[ids]
        else:
            ids = np.asarray(ids)
            order = np.argsort(ids, kind="stable")
            ids, p = ids[order], p[order]
        id_parts.append(np.asarray(ids, dtype=Q_ID_DTYPE))
        prob_parts.append(np.asarray(p, dtype=Q_PROB_DTYPE))
    return (np.concatenate(id_parts).tobytes(), np.concatenate(prob_parts).tobytes(),
            [int(len(i)) for i in id_parts])


def unpack_q(n_tokens: int, q_ids: bytes | None, q_probs: bytes | None, q_lens: list[int] | None,
             vocab_size: int | None = None) -> list[tuple[np.ndarray | None, np.ndarray]] | None:
    """The rows of a wire q, ``[(ids or None when dense, float32 probs)]`` (writable copies), after ``check_q``.

    None when the chunk carries no q (greedy). Raises ``ProtocolError`` naming what is wrong."""
    arrays = _q_arrays(n_tokens, q_ids, q_probs, q_lens, vocab_size, "verify")
    if arrays is None:
        return None
    ids, probs, starts = arrays
    if ids is None:
        return [(None, row) for row in probs.reshape(n_tokens, -1).copy()]  # one copy, a view per row
    bounds = list(starts) + [len(ids)]
    return [(ids[a:b].copy(), probs[a:b].copy()) for a, b in zip(bounds, bounds[1:])]


def check_q(n_tokens: int, q_ids: bytes | None, q_probs: bytes | None, q_lens: list[int] | None,
            vocab_size: int | None = None, mtype: str = "verify") -> None:
    """Validate a wire q for a chunk of ``n_tokens`` draft tokens; raises ``ProtocolError`` naming the problem.

    Checks shapes (one row per token, lengths that agree), ids (in range, strictly ascending in each row: no
    duplicates), probabilities (finite, >= 0, each row summing to 1 within ``Q_SUM_TOLERANCE``), all vectorised.
    """
    _q_arrays(n_tokens, q_ids, q_probs, q_lens, vocab_size, mtype)


def _q_arrays(n: int, q_ids: bytes | None, q_probs: bytes | None, q_lens: list[int] | None,
              vocab_size: int | None, mtype: str) -> tuple[np.ndarray | None, np.ndarray, np.ndarray] | None:
    """(ids or None, probs, row starts) of a validated wire q, or None when there is none."""
    def bad(code: str, what: str) -> ProtocolError:
        return ProtocolError(code, f"{mtype}: {what}")

    if q_probs is None:
        if q_ids is not None or q_lens is not None:
            raise bad(BAD_FIELD, "q_ids / q_lens need q_probs")
        return None
    if n == 0:
        raise bad(BAD_FIELD, "q_probs given without draft tokens")
    if (q_ids is None) != (q_lens is None):
        raise bad(BAD_FIELD, "q_ids and q_lens must be given together (sparse q) or both left out (dense q)")
    if len(q_probs) % Q_PROB_DTYPE.itemsize:
        raise bad(BAD_FIELD, f"q_probs must hold float32 values, got {len(q_probs)} bytes")
    probs = np.frombuffer(q_probs, Q_PROB_DTYPE)
    hi = vocab_size if vocab_size else MAX_TOKEN_ID
    if q_ids is None:  # dense: n rows of one width
        if not len(probs) or len(probs) % n:
            raise bad(BAD_FIELD, f"dense q_probs holds {len(probs)} values, not {n} equal rows")
        width = len(probs) // n
        starts = np.arange(0, len(probs), width)
        ids = None
        if width > hi and np.any(probs.reshape(n, width)[:, hi:]):
            raise bad(TOKEN_OUT_OF_RANGE, f"dense q gives mass to token ids outside [0, {hi})")
    else:
        if len(q_lens) != n:
            raise bad(BAD_FIELD, f"q_lens needs one entry per draft token ({n}), got {len(q_lens)}")
        try:
            lens = np.asarray(q_lens)
        except (OverflowError, TypeError, ValueError):  # ragged: refused just below
            lens = np.zeros(0)
        if lens.dtype.kind not in "iu" or lens.ndim != 1 or lens.min() < 1 or lens.max() > len(probs):
            raise bad(BAD_FIELD, f"q_lens must be integers in [1, {len(probs)}] (non-empty rows)")
        if len(q_ids) % Q_ID_DTYPE.itemsize:
            raise bad(BAD_FIELD, f"q_ids must hold uint32 values, got {len(q_ids)} bytes")
        ids = np.frombuffer(q_ids, Q_ID_DTYPE)
        total = int(lens.sum())
        if len(ids) != total or len(probs) != total:
            raise bad(BAD_FIELD, f"q_ids holds {len(ids)} ids and q_probs {len(probs)} values; q_lens sums to "
                                 f"{total}")
        top = int(ids.max())
        if top >= hi:
            raise bad(TOKEN_OUT_OF_RANGE, f"q_ids holds token id {top}, outside [0, {hi})")
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        rising = ids[1:] > ids[:-1]
        rising[starts[1:] - 1] = True  # a new row may start lower
        if not rising.all():
            raise bad(BAD_FIELD, "q_ids must be strictly ascending within each row (no duplicate ids)")
    # every q is checked on each hop (broker, target): two passes when it is sound (a minimum, then row sums, dense
    # ones in float32: numpy sums a contiguous row pairwise, ~1e-7 off at a vocabulary of 128k, far inside the
    # tolerance); a row holding +inf sums to inf and fails the sum. The slow checks below only name the fault.
    sound = bool(len(probs)) and probs.min() >= 0  # NaN fails this too (and -inf, before a sum could meet +inf)
    if sound:
        sums = probs.reshape(n, -1).sum(axis=1) if ids is None else np.add.reduceat(probs, starts, dtype=np.float64)
        sound = bool((np.abs(sums - 1.0) <= Q_SUM_TOLERANCE).all())
    if not sound:
        if not np.isfinite(probs).all():
            raise bad(BAD_FIELD, "q_probs holds a value that is not finite")
        if (probs < 0).any():
            raise bad(BAD_FIELD, f"q_probs holds a negative probability ({float(probs.min())!r})")
        sums = np.add.reduceat(probs, starts, dtype=np.float64)
        off = np.abs(sums - 1.0) > Q_SUM_TOLERANCE
        if off.any():  # else a float32 row sum at the tolerance's edge: the float64 one decides
            i = int(np.argmax(off))
            raise bad(BAD_FIELD, f"q row {i} sums to {float(sums[i]):.6f}, expected 1")
    return ids, probs, starts


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
    if hint is bytes:
        return isinstance(value, bytes)
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

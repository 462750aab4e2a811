"""Frames on the wire: parse untrusted frames into validated message maps, fast, and send them with few calls.

Brokers and workers both use this: the broker forwards most messages after changing one field (the namespaced
session or job id), so it works on the decoded msgpack map rather than on dataclasses. ``parse`` gives the same
verdicts as ``protocol.codec.decode`` (same error codes) but checks the two hot messages, ``verify`` and ``result``
without q, by hand; every other message goes through the codec's dataclass-driven validation (its q checks are
vectorised).
``raw_send`` / ``raw_recv`` / ``raw_get`` are pyzmq's base socket methods, without the per-call flag sugar.
"""
from __future__ import annotations

from typing import Any

import msgpack
import zmq

from protocol.codec import MAX_TOKEN_ID, TOKEN_FIELDS, check_q, from_fields
from protocol.errors import BAD_ENCODING, BAD_VERSION, TOO_LARGE, UNKNOWN_TYPE, ProtocolError
from protocol.messages import MESSAGE_TYPES, VERSION, Message

try:  # pyzmq's sugar send/recv spend ~2 us per call on flag enums; the Cython base methods take ~0.5 us
    from zmq.backend.cython._zmq import Socket as _BaseSocket
except ImportError:  # pragma: no cover - CFFI backend (PyPy)
    _BaseSocket = zmq.Socket
raw_send = _BaseSocket.send
raw_recv = _BaseSocket.recv
raw_get = _BaseSocket.get
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)

_unpackb = msgpack.unpackb
_INT_MAX = 1 << 62
_VERIFY_KEYS = frozenset(("v", "type", "session", "seq", "pos", "tokens", "sent_at", "q_ids", "q_probs",
                          "incarnation", "decode", "draft_ms", "path_ms", "q_lens", "catchup_ms",
                          "catchup_tokens"))
_RESULT_KEYS = frozenset(("v", "type", "session", "seq", "accepted", "tokens", "pos", "finished", "sent_at",
                          "verify_ms", "queue_ms", "busy_wait_ms", "incarnation", "broker", "next_gamma"))
_Q_BYTES = (bytes, type(None))
_Q_LENS = (list, type(None))
_TOKENS_KEYS = frozenset(("v", "type", "job", "tokens", "text", "index", "incarnation", "broker"))


_packer = msgpack.Packer(use_bin_type=True)  # reused: ~half the cost of packb; C code, holds the GIL
pack = _packer.pack


def _ok_int(x: Any) -> bool:
    return type(x) is int and -_INT_MAX <= x <= _INT_MAX


def _ok_tokens(tokens: Any) -> bool:
    if type(tokens) is not list:
        return False
    for t in tokens:
        if type(t) is not int or t < 0 or t >= MAX_TOKEN_ID:
            return False
    return True


def _ok_float(x: Any) -> bool:
    return type(x) is float or type(x) is int


def _fast_verify(b: dict) -> bool:
    """A Verify checked in one function: the hot path, so no helper calls but ``check_q`` (vectorised) for q."""
    if not b.keys() <= _VERIFY_KEYS:
        return False
    seq, pos, tokens, sent = b.get("seq"), b.get("pos"), b.get("tokens"), b.get("sent_at", 0.0)
    inc = b.get("incarnation", 0)
    if (type(b.get("session")) is not str or type(seq) is not int or type(pos) is not int
            or type(inc) is not int or not (-_INT_MAX <= inc <= _INT_MAX)
            or type(tokens) is not list or not (type(sent) is float or type(sent) is int)
            or type(b.get("q_ids", b"")) not in _Q_BYTES or type(b.get("q_probs", b"")) not in _Q_BYTES
            or type(b.get("q_lens", [])) not in _Q_LENS
            or not _ok_int(b.get("decode", 0)) or not _ok_float(b.get("draft_ms", 0.0))
            or not _ok_float(b.get("path_ms", 0.0)) or not _ok_float(b.get("catchup_ms", 0.0))
            or not _ok_int(b.get("catchup_tokens", 0))
            or not (-_INT_MAX <= seq <= _INT_MAX) or not (-_INT_MAX <= pos <= _INT_MAX)):
        return False
    for t in tokens:
        if type(t) is not int or t < 0 or t >= MAX_TOKEN_ID:
            return False
    q_lens = b.get("q_lens")
    if q_lens is not None and any(type(n) is not int for n in q_lens):
        return False
    if q_lens is not None or b.get("q_ids") is not None or b.get("q_probs") is not None:
        check_q(len(tokens), b.get("q_ids"), b.get("q_probs"), q_lens)  # raises ProtocolError, as the codec does
    return True


def _fast_result(b: dict) -> bool:
    if not b.keys() <= _RESULT_KEYS:
        return False
    seq, acc, pos, tokens = b.get("seq"), b.get("accepted"), b.get("pos"), b.get("tokens")
    inc = b.get("incarnation", 0)
    if (type(b.get("session")) is not str or type(seq) is not int or type(acc) is not int or type(pos) is not int
            or type(inc) is not int or not (-_INT_MAX <= inc <= _INT_MAX)
            or type(tokens) is not list or type(b.get("finished", False)) is not bool
            or not _ok_float(b.get("sent_at", 0.0)) or not _ok_float(b.get("verify_ms", 0.0))
            or not _ok_float(b.get("queue_ms", 0.0)) or not _ok_float(b.get("busy_wait_ms", 0.0))
            or type(b.get("broker", "")) is not str
            or not _ok_int(b.get("next_gamma", -1))
            or not (-_INT_MAX <= seq <= _INT_MAX) or not (-_INT_MAX <= pos <= _INT_MAX)
            or not (-_INT_MAX <= acc <= _INT_MAX)):
        return False
    for t in tokens:
        if type(t) is not int or t < 0 or t >= MAX_TOKEN_ID:
            return False
    return True


def _fast_tokens(b: dict) -> bool:
    """A generate job's streamed ``Tokens``: the hot path of generate clients (the HTTP gateway reads thousands a
    second)."""
    if not b.keys() <= _TOKENS_KEYS:
        return False
    index, tokens, inc = b.get("index", 0), b.get("tokens"), b.get("incarnation", 0)
    if (type(b.get("job")) is not str or type(tokens) is not list or type(b.get("text", "")) is not str
            or type(b.get("broker", "")) is not str
            or type(inc) is not int or not (-_INT_MAX <= inc <= _INT_MAX)
            or type(index) is not int or not (-_INT_MAX <= index <= _INT_MAX)):
        return False
    for t in tokens:
        if type(t) is not int or t < 0 or t >= MAX_TOKEN_ID:
            return False
    return True


def parse(frame: bytes, max_frame: int) -> dict[str, Any]:
    """Decode and validate one frame into its map (``v`` and ``type`` kept). Raises ``ProtocolError`` only."""
    if len(frame) > max_frame:
        raise ProtocolError(TOO_LARGE, f"frame of {len(frame)} bytes exceeds the limit of {max_frame}")
    try:
        body = _unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # ExtraData, ValueError, UnicodeDecodeError, StackError...
        raise ProtocolError(BAD_ENCODING, f"frame is not valid msgpack ({type(exc).__name__})") from None
    if type(body) is not dict:
        raise ProtocolError(BAD_ENCODING, f"message must be a map, got {type(body).__name__}")
    if body.get("v") != VERSION or type(body.get("v")) is not int:
        raise ProtocolError(BAD_VERSION, f"protocol version {body.get('v')!r} is not supported (this is v{VERSION})")
    mtype = body.get("type")
    if mtype == "verify" and _fast_verify(body):
        return body
    if mtype == "result" and _fast_result(body):
        return body
    if mtype == "tokens" and _fast_tokens(body):
        return body
    cls = MESSAGE_TYPES.get(mtype) if type(mtype) is str else None
    if cls is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {str(mtype)[:64]!r}")
    fields = {k: v for k, v in body.items() if k != "v" and k != "type"}
    for name in TOKEN_FIELDS:  # long id lists: check them here in one fast pass, not element by element
        if name in fields and _ok_tokens(fields[name]) and not (name == "tokens" and fields.get("q_probs") is not None):
            fields[name] = []
    from_fields(cls, fields)
    return body


def to_message(body: dict[str, Any]) -> Message:
    """The dataclass of a map that ``parse`` accepted (no second validation)."""
    return MESSAGE_TYPES[body["type"]](**{k: v for k, v in body.items() if k != "v" and k != "type"})


def check_vocab(body: dict[str, Any], name: str, vocab_size: int) -> int | None:
    """The first token id in ``body[name]`` outside ``[0, vocab_size)``, or None (``vocab_size`` 0: no check)."""
    if not vocab_size:
        return None
    for t in body.get(name) or ():
        if t >= vocab_size:
            return t
    return None

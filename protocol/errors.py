"""Stable error codes. Clients match on ``code``; ``message`` is for people and may change."""
from __future__ import annotations

BAD_ENCODING = "bad_encoding"  # not msgpack, or not a map
BAD_VERSION = "bad_version"  # unknown protocol version
UNKNOWN_TYPE = "unknown_type"  # unknown message type
BAD_FIELD = "bad_field"  # missing, mistyped or unexpected field
TOO_LARGE = "too_large"  # frame over the size limit
BAD_FRAMES = "bad_frames"  # wrong number of frames
TOKEN_OUT_OF_RANGE = "token_out_of_range"
UNKNOWN_SESSION = "unknown_session"
UNKNOWN_JOB = "unknown_job"
BAD_SEQUENCE = "bad_sequence"  # a chunk's seq/pos does not follow the session's state
GAMMA_TOO_LARGE = "gamma_too_large"
CONTEXT_TOO_LONG = "context_too_long"
TOKENIZER_MISMATCH = "tokenizer_mismatch"
NO_WORKERS = "no_workers"  # no live worker can take this
NOT_ALLOWED = "not_allowed"  # message type not valid from this peer
POISON_JOB = "poison_job"  # job exceeded its delivery cap
SHUTTING_DOWN = "shutting_down"
WORKER_ERROR = "worker_error"  # the worker failed while serving the request
BAD_REQUEST = "bad_request"  # semantically invalid (e.g. bad sampling parameters)
OVERLOADED = "overloaded"  # the client's queue deadline passed before a worker slot was free

ALL_CODES = tuple(sorted(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str)))

# Transient refusals: the request may succeed later or on another broker, so a client backs off and retries
# (until its own deadline) instead of failing. A draining broker answers SHUTTING_DOWN; a broker whose workers
# have not registered yet (just restarted) answers NO_WORKERS.
RETRYABLE: frozenset[str] = frozenset((SHUTTING_DOWN, NO_WORKERS))


class SpecmqError(Exception):
    """A failure the user can act on (bad input, a missing file, an unreachable broker): the CLI prints its message
    as one line and exits 1. Library code raises this (or a subclass) where it would otherwise need the CLI's own
    error type, so lower layers never import the CLI."""


class ProtocolError(Exception):
    """Raised by the codec and handlers; becomes an ERROR reply with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

"""specmq wire protocol: message dataclasses (``messages``), one codec (``codec``), fast frame parsing for brokers
and workers (``frames``), stable error codes and the base of user-facing failures (``errors``)."""
from protocol.codec import DEFAULT_MAX_FRAME, check_tokens, decode, encode
from protocol.errors import ProtocolError
from protocol.messages import *  # noqa: F401,F403
from protocol.messages import MESSAGE_TYPES, VERSION

__all__ = ["encode", "decode", "check_tokens", "ProtocolError", "MESSAGE_TYPES", "VERSION", "DEFAULT_MAX_FRAME"]

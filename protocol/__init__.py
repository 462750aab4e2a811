"""specmq wire protocol: message dataclasses (``messages``), one codec (``codec``), stable error codes (``errors``)."""
from protocol.codec import DEFAULT_MAX_FRAME, check_tokens, decode, encode
from protocol.errors import ProtocolError
from protocol.messages import *  # noqa: F401,F403
from protocol.messages import MESSAGE_TYPES, VERSION

__all__ = ["encode", "decode", "check_tokens", "ProtocolError", "MESSAGE_TYPES", "VERSION", "DEFAULT_MAX_FRAME"]

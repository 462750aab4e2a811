"""The OpenAI API's shapes: request bodies checked into ``GenerationRequest``, responses, stream chunks, errors.

Pure functions, no I/O. Bad input raises ``ApiError`` with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` and the field named in ``param``. Parameters specmq cannot
honour (``n > 1``, logprobs, penalties, tools...) are refused when set to anything but their neutral value, so a
client never gets an answer that silently ignored what it asked for; fields this module does not know are ignored,
as vLLM does, so clients that send extra keys (``user``, ``metadata``...) keep working.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

INVALID_REQUEST = "invalid_request_error"
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_INT = (1 << 62) - 1  # the wire protocol's integer bound
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
CHAT_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))


class ApiError(Exception):
    """An HTTP error answered in OpenAI's format; ``headers`` go out with it (``Retry-After`` on a 429)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = INVALID_REQUEST, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """One checked completion or chat request (``n`` is always 1)."""

    kind: str  # "completion" or "chat"
    model: str = ""
    prompt: str | None = None  # completions: text ...
    prompt_ids: list[int] | None = None  # ... or token ids
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: [{"role", "content"}], content as text
    max_tokens: int | None = None  # None: the gateway's default
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    gamma: int = 0  # specmq extension: draft tokens per round (0: the worker's default)


# --------------------------------------------------------------------------- field checks
def _present(body: dict, name: str) -> bool:
    return body.get(name) is not None


def _int(body: dict, name: str, default: int | None, lo: int, hi: int = MAX_INT) -> int | None:
    if not _present(body, name):
        return default
    v = body[name]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(name, f"{name} must be an integer, got {type(v).__name__}", "invalid_type")
    if not lo <= v <= hi:
        span = f">= {lo}" if hi == MAX_INT and lo >= 0 else f"between {lo} and {hi}"
        raise bad(name, f"{name} must be {span}, got {v}")
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    if not _present(body, name):
        return default
    v = body[name]
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise bad(name, f"{name} must be a number, got {type(v).__name__}", "invalid_type")
    v = float(v)
    if math.isnan(v) or v > hi or v < lo or (lo_open and v == lo):
        span = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise bad(name, f"{name} must be in {span}, got {v!r}")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    if not _present(body, name):
        return default
    v = body[name]
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be true or false, got {type(v).__name__}", "invalid_type")
    return v


def _unsupported(body: dict, name: str, neutral: tuple, what: str) -> None:
    """Refuse ``name`` unless it is absent or one of its ``neutral`` values."""
    if name in body and body[name] is not None and body[name] not in neutral:
        raise bad(name, f"{name} is not supported by specmq ({what})", "unsupported_parameter")


def _stop(body: dict) -> list[str]:
    if not _present(body, "stop"):
        return []
    v = body["stop"]
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "stop must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"stop takes at most {MAX_STOP} sequences, got {len(stops)}")
    if any(not s for s in stops):
        raise bad("stop", "stop sequences must not be empty")
    return list(stops)


def _common(body: dict, req: GenerationRequest) -> GenerationRequest:
    """Fields shared by completions and chat."""
    if _present(body, "model") and not isinstance(body["model"], str):
        raise bad("model", "model must be a string", "invalid_type")
    req.model = body.get("model") or ""
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    req.seed = _int(body, "seed", 0, -MAX_INT)
    req.stop = _stop(body)
    req.stream = _bool(body, "stream", False)
    req.gamma = _int(body, "gamma", 0, 0, 64)
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise bad("n", f"n must be 1 (specmq returns one choice per request), got {n}", "unsupported_parameter")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options", "stream_options must be an object", "invalid_type")
        if not req.stream:
            raise bad("stream_options", "stream_options is only allowed when stream is true")
        req.include_usage = _bool(opts, "include_usage", False)
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, name, (0, 0.0), "penalties are not implemented")
    _unsupported(body, "logit_bias", ({},), "logit biases are not implemented")
    return req


def parse_completion(body: Any) -> GenerationRequest:
    """``POST /v1/completions`` body -> ``GenerationRequest``; ``ApiError`` naming the first bad field."""
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    req = _common(body, GenerationRequest(kind="completion"))
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "prompt is required", "missing_required_parameter")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        req.prompt = p
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        req.prompt_ids = list(p)
    elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise bad("prompt", f"one prompt per request (got {len(p)}); send one request per prompt",
                  "unsupported_parameter")
    else:
        raise bad("prompt", "prompt must be a string, a list of token ids, or a list holding one of those",
                  "invalid_type")
    req.max_tokens = _int(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, 1)
    _unsupported(body, "best_of", (1,), "one choice per request")
    _unsupported(body, "logprobs", (0, False), "log probabilities are not returned")
    _unsupported(body, "echo", (False,), "the prompt is not echoed")
    _unsupported(body, "suffix", ("",), "insertion is not implemented")
    return req


def _content(value: Any, where: str) -> str:
    """A message's content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        out = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{i}]", f"{where}[{i}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                          "(only text is supported)")
            out.append(part["text"])
        return "".join(out)
    raise bad(where, f"{where} must be a string or a list of text parts", "invalid_type")


def parse_chat(body: Any) -> GenerationRequest:
    """``POST /v1/chat/completions`` body -> ``GenerationRequest``; ``ApiError`` naming the first bad field."""
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    req = _common(body, GenerationRequest(kind="chat"))
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages", "messages is required", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list", "invalid_type")
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content", "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(sorted(CHAT_ROLES))}, got {role!r}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        req.messages.append({"role": role, "content": _content(content, f"{where}.content")})
    tokens = _int(body, "max_completion_tokens", None, 1)
    req.max_tokens = _int(body, "max_tokens", tokens, 1)
    _unsupported(body, "logprobs", (False,), "log probabilities are not returned")
    _unsupported(body, "top_logprobs", (0,), "log probabilities are not returned")
    _unsupported(body, "tools", ([],), "tool calls are not implemented")
    _unsupported(body, "functions", ([],), "function calls are not implemented")
    _unsupported(body, "tool_choice", ("none", "auto"), "tool calls are not implemented")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format", "response_format: only {\"type\": \"text\"} is supported",
                  "unsupported_parameter")
    return req


# --------------------------------------------------------------------------- responses
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(kind: str, rid: str, created: int, model: str, text: str, finish: str, use: dict,
                  ext: dict) -> dict[str, Any]:
    """A whole (non-streamed) ``text_completion`` or ``chat.completion``."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": use,
            "specmq": ext}


class ChunkFormat:
    """Server-sent events of one streamed response, each ``data: {json}\\n\\n`` line built from pre-encoded parts,
    so a chunk costs one ``json.dumps`` of its text (the hot path: one chunk per committed token batch)."""

    def __init__(self, kind: str, rid: str, created: int, model: str) -> None:
        self.kind = kind
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.head = (f'data: {{"id":{json.dumps(rid)},"object":"{obj}","created":{created},'
                     f'"model":{json.dumps(model)},"choices":[').encode()
        self.text_open = b'{"index":0,"delta":{"content":' if kind == "chat" else b'{"index":0,"text":'
        self.text_close = (b'},"logprobs":null,"finish_reason":null}]}\n\n' if kind == "chat"
                           else b',"logprobs":null,"finish_reason":null}]}\n\n')
        self.base = {"id": rid, "object": obj, "created": created, "model": model}

    def first(self) -> bytes | None:
        """Chat streams open with the assistant's role (as OpenAI's do); completions need no opening chunk."""
        if self.kind != "chat":
            return None
        return self.head + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,' \
                           b'"finish_reason":null}]}\n\n'

    def text(self, piece: str) -> bytes:
        return self.head + self.text_open + json.dumps(piece, ensure_ascii=False).encode() + self.text_close

    def final(self, finish: str, ext: dict) -> bytes:
        """The last choice chunk: empty text, the finish reason and the specmq extension."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.kind == "chat":
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return self._event({**self.base, "choices": [choice], "specmq": ext})

    def usage(self, use: dict) -> bytes:
        """``stream_options.include_usage``: a chunk with no choices and the usage, before ``[DONE]``."""
        return self._event({**self.base, "choices": [], "usage": use})

    @staticmethod
    def error(err: ApiError) -> bytes:
        return ChunkFormat._event(err.body())

    @staticmethod
    def _event(obj: dict) -> bytes:
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"

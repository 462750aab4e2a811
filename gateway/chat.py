"""Chat messages -> prompt token ids: the model's own chat template when its tokenizer has one, else a plain one.

A model directory's ``tokenizer_config.json`` may carry a Jinja ``chat_template`` (as HF tokenizers do); it is
rendered in a sandbox with the variables HF passes (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``) and tokenized without adding special tokens (the template writes them). The shipped pair has no
template: it was trained on source files, so the plain template lays the conversation out as ``Role: text`` lines
ending in ``Assistant:``, encoded like any prompt (BOS first).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.openai_api import ApiError, bad
from workers.tokenizer_text import encode


def _special(cfg: dict, name: str) -> str:
    tok = cfg.get(name) or ""
    return tok.get("content", "") if isinstance(tok, dict) else str(tok)


class ChatTemplate:
    def __init__(self, tokenizer, source: str | None = None, bos_token: str = "", eos_token: str = "") -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._compiled = None
        if source:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
            try:
                self._compiled = env.from_string(source)
            except TemplateError as exc:
                raise ValueError(f"chat_template does not compile: {exc}") from None

    @classmethod
    def load(cls, model_dir: str | Path, tokenizer) -> "ChatTemplate":
        """The template of ``model_dir/tokenizer_config.json`` (a string, or the ``default`` of a named list)."""
        path = Path(model_dir) / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except ValueError:
                raise ValueError(f"{path}: not valid JSON") from None
        source = cfg.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if source is None:
            jinja = Path(model_dir) / "chat_template.jinja"
            source = jinja.read_text() if jinja.is_file() else None
        return cls(tokenizer, source if isinstance(source, str) else None, _special(cfg, "bos_token"),
                   _special(cfg, "eos_token"))

    @property
    def name(self) -> str:
        return "model" if self._compiled is not None else "plain"

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._compiled is None:
            lines = [f"{m['role'].capitalize()}: {m['content']}\n" for m in messages]
            return "".join(lines) + "Assistant:"
        from jinja2 import TemplateError

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)
        except TemplateError as exc:
            raise bad("messages", f"the model's chat template refused these messages: {exc}") from None

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.render(messages)
        if self._compiled is None:
            return encode(self.tokenizer, text)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


def _raise(message: str) -> None:
    raise ApiError(400, f"the model's chat template refused these messages: {message}", param="messages")

"""Reading prompt files: plain text (one prompt per line) or ``.jsonl`` (``{"prompt": ...}`` per line).

Errors are ``PromptFileError`` (a ``ValueError``) naming the file and the line, so a CLI can print them as is.
"""
from __future__ import annotations

import json
from pathlib import Path


class PromptFileError(ValueError):
    pass


def read_prompts(path: str | Path) -> list[str]:
    """Every prompt in ``path``; blank lines are skipped. ``.jsonl`` lines must be objects with a string "prompt"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} not found") from None
    except IsADirectoryError:
        raise PromptFileError(f"prompt file {path} is a directory") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    prompts: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise PromptFileError(f'{path}:{lineno}: expected an object with a string "prompt" field')
        prompts.append(obj["prompt"])
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return prompts

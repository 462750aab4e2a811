"""structlog setup for the CLI: console renderer on a terminal, JSON lines otherwise; logs go to stderr.

Library modules never import this module; each gets its logger with ``structlog.get_logger("NAME")``, a lazy proxy
that is assembled at its first use, so the configuration made here (level, renderer) applies to loggers created at
import time. structlog hands the positional ``NAME`` to the logger factory; the factory configured here keeps it,
and ``add_logger_name`` writes it into every line as ``logger=NAME``. (Binding it as a keyword is not possible:
``structlog.get_logger(logger=...)`` collides with ``wrap_logger``'s own ``logger`` parameter.)
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now (test runners and daemons swap it; a captured one may be closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class NamedPrintLogger(structlog.PrintLogger):
    """A ``PrintLogger`` that remembers the name its module asked for."""

    def __init__(self, file: Any = None, name: str = "") -> None:
        super().__init__(file)
        self.name = name


class NamedPrintLoggerFactory:
    """Logger factory that keeps ``structlog.get_logger(NAME)``'s name (``PrintLoggerFactory`` drops it)."""

    def __init__(self, file: Any = None) -> None:
        self.file = file

    def __call__(self, *args: Any) -> NamedPrintLogger:
        return NamedPrintLogger(self.file, str(args[0]) if args else "")


def add_logger_name(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Processor: ``logger=NAME`` from the named logger, unless the event already names one."""
    name = getattr(logger, "name", "")
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


def configure_logging(level: str = "info", json_logs: bool | None = None) -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=NamedPrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **bind: Any) -> Any:
    """``structlog.get_logger(name, **bind)``: for CLI code; library code calls structlog itself."""
    return structlog.get_logger(name, **bind)

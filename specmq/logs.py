"""structlog setup: console renderer on a terminal, JSON lines otherwise; logs go to stderr."""
from __future__ import annotations

import logging
import sys

import structlog


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now (test runners and daemons swap it; a captured one may be closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", json_logs: bool | None = None) -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **bind):
    # A lazy proxy: binding eagerly at import time would freeze the configuration in force then (before
    # configure_logging ran), so --log-level would not apply to module-level loggers.
    return structlog.get_logger(name, **bind)

"""Benchmarks: ``specmq bench NAME`` runs ``benchmarks/NAME.py``.

Every benchmark module exposes what the command needs and nothing of the CLI: ``HELP`` (one line), ``EXAMPLE``,
optionally ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``; ``specmq.commands.bench`` builds
the parser (with ``--config``, ``--log-level`` and ``--json``) and wires them. Failures the user can act on raise
``BenchmarkError`` (printed as one line by the CLI).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from protocol.errors import SpecmqError


class BenchmarkError(SpecmqError):
    """A benchmark cannot run as asked (bad flags, a service that did not start): one line for the user."""


def print_json(obj: Any) -> None:
    """One JSON object per line on stdout (``--json`` rows)."""
    print(json.dumps(obj, sort_keys=False, default=str), flush=True)


def print_rows_json(header: dict, rows: Any) -> None:
    """``--json`` output of a table benchmark: its header object, then one object per row."""
    print_json({"header": header})
    for r in rows:
        print_json(r)


def quiet_logs(level: str = "error") -> None:
    """Drop log lines below ``level`` in a benchmark's own helper processes (they do not start through the CLI)."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())))

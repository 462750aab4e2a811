"""Shared CLI plumbing: YAML config with flag overrides, one-line failures, JSON output.

Convention for every subcommand:
- ``add_command(sub, name, help=..., example=...)`` makes a parser whose epilog shows the example and that
  already has ``--config``, ``--log-level`` and (``json=True``) ``--json``.
- Defaults come from the parser, then the YAML file, then flags given on the command line (flags win).
- The handler returns an exit code; raising ``CommandError`` (or any ``protocol.errors.SpecmqError``, which library
  code raises for failures the user can act on) prints ``specmq NAME: reason`` and exits 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from protocol.errors import SpecmqError


class CommandError(SpecmqError):
    """A failure the user can act on, found by the command itself: printed as one line, exit code 1."""


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str, example: str,
                func: Callable[[argparse.Namespace], int], json_flag: bool = False,
                description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, help="YAML file of defaults; flags override it")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (default: info)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    p.set_defaults(func=func, _parser=p)
    return p


def load_config(path: Path | None) -> dict[str, Any]:
    """Read a YAML mapping of flag names (dashes or underscores) to values."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise CommandError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CommandError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CommandError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_config(args: argparse.Namespace, argv_given: set[str]) -> argparse.Namespace:
    """Fill ``args`` from ``--config`` for every option not given on the command line."""
    cfg = load_config(getattr(args, "config", None))
    parser: argparse.ArgumentParser = args._parser
    known = {a.dest for a in parser._actions}
    for key, value in cfg.items():
        if key not in known:
            raise CommandError(f"config file {args.config}: unknown option {key!r}")
        if key not in argv_given:
            setattr(args, key, value)
    return args


def _given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    given = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                given.add(action.dest)
    return given


def run_command(args: argparse.Namespace) -> int:
    from specmq.logs import configure_logging

    try:
        argv = sys.argv[2:]
        apply_config(args, _given_dests(args._parser, argv))
        configure_logging(getattr(args, "log_level", "info"))
        rc = args.func(args)
        return int(rc or 0)
    except SpecmqError as exc:  # CommandError and the library's own user-facing failures alike
        print(f"specmq {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def positive(name: str, value: float, minimum: float = 1) -> None:
    """``--NAME`` must be at least ``minimum``."""
    if value < minimum:
        raise CommandError(f"--{name} must be >= {minimum:g}, got {value}")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=False, default=str), flush=True)


def add_worker_liveness_flags(p: argparse.ArgumentParser) -> None:
    """``--heartbeat-interval`` and ``--liveness`` of a worker's link to the broker (protocol's defaults)."""
    from protocol.messages import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS

    p.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S, help="seconds between heartbeats")
    p.add_argument("--liveness", type=int, default=HEARTBEAT_LIVENESS,
                   help="missed beats before the broker is presumed dead")

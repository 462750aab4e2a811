"""The ``specmq`` console script: one entry point, subcommands registered lazily.

Each subcommand is a module of ``specmq.commands`` exposing ``register(sub) -> None`` that adds its parser and sets
``func``; the logic it runs lives in the layer below (``broker``, ``workers``, ``simulator``, ``benchmarks``). Only
the chosen subcommand's module is imported, so ``specmq broker`` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with register(), one-line summary). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("specmq.commands.up", "start broker + target + fused workers on loopback in one command"),
    "broker": ("specmq.commands.broker", "run the ZeroMQ broker"),
    "target": ("specmq.commands.target", "run a target (verifier) worker"),
    "draft": ("specmq.commands.draft", "run a draft worker over prompts"),
    "fused": ("specmq.commands.fused", "run a fused (draft + target) worker"),
    "generate": ("specmq.commands.generate", "send whole-generation jobs to fused workers"),
    "serve": ("specmq.commands.serve", "OpenAI-compatible HTTP gateway over the generate queue"),
    "verify": ("specmq.commands.verify", "target-only autoregressive decoding, no broker (baseline)"),
    "echo-worker": ("specmq.commands.echo_worker", "run a model-free echo worker (testing and benchmarks)"),
    "monitor": ("specmq.commands.monitor", "live queue depths and worker stats"),
    "capture": ("specmq.commands.capture", "inspect capture files"),
    "replay": ("specmq.commands.replay", "replay a capture against a broker"),
    "keys": ("specmq.commands.keys", "make CURVE key pairs"),
    "simulate": ("specmq.commands.simulate", "simulate a deployment in SimPy"),
    "profile": ("specmq.commands.profile", "measure a model's step-latency table for the simulator"),
    "model": ("specmq.commands.model", "model tools: grow a model to a larger shape with the same outputs"),
    "bench": ("specmq.commands.bench", "run a benchmark (specmq bench --help lists them)"),
}

EPILOG = "Run 'specmq COMMAND --help' for a command's flags and an example."


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="specmq",
        description="Distributed speculative decoding over a message queue.",
        epilog=f"commands:\n{lines}\n\n{EPILOG}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="specmq [-h] [--version] COMMAND ...",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    top.add_argument("--version", action="store_true", help="print the version and exit")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        from specmq import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"specmq: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"specmq {name}: not available ({exc})", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(prog="specmq")
    sub = parser.add_subparsers(dest="command", required=True)
    module.register(sub)
    args = parser.parse_args(argv)
    from specmq.cliutil import run_command

    return run_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

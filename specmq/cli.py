"""The ``specmq`` console script: one entry point, subcommands registered lazily.

Each subcommand lives next to what it runs and exposes ``register(sub) -> None`` that adds its parser and sets
``func``. Only the chosen subcommand's module is imported, so ``specmq broker`` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with register(), one-line summary). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("specmq.up_cli", "start broker + target + fused workers on loopback in one command"),
    "broker": ("broker.cli", "run the ZeroMQ broker"),
    "target": ("workers.target_cli", "run a target (verifier) worker"),
    "draft": ("workers.draft_cli", "run a draft worker over prompts"),
    "fused": ("workers.fused_cli", "run a fused (draft + target) worker"),
    "generate": ("workers.generate_cli", "send whole-generation jobs to fused workers"),
    "verify": ("workers.verify_cli", "target-only autoregressive decoding, no broker (baseline)"),
    "echo-worker": ("broker.echo_worker", "run a model-free echo worker (testing and benchmarks)"),
    "monitor": ("broker.monitor_cli", "live queue depths and worker stats"),
    "capture": ("broker.capture_cli", "inspect capture files"),
    "replay": ("broker.replay_cli", "replay a capture against a broker"),
    "keys": ("broker.keys_cli", "make CURVE key pairs"),
    "simulate": ("simulator.cli", "simulate a deployment in SimPy"),
    "profile": ("workers.profile_cli", "measure a model's step-latency table for the simulator"),
    "bench": ("benchmarks.cli", "run a benchmark (broker, e2e, simulator, gpu_engine, gpu_e2e)"),
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

"""``specmq bench NAME``: benchmarks, each a module of ``benchmarks`` (see ``benchmarks/__init__.py``).

Adding a benchmark is one line in ``BENCHMARKS``; only the chosen module is imported (the broker benchmark never
imports torch).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from specmq.cliutil import CommandError, add_command

# name -> module exposing HELP, EXAMPLE, [DESCRIPTION], add_arguments(parser) and run(args)
BENCHMARKS: dict[str, str] = {
    "broker": "benchmarks.broker",
    "simulator": "benchmarks.simulator",
    "e2e": "benchmarks.e2e",
    "gpu_engine": "benchmarks.gpu_engine",
    "gpu_e2e": "benchmarks.gpu_e2e",
    "replay": "benchmarks.replay",
    "sim_vs_real": "benchmarks.sim_vs_real",
    "sim_vs_gpu": "benchmarks.sim_vs_gpu",
    "http": "benchmarks.http",
    "sampling": "benchmarks.sampling",
    "grow_cost": "benchmarks.grow_cost",
    "capacity": "benchmarks.capacity",
    "broker_restart": "benchmarks.broker_restart",
    "chaos": "benchmarks.chaos",
    "tick": "benchmarks.tick",
}


def add_benchmark(bench_sub: argparse._SubParsersAction, name: str, module: ModuleType) -> argparse.ArgumentParser:
    """The benchmark's parser: the shared flags (``--config``, ``--log-level``, ``--json``) plus its own."""
    p = add_command(bench_sub, name, help=module.HELP, example=module.EXAMPLE, func=module.run, json_flag=True,
                    description=getattr(module, "DESCRIPTION", None))
    module.add_arguments(p)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark", description="Run a benchmark: " + ", ".join(BENCHMARKS),
                       epilog="example:\n  specmq bench broker --json\n  specmq bench e2e --quick",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    chosen = _chosen(sys.argv)
    for name, module_name in BENCHMARKS.items():
        if chosen is not None and name != chosen:
            bench_sub.add_parser(name, help=f"(see specmq bench {name} --help)")
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional dependency is missing: say so when chosen
            stub = bench_sub.add_parser(name, help=f"unavailable: {exc}")
            stub.set_defaults(func=_unavailable(name, str(exc)), _parser=stub)
            continue
        add_benchmark(bench_sub, name, module)


def _unavailable(name: str, why: str):
    def run(args: argparse.Namespace) -> int:
        raise CommandError(f"benchmark {name} is unavailable: {why}")

    return run


def _chosen(argv: list[str]) -> str | None:
    """The benchmark named on the command line, so the others' modules are not imported."""
    if "bench" in argv:
        rest = argv[argv.index("bench") + 1:]
        for a in rest:
            if a in BENCHMARKS:
                return a
    return None

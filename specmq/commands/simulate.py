"""``specmq simulate``: run one simulated deployment, or sweep parameters over many.

    specmq simulate --config configs/sim/default.yaml [--set router=rr --set gamma=6] [--out DIR] [--json]
    specmq simulate sweep --config configs/sim/default.yaml --vary drafts=1..64 --vary router=rr,jsq2,wjsq2
    specmq simulate plan --config configs/sim/default.yaml --sessions 256 --slo-tpot-ms 30

``--config`` here is the simulation config (nested YAML over ``simulator.config.DEFAULTS``), not a file of flag
defaults as for other commands.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

from specmq.cliutil import CommandError, add_command, print_json
from specmq.logs import get_logger

EXAMPLE = ("specmq simulate --config configs/sim/default.yaml --set router=rr --json\n"
           "  specmq simulate sweep --config configs/sim/default.yaml --vary drafts=4..64 --vary router=rr,jsq2 "
           "--out sim-out/sweep\n"
           "  specmq simulate plan --config configs/sim/default.yaml --sessions 256 --slo-tpot-ms 30")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "simulate", help="simulate a deployment in SimPy (virtual time)", example=EXAMPLE,
                    func=_main, json_flag=True)
    for action in p._actions:  # our --config is a simulation config, not a file of flag defaults
        if "--config" in action.option_strings:
            action.dest = "sim_config"
            action.help = "simulation config YAML (see configs/sim/); defaults: simulator.config.DEFAULTS"
    p.add_argument("action", nargs="?", choices=["run", "sweep", "plan"], default="run",
                   help="run one configuration (default), sweep the --vary values, or plan: the fewest targets "
                        "that serve --sessions within --slo-tpot-ms")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, e.g. targets.0.slots=64, or an alias: drafts, rate, "
                        "alpha, targets, router, gamma); repeatable")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=VALUES",
                   help="sweep only: values as a list (rr,jsq2) or a range (1..1000, 1..1000/8, 0.5..0.9:0.1)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results here (run: summary.json, requests.csv, queue_depth.csv/.png; "
                        "sweep: sweep.csv, sweep.json, plots; default for sweep: sim-out/sweep)")
    p.add_argument("--no-progress", action="store_true", help="sweep, plan: no progress bar")
    p.add_argument("--sessions", type=int, default=None,
                   help="plan: concurrent sessions of the fleet (closed-loop users, one draft slot each)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="plan: TPOT p90 every plan must meet (ms)")
    p.add_argument("--max-targets", type=int, default=64, help="plan: the most targets to try (default 64)")


def _overrides(items: list[str]) -> dict[str, Any]:
    from simulator.config import parse_value

    out = {}
    for item in items:
        if "=" not in item:
            raise CommandError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def _main(args: argparse.Namespace) -> int:
    from simulator.acceptance import AcceptanceError
    from simulator.config import ConfigError, load_config
    from simulator.workload import WorkloadError
    from workers.cost_table import CostTableError

    log = get_logger("simulate")
    try:
        cfg = load_config(args.sim_config, _overrides(args.overrides))
        if args.action == "sweep":
            return _sweep(args, cfg, log)
        if args.action == "plan":
            return _plan(args, cfg, log)
        if args.vary:
            raise CommandError("--vary needs the sweep action: specmq simulate sweep --vary ...")
        return _run(args, cfg, log)
    except (ConfigError, CostTableError, AcceptanceError, WorkloadError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except (TypeError, KeyError) as exc:  # a config value of the wrong shape, e.g. a list where a number goes
        raise CommandError(f"bad config value ({type(exc).__name__}: {exc})") from None


def _run(args: argparse.Namespace, cfg: dict[str, Any], log) -> int:
    from simulator.simulation import Simulation

    sim = Simulation(cfg)
    res = sim.run()
    log.info("simulated", events=res["events"], wall_s=round(res["wall_s"], 3), virtual_s=res["virtual_s"])
    if args.out:
        _write_run(sim, res, args.out)
    if getattr(args, "json", False):
        print_json(res)
    else:
        _print_summary(res)
    return 0


def _write_run(sim, res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(res, indent=1, default=str))
    with open(out / "requests.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "kind", "arrival_s", "prompt_tokens", "output_tokens", "first_token_s", "finished_s",
                    "rounds", "target"])
        for r in sim.requests:
            w.writerow([r.id, r.kind, f"{r.arrival:.6f}", r.prompt_tokens, r.output_tokens,
                        f"{r.first_token:.6f}", f"{r.finished:.6f}", r.rounds, r.target])
    m = sim.metrics
    names = list(m.sample_per_target)
    with open(out / "queue_depth.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["t_s", "verify_queue", "admit_queue", "generate_queue", "draft_queue"] + names)
        for i, t in enumerate(m.sample_t):
            w.writerow([f"{t:.4f}", m.sample_verify_q[i], m.sample_admit_q[i], m.sample_generate_q[i],
                        m.sample_draft_q[i]] + [m.sample_per_target[n][i] for n in names])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in (("verify queue (all targets)", m.sample_verify_q), ("admission", m.sample_admit_q),
                     ("generate queue", m.sample_generate_q), ("waiting for a draft", m.sample_draft_q)):
        if any(ys):
            ax.plot(m.sample_t, ys, label=name)
    ax.axvspan(0, m.start, color="grey", alpha=0.15, label="burn-in")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("queue depth")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "queue_depth.png", dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:,.2f}"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def _costs_line(rows: list[dict[str, Any]]) -> str:
    """One line on what priced the results: a synthetic table is a formula, not a measurement."""
    tables = sorted({t for r in rows for t in r.get("cost_tables", [])})
    if any(r.get("synthetic", True) for r in rows):
        return f"costs: SYNTHETIC (not measured): {', '.join(tables)}"
    return f"costs: measured: {', '.join(tables)}"


def _print_summary(res: dict[str, Any]) -> None:
    keys = ["synthetic", "cost_tables", "architecture", "router", "gamma", "drafts", "targets", "fused",
            "throughput_tok_s", "goodput", "goodput_rps", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
            "e2e_p50_ms", "e2e_p99_ms", "tokens_per_round", "batch_rows_mean", "batch_row_util", "worker_busy", "load_imbalance",
            "verify_queue_mean", "draft_queue_mean", "generate_queue_mean", "requests", "finished", "busy_refusals",
            "events", "wall_s", "virtual_s"]
    for k in keys:
        print(f"{k:<22} {_fmt(res.get(k))}")


def _plan(args: argparse.Namespace, cfg: dict[str, Any], log) -> int:
    from simulator.plan import plan_targets
    from simulator.simulation import simulate

    if args.sessions is None or args.slo_tpot_ms is None:
        raise CommandError("plan needs --sessions N and --slo-tpot-ms X")
    if args.vary:
        raise CommandError("--vary is for the sweep action, not plan")
    json_out = getattr(args, "json", False)
    plan = plan_targets(cfg, args.sessions, args.slo_tpot_ms, simulate, args.max_targets,
                        progress=not args.no_progress and not json_out)
    log.info("planned", sessions=plan.sessions, slo_tpot_ms=plan.slo_tpot_ms, targets=plan.targets,
             runs=len(plan.tried))
    if json_out:
        print_json(plan.to_json())
        return 0 if plan.targets is not None else 1
    best = plan.point(plan.targets)
    if best is not None:
        print(f"{plan.sessions} sessions at TPOT p90 <= {plan.slo_tpot_ms:g} ms need {plan.targets} target(s): "
              f"TPOT p90 {best.tpot_p90_ms:.1f} ms, p50 {best.tpot_p50_ms:.1f} ms, TTFT p90 {best.ttft_p90_ms:.0f} ms, "
              f"{best.throughput_tok_s:,.0f} tok/s")
        fewer = plan.point(plan.targets - 1)
        if fewer is not None:
            print(f"  with {fewer.targets}: TPOT p90 {fewer.tpot_p90_ms:.1f} ms (misses the SLO)")
    else:
        worst = plan.point(plan.max_targets)
        got = f" (best: TPOT p90 {worst.tpot_p90_ms:.1f} ms)" if worst is not None else ""
        print(f"{plan.sessions} sessions at TPOT p90 <= {plan.slo_tpot_ms:g} ms: not met with up to "
              f"{plan.max_targets} target(s){got}; more targets will not help when drafting or the path dominates")
    print(f"runs: {', '.join(f'{p.targets}->{p.tpot_p90_ms:.1f} ms' for p in sorted(plan.tried, key=lambda p: p.targets))}")
    print(_costs_line([plan.to_json()]))
    return 0 if plan.targets is not None else 1


def _sweep(args: argparse.Namespace, cfg: dict[str, Any], log) -> int:
    from simulator.simulation import simulate
    from simulator.sweep import best_row, parse_vary, run_sweep, write_results

    if not args.vary:
        raise CommandError("sweep needs at least one --vary KEY=VALUES")
    varies = [parse_vary(v) for v in args.vary]
    rows = run_sweep(cfg, varies, simulate, progress=not args.no_progress and not getattr(args, "json", False))
    out = args.out or Path("sim-out/sweep")
    paths = write_results(rows, varies, out)
    log.info("swept", runs=len(rows), out=str(out))
    best = best_row(rows)
    keys = [k for k, _ in varies]
    if getattr(args, "json", False):
        print_json({"vary": dict(varies), "synthetic": any(r.get("synthetic", True) for r in rows), "best": best,
                    "results": rows, "files": [str(p) for p in paths]})
    else:
        cols = keys + ["throughput_tok_s", "goodput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"]
        print("  ".join(f"{c:>14}" for c in cols))
        for r in rows:
            print("  ".join(f"{_fmt(r.get(c)):>14}" for c in cols))
        if best is not None:
            print("best (goodput rps, then throughput): "
                  + ", ".join(f"{k}={best[k]}" for k in keys)
                  + f": goodput {best['goodput_rps']:.2f} req/s, {best['throughput_tok_s']:,.0f} tok/s")
        print(_costs_line(rows))
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0

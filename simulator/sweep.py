"""Parameter sweeps: the cartesian product of ``--vary`` values, one simulation each; CSV, JSON and plots.

Value syntax for ``--vary KEY=SPEC``: a comma list (``rr,jsq2,wjsq2``; ``0.5,0.7``), or a range ``a..b``
(6 points, log-spaced when 0 < a and b/a >= 20, else evenly), ``a..b/n`` (n points) or ``a..b:step``.
Integer ends give integers (deduplicated). KEY is any dotted config key or an alias (``drafts``, ``rate``,
``alpha``, ``targets``, ``gamma``, ``router``; see ``simulator.config.ALIASES``).
"""
from __future__ import annotations

import copy
import csv
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

from simulator.config import ConfigError, parse_value, set_key

SUMMARY_COLUMNS = ("throughput_tok_s", "goodput", "goodput_rps", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                   "tpot_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "tokens_per_round", "batch_rows_mean",
                   "worker_busy", "load_imbalance", "verify_queue_mean", "draft_queue_mean", "generate_queue_mean",
                   "requests", "finished", "events", "wall_s", "synthetic")


def parse_vary(text: str) -> tuple[str, list[Any]]:
    if "=" not in text:
        raise ConfigError(f"--vary {text!r}: expected KEY=VALUES (e.g. drafts=1..1000 or router=rr,jsq2)")
    key, spec = text.split("=", 1)
    key, spec = key.strip(), spec.strip()
    if ".." in spec and "," not in spec:
        return key, _range(text, spec)
    values = [parse_value(v.strip()) for v in spec.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"--vary {text!r}: no values")
    return key, values


def _range(text: str, spec: str) -> list[Any]:
    a_s, rest = spec.split("..", 1)
    n, step = 6, None
    if "/" in rest:
        rest, n_s = rest.split("/", 1)
        n = int(n_s)
    elif ":" in rest:
        rest, step_s = rest.split(":", 1)
        step = float(step_s)
    try:
        a, b = float(a_s), float(rest)
    except ValueError:
        raise ConfigError(f"--vary {text!r}: range ends must be numbers") from None
    ints = _is_int(a_s) and _is_int(rest)
    if step is not None:
        if step <= 0:
            raise ConfigError(f"--vary {text!r}: step must be > 0")
        pts = [a + i * step for i in range(int(math.floor((b - a) / step + 1e-9)) + 1)]
    elif n < 2:
        pts = [a]
    elif a > 0 and b / a >= 20:
        pts = [a * (b / a) ** (i / (n - 1)) for i in range(n)]
    else:
        pts = [a + (b - a) * i / (n - 1) for i in range(n)]
    if ints:
        out: list[Any] = []
        for p in pts:
            v = int(round(p))
            if v not in out:
                out.append(v)
        return out
    return [round(p, 6) for p in pts]


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def grid(varies: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    keys = [k for k, _ in varies]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in varies))]


def run_sweep(cfg: dict[str, Any], varies: list[tuple[str, list[Any]]], simulate: Callable[[dict], dict],
              progress: bool = True) -> list[dict[str, Any]]:
    points = grid(varies)
    rows = []
    it: Iterable = points
    if progress:
        from tqdm import tqdm

        it = tqdm(points, desc="simulate sweep", unit="run")
    for point in it:
        c = copy.deepcopy(cfg)
        for k, v in point.items():
            set_key(c, k, v)
        res = simulate(c)
        res.pop("per_worker", None)
        rows.append({**point, **res})
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the highest goodput rate (requests/s meeting both SLOs); ties go to throughput."""
    def key(r: dict[str, Any]) -> tuple[float, float]:
        g, t = r.get("goodput_rps", math.nan), r.get("throughput_tok_s", math.nan)
        return (-1.0 if math.isnan(g) else g, -1.0 if math.isnan(t) else t)

    return max(rows, key=key) if rows else None


def write_results(rows: list[dict[str, Any]], varies: list[tuple[str, list[Any]]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in varies]
    cols = keys + [c for c in SUMMARY_COLUMNS if c not in keys]
    csv_path = out / "sweep.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    json_path = out / "sweep.json"
    synthetic = any(r.get("synthetic", True) for r in rows)  # any point priced by a table that was not measured
    json_path.write_text(json.dumps({"vary": dict(varies), "synthetic": synthetic, "best": best_row(rows),
                                     "results": rows}, indent=1, default=str))
    return [csv_path, json_path] + plot_sweep(rows, keys, out)


def plot_sweep(rows: list[dict[str, Any]], keys: list[str], out: Path) -> list[Path]:
    """Throughput, TTFT/TPOT percentiles and queue depth against the first varied key; one line per combination
    of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, others = keys[0], keys[1:]
    xs_all = list(dict.fromkeys(r[x_key] for r in rows))
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
    log_x = numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20
    series: dict[str, list[dict]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r[k]}" for k in others) or "run"
        series.setdefault(label, []).append(r)

    def xpos(v: Any) -> Any:
        return v if numeric else xs_all.index(v)

    panels = {
        "throughput.png": [("throughput_tok_s", "throughput (tokens/s)", "-")],
        "latency.png": [("ttft_p50_ms", "TTFT p50", "-"), ("ttft_p99_ms", "TTFT p99", "--"),
                        ("tpot_p50_ms", "TPOT p50", "-"), ("tpot_p99_ms", "TPOT p99", "--")],
        "queue_depth.png": [("verify_queue_mean", "verify queue (mean)", "-"),
                            ("draft_queue_mean", "waiting for a draft (mean)", "--"),
                            ("generate_queue_mean", "generate queue (mean)", ":")],
    }
    paths = []
    for fname, metrics in panels.items():
        if fname == "latency.png":
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            groups = [(axes[0], metrics[:2], "TTFT (ms)"), (axes[1], metrics[2:], "TPOT (ms)")]
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
            groups = [(ax, metrics, metrics[0][1] if len(metrics) == 1 else "queue depth")]
        for ax, ms, ylabel in groups:
            for si, (label, rs) in enumerate(series.items()):
                rs = sorted(rs, key=lambda r: xpos(r[x_key]))
                for key, name, style in ms:  # colour = series, line style = metric
                    ys = [r.get(key, math.nan) for r in rs]
                    ax.plot([xpos(r[x_key]) for r in rs], ys, style, color=f"C{si % 10}", marker="o",
                            markersize=3, label=f"{name} ({label})" if len(ms) > 1 else label)
            ax.set_xlabel(x_key)
            ax.set_ylabel(ylabel)
            if log_x:
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(range(len(xs_all)), [str(x) for x in xs_all])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

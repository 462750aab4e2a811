"""Step-latency cost models: measured lookup tables, interpolated (Vidur's execution-time predictor, as a table).

A table gives the latency of one target forward pass against ``(batch, tokens, context)``: ``batch`` rows in the
pass, ``tokens`` new tokens in it (sum over rows: γ+1 per verify chunk plus prefill chunks) and ``context`` the mean
tokens already cached per row. A second, smaller table gives one draft decode step against ``(batch, context)``.
``specmq profile`` writes these with ``write_table``; the simulator reads them with ``load_table``.

YAML format (``format: specmq-cost-table``, ``version: 1``)::

    format: specmq-cost-table
    version: 1
    model: <target model id>          # what was measured
    device: <cpu | cuda:0 | ...>
    dtype: <float32 | bfloat16 | ...>
    hardware: <free text: CPU/GPU model, cores, memory bandwidth>
    synthetic: false                  # true when the numbers come from a formula, not a measurement
    target:
      axes: {batch: [...], tokens: [...], context: [...]}   # strictly increasing grid points
      latency_ms: [[[...]]]           # nested lists indexed [batch][tokens][context]
    draft:
      model: <draft model id>
      axes: {batch: [...], context: [...]}
      latency_ms: [[...]]             # one decode step, indexed [batch][context]

Lookups are multilinear inside the grid; below the first grid point an axis is clamped, above the last it is
extrapolated linearly from the last segment (a bigger batch costs more, it does not plateau). Results are never
negative. Cost models for tests (``ConstantCost``, ``ExponentialCost``) draw service times instead.
"""
from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

TABLE_FORMAT = "specmq-cost-table"
TABLE_VERSION = 1
TARGET_AXES = ("batch", "tokens", "context")
DRAFT_AXES = ("batch", "context")


class CostTableError(ValueError):
    """A cost table file that cannot be used; the message names the file and the problem."""


@dataclass
class Grid:
    """An N-d grid of latencies (ms) with multilinear interpolation and linear extrapolation above the grid."""

    axes: dict[str, list[float]]
    latency_ms: Any  # nested lists, one level per axis in ``axes`` order

    def __post_init__(self) -> None:
        self._names = list(self.axes)
        self._points = [list(map(float, self.axes[n])) for n in self._names]

    def lookup(self, *x: float) -> float:
        segs = []
        for pts, v in zip(self._points, x):
            if len(pts) == 1:
                segs.append(((0, 1.0),))
                continue
            if v <= pts[0]:
                segs.append(((0, 1.0),))  # clamp below the grid
                continue
            i = min(bisect.bisect_right(pts, v) - 1, len(pts) - 2)
            w = (v - pts[i]) / (pts[i + 1] - pts[i])  # > 1 above the grid: linear extrapolation
            segs.append(((i, 1.0 - w), (i + 1, w)))
        total = 0.0
        for corner in itertools.product(*segs):
            weight = 1.0
            node = self.latency_ms
            for i, w in corner:
                weight *= w
                node = node[i]
            total += weight * node
        return max(0.0, total)


class CostModel:
    """What targets and fused workers ask: how long does this forward pass take (ms)?"""

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        raise NotImplementedError

    def draft_step_ms(self, batch: int, context: float) -> float:
        raise NotImplementedError


@dataclass
class CostTable(CostModel):
    model: str
    device: str
    dtype: str
    hardware: str
    target: Grid
    draft: Grid
    draft_model: str = ""
    synthetic: bool = False
    source: str = ""
    _draft_cache: dict = field(default_factory=dict, repr=False)

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        return self.target.lookup(batch, tokens, context)

    def draft_step_ms(self, batch: int, context: float) -> float:
        key = (batch, int(context) >> 6)  # 64-token context buckets: the draft step is on the hot path
        ms = self._draft_cache.get(key)
        if ms is None:
            ms = self._draft_cache[key] = self.draft.lookup(batch, (key[1] << 6) + 32)
        return ms


class ConstantCost(CostModel):
    """Every forward pass takes ``ms`` (M/D/1 checks)."""

    def __init__(self, ms: float, draft_ms: float = 0.0) -> None:
        self.ms, self.draft_ms = ms, draft_ms

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        return self.ms

    def draft_step_ms(self, batch: int, context: float) -> float:
        return self.draft_ms


class ExponentialCost(CostModel):
    """Service times drawn from an exponential distribution of mean ``mean_ms`` (M/M/1 checks)."""

    def __init__(self, mean_ms: float, seed: int = 0, draft_ms: float = 0.0) -> None:
        self.mean_ms, self.draft_ms = mean_ms, draft_ms
        self.rng = random.Random(seed)

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        return self.rng.expovariate(1.0 / self.mean_ms)

    def draft_step_ms(self, batch: int, context: float) -> float:
        return self.draft_ms


def _check_grid(path: str, section: str, raw: Any, names: Sequence[str]) -> Grid:
    if not isinstance(raw, dict) or "axes" not in raw or "latency_ms" not in raw:
        raise CostTableError(f"{path}: section {section!r} needs 'axes' and 'latency_ms'")
    axes = raw["axes"]
    if not isinstance(axes, dict) or list(axes) != list(names):
        raise CostTableError(f"{path}: {section}.axes must be {list(names)} in that order, got {list(axes or {})}")
    for name, pts in axes.items():
        if not isinstance(pts, list) or not pts or not all(isinstance(p, (int, float)) for p in pts):
            raise CostTableError(f"{path}: {section}.axes.{name} must be a non-empty list of numbers")
        if any(b <= a for a, b in zip(pts, pts[1:])):
            raise CostTableError(f"{path}: {section}.axes.{name} must be strictly increasing")

    def check(node: Any, depth: int, where: str) -> None:
        n = len(axes[names[depth]])
        if not isinstance(node, list) or len(node) != n:
            raise CostTableError(f"{path}: {section}.latency_ms{where} must be a list of {n} "
                                 f"(axis {names[depth]!r})")
        for i, child in enumerate(node):
            if depth + 1 < len(names):
                check(child, depth + 1, f"{where}[{i}]")
            elif not isinstance(child, (int, float)) or not math.isfinite(child) or child < 0:
                raise CostTableError(f"{path}: {section}.latency_ms{where}[{i}] must be a finite number >= 0")

    check(raw["latency_ms"], 0, "")
    return Grid({n: list(axes[n]) for n in names}, raw["latency_ms"])


def load_table(path: str | Path) -> CostTable:
    """Read and validate a cost table YAML file."""
    path = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise CostTableError(f"cost table {path} not found") from None
    except yaml.YAMLError as exc:
        raise CostTableError(f"cost table {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise CostTableError(f"{path}: not a cost table (expected format: {TABLE_FORMAT})")
    if data.get("version") != TABLE_VERSION:
        raise CostTableError(f"{path}: unsupported version {data.get('version')!r} (this reads {TABLE_VERSION})")
    draft = data.get("draft") or {}
    return CostTable(
        model=str(data.get("model", "")), device=str(data.get("device", "")), dtype=str(data.get("dtype", "")),
        hardware=str(data.get("hardware", "")), synthetic=bool(data.get("synthetic", False)),
        target=_check_grid(path, "target", data.get("target"), TARGET_AXES),
        draft=_check_grid(path, "draft", draft, DRAFT_AXES), draft_model=str(draft.get("model", "")), source=path,
    )


def write_table(path: str | Path, *, model: str, device: str, dtype: str, hardware: str,
                target_axes: dict[str, Sequence[float]], target_latency_ms: Any,
                draft_axes: dict[str, Sequence[float]], draft_latency_ms: Any, draft_model: str = "",
                synthetic: bool = False, note: str = "") -> CostTable:
    """Write a cost table (validated by reading it back). Axes are dicts in TARGET_AXES / DRAFT_AXES order.

    ``*_latency_ms`` may be nested lists or numpy arrays indexed in axis order.
    """
    def plain(x: Any) -> Any:
        if hasattr(x, "tolist"):
            x = x.tolist()
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return round(float(x), 4)

    def point(x: Any) -> Any:
        f = float(x)
        return int(f) if f.is_integer() else f

    doc: dict[str, Any] = {
        "format": TABLE_FORMAT, "version": TABLE_VERSION, "model": model, "device": device, "dtype": dtype,
        "hardware": hardware, "synthetic": synthetic,
    }
    if note:
        doc["note"] = note
    doc["target"] = {"axes": {k: [point(v) for v in target_axes[k]] for k in TARGET_AXES},
                     "latency_ms": plain(target_latency_ms)}
    doc["draft"] = {"model": draft_model, "axes": {k: [point(v) for v in draft_axes[k]] for k in DRAFT_AXES},
                    "latency_ms": plain(draft_latency_ms)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120))
    return load_table(path)

"""The cost-table file format: step latencies measured by ``specmq profile``, read by the simulator.

A table gives the latency of one target forward pass against ``(batch, tokens, context)``: ``batch`` rows in the
pass, ``tokens`` new tokens in it (sum over rows: γ+1 per verify chunk plus prefill chunks) and ``context`` the mean
tokens already cached per row. A second, smaller table gives one draft decode step against ``(batch, context)``.
This module holds the format (dataclasses, validated read and write) and the interpolating lookup that the
target's goodput controller and the simulator both use (``load_table``); the simulator's other cost models live in
``simulator.costs``.

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
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from protocol.errors import SpecmqError

TABLE_FORMAT = "specmq-cost-table"
TABLE_VERSION = 1
TARGET_AXES = ("batch", "tokens", "context")
DRAFT_AXES = ("batch", "context")


class CostTableError(SpecmqError, ValueError):
    """A cost table file that cannot be used; the message names the file and the problem."""


@dataclass
class LatencyGrid:
    """Grid points per axis (strictly increasing, in axis order) and the latencies (ms) measured at them."""

    axes: dict[str, list[float]]
    latency_ms: Any  # nested lists, one level per axis in ``axes`` order


@dataclass
class CostTableFile:
    """One cost table file's contents, validated."""

    model: str
    device: str
    dtype: str
    hardware: str
    target: LatencyGrid
    draft: LatencyGrid
    draft_model: str = ""
    synthetic: bool = False
    note: str = ""
    source: str = ""  # the path it was read from


def _check_grid(path: str, section: str, raw: Any, names: Sequence[str]) -> LatencyGrid:
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
    return LatencyGrid({n: list(axes[n]) for n in names}, raw["latency_ms"])


def read_table(path: str | Path) -> CostTableFile:
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
    return CostTableFile(
        model=str(data.get("model", "")), device=str(data.get("device", "")), dtype=str(data.get("dtype", "")),
        hardware=str(data.get("hardware", "")), synthetic=bool(data.get("synthetic", False)),
        note=str(data.get("note", "")),
        target=_check_grid(path, "target", data.get("target"), TARGET_AXES),
        draft=_check_grid(path, "draft", draft, DRAFT_AXES), draft_model=str(draft.get("model", "")), source=path,
    )


def write_table(path: str | Path, *, model: str, device: str, dtype: str, hardware: str,
                target_axes: dict[str, Sequence[float]], target_latency_ms: Any,
                draft_axes: dict[str, Sequence[float]], draft_latency_ms: Any, draft_model: str = "",
                synthetic: bool = False, note: str = "") -> CostTableFile:
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
    return read_table(path)


# --------------------------------------------------------------------------- lookups
@dataclass
class Grid:
    """An N-d grid of latencies (ms) with multilinear interpolation and linear extrapolation above the grid
    (never below the value at the grid's edge)."""

    axes: dict[str, list[float]]
    latency_ms: Any  # nested lists, one level per axis in ``axes`` order

    def __post_init__(self) -> None:
        self._names = list(self.axes)
        self._points = [list(map(float, self.axes[n])) for n in self._names]

    @classmethod
    def of(cls, grid: LatencyGrid) -> "Grid":
        return cls(grid.axes, grid.latency_ms)

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
        total = self._blend(segs)
        above = [len(pts) > 1 and v > pts[-1] for pts, v in zip(self._points, x)]
        if any(above):  # past the grid a bigger step never costs less than at its edge (noisy last segments)
            edge = [((len(pts) - 1, 1.0),) if up else s for pts, up, s in zip(self._points, above, segs)]
            total = max(total, self._blend(edge))
        return max(0.0, total)

    def _blend(self, segs: list) -> float:
        total = 0.0
        for corner in itertools.product(*segs):
            weight = 1.0
            node = self.latency_ms
            for i, w in corner:
                weight *= w
                node = node[i]
            total += weight * node
        return total


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


def load_table(path: str | Path) -> CostTable:
    """Read and validate a cost table file (``workers.cost_table``) into a model that answers lookups."""
    data = read_table(path)
    return CostTable(model=data.model, device=data.device, dtype=data.dtype, hardware=data.hardware,
                     target=Grid.of(data.target), draft=Grid.of(data.draft), draft_model=data.draft_model,
                     synthetic=data.synthetic, source=data.source)


# --------------------------------------------------------------------------- merging profile runs
def merge_tables(paths: Sequence[str | Path], out: str | Path) -> tuple[CostTableFile, int, int]:
    """Merge profile runs of one model pair into one table: the union of every axis.

    Each (batch, context) comes from the last listed table that measured that batch at that context (later runs
    win), else from the last that measured the batch; the value is that table's own interpolation over tokens
    (and context when it lacks that context: extrapolation past its grid, counted). Returns (the written table, points taken from a measurement or interpolated inside a grid, points
    extrapolated past their source's grid).
    """
    files = [read_table(p) for p in paths]
    if len(files) < 2:
        raise CostTableError("merging needs at least two cost tables")
    first = files[0]
    for f in files[1:]:
        if (f.model, f.dtype, f.draft_model) != (first.model, first.dtype, first.draft_model):
            raise CostTableError(f"{f.source}: model {f.model!r} / {f.dtype} / draft {f.draft_model!r} differs from "
                                 f"{first.source}'s {first.model!r} / {first.dtype} / {first.draft_model!r}")
    inside = outside = 0

    def union(grids: list[LatencyGrid], axis: str) -> list[float]:
        return sorted({float(v) for g in grids for v in g.axes[axis]})

    def build(section: str) -> tuple[dict[str, list[float]], Any]:
        nonlocal inside, outside
        grids = [getattr(f, section) for f in files]
        names = list(grids[0].axes)
        axes = {n: union(grids, n) for n in names}
        lookups = [Grid.of(g) for g in grids]

        def owner(b: float, ctx: float) -> int:
            """The last run that measured this batch at this context, else the last that measured the batch."""
            has = [i for i, g in enumerate(grids) if b in map(float, g.axes["batch"])]
            both = [i for i in has if ctx in map(float, grids[i].axes["context"])]
            return (both or has)[-1]

        def fill(b: float, rest: list[str], at: tuple) -> Any:
            nonlocal inside, outside
            if not rest:
                i = owner(b, at[-1])
                g = grids[i]
                past = any(v < min(g.axes[n]) or v > max(g.axes[n]) for n, v in zip(names[1:], at))
                outside += past
                inside += not past
                return lookups[i].lookup(b, *at)
            return [fill(b, rest[1:], at + (v,)) for v in axes[rest[0]]]

        return axes, [fill(b, names[1:], ()) for b in axes["batch"]]

    t_axes, t_lat = build("target")
    d_axes, d_lat = build("draft")
    note = (f"merged by specmq profile --merge from {', '.join(str(f.source) for f in files)}; each (batch, "
            f"context) from the last run that measured it; {outside} of {inside + outside} points extrapolated past their run's "
            f"grid. Notes of the runs: " + " | ".join(f.note for f in files if f.note))
    merged = write_table(out, model=first.model, device=first.device, dtype=first.dtype,
                         hardware=" | ".join(dict.fromkeys(f.hardware for f in files)), target_axes=t_axes,
                         target_latency_ms=t_lat, draft_axes=d_axes, draft_latency_ms=d_lat,
                         draft_model=first.draft_model, synthetic=any(f.synthetic for f in files), note=note)
    return merged, inside, outside

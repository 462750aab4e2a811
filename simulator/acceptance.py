"""How many draft tokens a target accepts per round, per draft-target pair.

Two models:
- ``IidAcceptance(alpha)``: each draft token is accepted with probability alpha independently, until the first
  rejection (Leviathan et al.). Accepted count k of γ: P(k) = alpha^k (1 - alpha) for k < γ, P(γ) = alpha^γ.
  Tokens committed per round are k + 1 (the target's own token), in expectation (1 - alpha^(γ+1)) / (1 - alpha).
- ``EmpiricalAcceptance``: histograms of accepted counts per γ, from measured rounds. For a γ never measured it
  falls back to the iid model with alpha fitted to the rows (maximum likelihood for a truncated geometric).

Rounds file (what ``specmq draft --profile`` writes): CSV with a header, or JSON (a list of objects, or
``{"rounds": [...]}``); one row per verify round with columns ``round, gamma, accepted, draft_ms, network_ms,
verify_ms``. Only ``gamma`` and ``accepted`` are required here (0 <= accepted <= gamma).
"""
from __future__ import annotations

import bisect
import csv
import json
import random
from itertools import accumulate
from pathlib import Path
from typing import Any

ROUND_COLUMNS = ("round", "gamma", "accepted", "draft_ms", "network_ms", "verify_ms")


class AcceptanceError(ValueError):
    pass


class Acceptance:
    def draw(self, gamma: int, rng: random.Random) -> int:
        """Accepted draft tokens (0..gamma) of one round."""
        raise NotImplementedError

    def expected_tokens(self, gamma: int) -> float:
        """Expected committed tokens per round (accepted + 1)."""
        raise NotImplementedError


class IidAcceptance(Acceptance):
    def __init__(self, alpha: float) -> None:
        if not 0.0 <= alpha < 1.0:
            raise AcceptanceError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha
        self._cdf: dict[int, list[float]] = {}

    def _table(self, gamma: int) -> list[float]:
        cdf = self._cdf.get(gamma)
        if cdf is None:
            a = self.alpha
            probs = [a ** k * (1 - a) for k in range(gamma)] + [a ** gamma]
            cdf = self._cdf[gamma] = list(accumulate(probs))
        return cdf

    def draw(self, gamma: int, rng: random.Random) -> int:
        cdf = self._table(gamma)
        return min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), gamma)

    def expected_tokens(self, gamma: int) -> float:
        a = self.alpha
        return (1 - a ** (gamma + 1)) / (1 - a) if a < 1 else gamma + 1.0


class EmpiricalAcceptance(Acceptance):
    """Accepted-count histograms per γ; iid fallback for other γ."""

    def __init__(self, rows: list[tuple[int, int]], source: str = "") -> None:
        if not rows:
            raise AcceptanceError(f"{source or 'rounds'}: no rounds")
        self.hist: dict[int, list[int]] = {}
        for g, k in rows:
            h = self.hist.setdefault(g, [0] * (g + 1))
            h[k] += 1
        self._cdf = {g: list(accumulate(h)) for g, h in self.hist.items()}
        # MLE of alpha for a geometric truncated at gamma: successes / (successes + observed failures)
        acc = sum(k for _, k in rows)
        fails = sum(1 for g, k in rows if k < g)
        self.fallback = IidAcceptance(min(acc / max(1, acc + fails), 0.999))

    def draw(self, gamma: int, rng: random.Random) -> int:
        cdf = self._cdf.get(gamma)
        if cdf is None:
            return self.fallback.draw(gamma, rng)
        return bisect.bisect_right(cdf, rng.random() * cdf[-1])

    def expected_tokens(self, gamma: int) -> float:
        h = self.hist.get(gamma)
        if h is None:
            return self.fallback.expected_tokens(gamma)
        return sum((k + 1) * c for k, c in enumerate(h)) / sum(h)


def load_rounds(path: str | Path) -> list[tuple[int, int]]:
    """Read ``(gamma, accepted)`` pairs from a rounds CSV or JSON file; errors name the bad row and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise AcceptanceError(f"rounds file {path} not found") from None
    if path.suffix.lower() == ".json":
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AcceptanceError(f"{path}: not valid JSON ({exc})") from None
        records = data.get("rounds") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise AcceptanceError(f"{path}: expected a list of rounds or {{'rounds': [...]}}")
        start = 0
    else:
        records = list(csv.DictReader(text.splitlines()))
        start = 2  # row numbers as a spreadsheet shows them (header is row 1)
    out = []
    for i, rec in enumerate(records):
        where = f"{path}: row {i + start}" if start else f"{path}: round {i}"
        if not isinstance(rec, dict):
            raise AcceptanceError(f"{where}: expected an object with gamma and accepted")
        vals = []
        for col in ("gamma", "accepted"):
            if col not in rec or rec[col] in (None, ""):
                raise AcceptanceError(f"{where}: missing column {col!r}")
            try:
                vals.append(int(float(rec[col])))
            except (TypeError, ValueError):
                raise AcceptanceError(f"{where}: column {col!r} must be an integer, got {rec[col]!r}") from None
        g, k = vals
        if g < 1 or not 0 <= k <= g:
            raise AcceptanceError(f"{where}: need gamma >= 1 and 0 <= accepted <= gamma, got {g}, {k}")
        out.append((g, k))
    return out


def make_acceptance(spec: dict[str, Any]) -> Acceptance:
    """``{alpha: 0.7}`` (iid) or ``{rounds: path}`` (empirical)."""
    if spec.get("rounds"):
        return EmpiricalAcceptance(load_rounds(spec["rounds"]), source=str(spec["rounds"]))
    if "alpha" in spec:
        return IidAcceptance(float(spec["alpha"]))
    raise AcceptanceError(f"acceptance needs 'alpha' or 'rounds', got {sorted(spec)}")

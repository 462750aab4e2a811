"""Adaptive draft length: pick γ from the acceptance rate observed so far.

Rule. Model each draft token as accepted independently with probability α (Leviathan et al. 2023). A round of γ
drafts then commits on average ``E(γ) = (1 − α^(γ+1)) / (1 − α)`` tokens (accepted prefix plus the target's own
token) and costs ``γ·c_draft + c_verify`` (γ draft forwards, one verify forward; costs in any common unit, e.g.
measured milliseconds, or c_verify = 1 and c_draft = the draft/target cost ratio). The controller picks the γ in
``[1, max_gamma]`` maximising ``E(γ) / cost(γ)``, tokens per unit time.

Estimate. α is the ratio of two exponentially weighted sums: accepted draft tokens over examined draft tokens
(accepted + 1 if a rejection ended the round). That is the maximum-likelihood estimate of a truncated geometric
over a decaying window; rounds with all γ accepted count γ successes and no failure. ``weight`` is the EWMA factor
given to each new round. Until the first observation α = ``initial_alpha``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def expected_tokens(alpha: float, gamma: int) -> float:
    """Mean committed tokens per round with γ drafts at per-token acceptance α."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def best_gamma(alpha: float, max_gamma: int, c_draft: float, c_verify: float = 1.0) -> int:
    """γ in [1, max_gamma] maximising expected tokens per unit cost (the first on ties: shorter is cheaper)."""
    best, best_rate = 1, -1.0
    for g in range(1, max(1, max_gamma) + 1):
        rate = expected_tokens(alpha, g) / (g * c_draft + c_verify)
        if rate > best_rate + 1e-12:
            best, best_rate = g, rate
    return best


@dataclass
class AdaptiveGamma:
    max_gamma: int = 8
    c_draft: float = 0.1  # cost of one draft forward relative to...
    c_verify: float = 1.0  # ...one verify forward
    weight: float = 0.3  # EWMA weight of the newest round
    initial_alpha: float = 0.6
    _accepted: float = field(default=0.0, repr=False)
    _examined: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if self.max_gamma < 1:
            raise ValueError(f"max_gamma must be >= 1, got {self.max_gamma}")
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {self.weight}")
        if self.c_draft < 0 or self.c_verify <= 0:
            raise ValueError("costs must be c_draft >= 0 and c_verify > 0")

    @property
    def alpha(self) -> float:
        return self._accepted / self._examined if self._examined > 0 else self.initial_alpha

    def update(self, accepted: int, drafted: int) -> None:
        """Record one round: ``accepted`` of ``drafted`` draft tokens kept."""
        examined = accepted + (1 if accepted < drafted else 0)
        if examined == 0:
            return
        decay = 1.0 - self.weight
        self._accepted = decay * self._accepted + self.weight * accepted
        self._examined = decay * self._examined + self.weight * examined

    def next_gamma(self) -> int:
        return best_gamma(min(self.alpha, 1.0), self.max_gamma, self.c_draft, self.c_verify)

"""Network links between a draft (or generate client) and the broker: latency, bandwidth, availability.

One message costs ``latency + bytes / bandwidth``; latency is drawn per message (``dist``: lognormal with the
given mean and jitter as standard deviation, normal truncated at 0, or constant). ``availability`` is the chance a
message gets through: a lost one costs the sender's retry timeout (``retry_ms``) and is sent again, as the real
drafter resends a chunk on timeout (sequence numbers make that idempotent).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class Link:
    name: str
    latency_ms: float
    jitter_ms: float = 0.0
    bandwidth_mbps: float = 1000.0
    availability: float = 1.0
    retry_ms: float = 200.0
    dist: str = "lognormal"

    def __post_init__(self) -> None:
        if not 0.0 < self.availability <= 1.0:
            raise ValueError(f"link {self.name}: availability must be in (0, 1], got {self.availability}")
        if self.latency_ms < 0 or self.jitter_ms < 0 or self.bandwidth_mbps <= 0:
            raise ValueError(f"link {self.name}: latency/jitter must be >= 0 and bandwidth > 0")
        m, s = self.latency_ms, self.jitter_ms
        if self.dist == "lognormal" and m > 0 and s > 0:
            sigma2 = math.log(1 + (s / m) ** 2)
            self._mu, self._sigma = math.log(m) - sigma2 / 2, math.sqrt(sigma2)
        elif self.dist not in ("lognormal", "normal", "constant"):
            raise ValueError(f"link {self.name}: unknown latency dist {self.dist!r} (lognormal, normal, constant)")
        self._bytes_per_s = self.bandwidth_mbps * 1e6 / 8

    def latency_s(self, rng: random.Random) -> float:
        if self.jitter_ms <= 0 or self.dist == "constant" or self.latency_ms <= 0:
            ms = self.latency_ms
        elif self.dist == "lognormal":
            ms = math.exp(rng.gauss(self._mu, self._sigma))  # lognormal; gauss is the faster normal draw
        else:
            ms = max(0.0, rng.gauss(self.latency_ms, self.jitter_ms))  # normal, truncated at 0
        return ms / 1000.0

    def delay(self, nbytes: int, rng: random.Random) -> float:
        """Seconds for one message of ``nbytes`` to arrive, counting resends after losses."""
        t = self.latency_s(rng) + nbytes / self._bytes_per_s
        if self.availability < 1.0:
            while rng.random() > self.availability:
                t += self.retry_ms / 1000.0 + self.latency_s(rng) + nbytes / self._bytes_per_s
        return t


def make_links(spec: dict[str, dict], retry_ms: float) -> dict[str, Link]:
    return {name: Link(name=name, retry_ms=float(s.get("retry_ms", retry_ms)),
                       **{k: v for k, v in s.items() if k != "retry_ms"}) for name, s in spec.items()}

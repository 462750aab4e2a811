"""Requests to simulate: synthetic arrivals, CSV traces, or a specmq capture file.

A ``Request`` is what a user asks: arrival time, prompt and output lengths, and whether it goes through a draft
(distributed speculative session) or the generate queue (a fused worker). Lengths are drawn from a distribution
spec: ``{dist: constant, value: 128}``, ``{dist: uniform, low: 32, high: 512}``, ``{dist: lognormal, mean: 256,
sigma: 0.8}`` or ``{dist: choice, values: [...]}``; a bare number means constant.

CSV trace columns (header row required): ``arrival_s, prompt_tokens, output_tokens``, or the Azure LLM inference
trace's ``TIMESTAMP, ContextTokens, GeneratedTokens`` as is (TIMESTAMP may be seconds or a date-time string; times
are made relative to the first row).

Capture files: see ``load_capture``.

Closed loop (``arrival: closed``): no arrival process; every draft session slot is a user who sends a new
request as soon as the previous one finished, after an exponential think time of mean ``think_s``
(at most ``requests_per_user`` requests each when that is > 0). Varying the
number of drafts then varies the load (``--vary drafts=1..1000``).
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import structlog

from protocol.errors import SpecmqError

log = structlog.get_logger("simulator")

KIND_SPEC = "spec"  # through a draft and a target (distributed)
KIND_GENERATE = "generate"  # through the generate queue to a fused worker


class WorkloadError(SpecmqError, ValueError):
    """A workload file or spec that cannot be used; the message names the file and the problem."""


@dataclass(slots=True)
class Request:
    id: int
    arrival: float  # seconds of virtual time
    prompt_tokens: int
    output_tokens: int
    kind: str = KIND_SPEC
    peer: str = ""  # who sent it, when known (captures)
    # filled in by the simulation
    first_token: float = math.nan
    finished: float = math.nan
    committed: int = 0
    target: str = ""
    rounds: int = 0
    first_result: float = math.nan  # the first round's answer (the first tokens a drafter delivers to its user)
    first_result_tokens: int = 0


def draw_length(spec: Any, rng: random.Random) -> int:
    if isinstance(spec, (int, float)):
        return max(1, int(spec))
    if not isinstance(spec, dict):
        raise WorkloadError(f"length spec must be a number or a mapping, got {spec!r}")
    dist = spec.get("dist", "constant")
    if dist == "constant":
        return max(1, int(spec["value"]))
    if dist == "uniform":
        return rng.randint(int(spec["low"]), int(spec["high"]))
    if dist == "lognormal":
        sigma = float(spec.get("sigma", 0.5))
        mu = math.log(float(spec["mean"])) - sigma * sigma / 2  # so the mean is ``mean``
        n = int(round(rng.lognormvariate(mu, sigma)))
        return max(1, min(n, int(spec.get("max", 1 << 20))))
    if dist == "choice":
        return max(1, int(rng.choice(spec["values"])))
    raise WorkloadError(f"unknown length distribution {dist!r} (constant, uniform, lognormal, choice)")


def interarrivals(kind: str, rate: float, rng: random.Random, cv: float = 2.0) -> Iterator[float]:
    """Gaps between arrivals at ``rate`` per second: poisson (exponential), deterministic, or bursty.

    Bursty: gamma-distributed gaps with coefficient of variation ``cv`` (> 1 = clumped), mean 1/rate.
    """
    if rate <= 0:
        raise WorkloadError(f"arrival rate must be > 0, got {rate}")
    if kind == "poisson":
        while True:
            yield rng.expovariate(rate)
    elif kind == "deterministic":
        while True:
            yield 1.0 / rate
    elif kind == "bursty":
        shape = 1.0 / (cv * cv)
        scale = 1.0 / (rate * shape)
        while True:
            yield rng.gammavariate(shape, scale)
    else:
        raise WorkloadError(f"unknown arrival process {kind!r} "
                            "(poisson, deterministic, bursty, closed, trace, capture)")


def synthetic(spec: dict[str, Any], until: float, rng: random.Random) -> list[Request]:
    """Arrivals in [0, until) from the workload spec (arrival, rate, cv, prompt_tokens, output_tokens)."""
    out, t = [], 0.0
    gaps = interarrivals(spec.get("arrival", "poisson"), float(spec.get("rate", 10.0)), rng,
                         float(spec.get("cv", 2.0)))
    limit = int(spec.get("max_requests", 0)) or None
    while True:
        t += next(gaps)
        if t >= until or (limit is not None and len(out) >= limit):
            return out
        out.append(Request(len(out), t, draw_length(spec.get("prompt_tokens", 128), rng),
                           draw_length(spec.get("output_tokens", 128), rng)))


_ALIASES = {
    "arrival": ("arrival_s", "TIMESTAMP"),
    "prompt": ("prompt_tokens", "ContextTokens"),
    "output": ("output_tokens", "GeneratedTokens"),
}


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    s = text.strip().replace("T", " ")
    if "." in s:  # Azure writes 7 fractional digits; datetime takes at most 6
        head, frac = s.split(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        s = f"{head}.{digits[:6]}"
    return datetime.fromisoformat(s).timestamp()


def load_trace(path: str | Path, speed: float = 1.0) -> list[Request]:
    """Read a CSV trace; ``speed`` > 1 compresses time. Errors name the file, row and column."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise WorkloadError(f"trace {path} not found") from None
    reader = csv.DictReader(lines)
    header = [h.strip() for h in (reader.fieldnames or [])]
    cols = {}
    for role, names in _ALIASES.items():
        found = [n for n in names if n in header]
        if not found:
            raise WorkloadError(f"{path}: missing column {' or '.join(names)} (header: {', '.join(header)})")
        cols[role] = found[0]
    reader.fieldnames = header
    rows = []
    for i, rec in enumerate(reader, start=2):
        try:
            col = cols["arrival"]
            t = _parse_time(rec[col])
            col = cols["prompt"]
            p = int(float(rec[col]))
            col = cols["output"]
            o = int(float(rec[col]))
        except (TypeError, ValueError):
            raise WorkloadError(f"{path}: row {i}, column {col!r}: bad value {rec.get(col)!r}") from None
        if p < 0 or o < 1:
            raise WorkloadError(f"{path}: row {i}: need prompt tokens >= 0 and output tokens >= 1, got {p}, {o}")
        rows.append((t, max(1, p), o))
    if not rows:
        raise WorkloadError(f"{path}: no rows")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [Request(i, (t - t0) / speed, p, o) for i, (t, p, o) in enumerate(rows)]


def load_capture(path: str | Path, speed: float = 1.0) -> list[Request]:
    """Adapter for a specmq capture file (``broker --capture``): the client side becomes the workload.

    Read by ``broker.capture.iter_records`` (the one capture reader), rotated parts ``FILE.1``, ``FILE.2``...
    included. Inbound ``session_open`` messages from clients become distributed requests (prompt =
    len(prompt_ids), output = max_new_tokens; a re-open of a known session is skipped); inbound ``generate``
    messages become generate-queue requests (prompt = len(prompt_ids), or len(prompt) / 4 for text). Everything else
    is ignored; bodies that do not decode are skipped. A truncated or corrupt tail ends the workload there (logged).
    """
    from broker.capture import CaptureError, CaptureRead, iter_records
    from protocol.codec import decode
    from protocol.errors import ProtocolError
    from protocol.messages import Generate, SessionOpen

    path = Path(path)
    read = CaptureRead(path)
    out: list[tuple[float, int, int, str, str]] = []
    seen: set[tuple[bytes, str]] = set()
    try:
        for rec in iter_records(path, read):
            if rec.get("dir") != "in" or rec.get("side", "frontend") != "frontend":
                continue
            try:
                msg = decode(rec["body"])
                t = float(rec["t"])
            except (ProtocolError, KeyError, TypeError, ValueError):
                continue
            peer = rec.get("peer", b"")
            peer_s = peer.hex() if isinstance(peer, bytes) else str(peer)
            if isinstance(msg, SessionOpen):
                if (peer, msg.session) in seen:
                    continue
                seen.add((peer, msg.session))
                out.append((t, len(msg.prompt_ids), msg.max_new_tokens, KIND_SPEC, peer_s))
            elif isinstance(msg, Generate):
                p = len(msg.prompt_ids) if msg.prompt_ids else max(1, len(msg.prompt) // 4)
                out.append((t, p, msg.max_new_tokens, KIND_GENERATE, peer_s))
    except CaptureError as exc:
        raise WorkloadError(str(exc)) from None
    for warning in read.warnings:
        log.warning("capture.warning", path=str(path), warning=warning)
    if not out:
        raise WorkloadError(f"{path}: no session_open or generate messages from clients")
    out.sort(key=lambda r: r[0])
    t0 = out[0][0]
    return [Request(i, (t - t0) / speed, max(1, p), max(1, o), kind, peer)
            for i, (t, p, o, kind, peer) in enumerate(out)]


def build_workload(spec: dict[str, Any], until: float, rng: random.Random) -> list[Request]:
    """Requests arriving before ``until`` for a workload spec; ``fused_fraction`` marks generate-queue requests."""
    arrival = spec.get("arrival", "poisson")
    if arrival == "closed":  # requests are made on the fly by each draft slot (simulator.simulation)
        return []
    speed = float(spec.get("speed", 1.0))
    if arrival in ("trace", "capture") and not spec.get(arrival):
        raise WorkloadError(f"workload.arrival is {arrival!r} but workload.{arrival} (a file path) is not set")
    if arrival == "trace":
        reqs = load_trace(spec["trace"], speed)
    elif arrival == "capture":
        reqs = load_capture(spec["capture"], speed)
    else:
        reqs = synthetic(spec, until, rng)
    reqs = [r for r in reqs if r.arrival < until]
    return reqs

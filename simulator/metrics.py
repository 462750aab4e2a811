"""What a run measured: tokens in the window, per-request latencies, ticks, queue depths; and the summary.

The window is ``[burn_in_s, duration_s]``: only tokens committed, ticks started and requests arrived inside it
count, so the empty-system start does not flatter the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class WorkerStats:
    ticks: int = 0
    rows: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    verified_chunks: int = 0
    max_rows: int = 1
    max_tokens: int = 1
    sessions: int = 0


@dataclass
class Metrics:
    start: float
    end: float
    tokens_in_window: int = 0
    rounds: int = 0
    accepted: int = 0
    drafted: int = 0
    decode_rounds: int = 0  # decode-mode requests answered (γ = 0)
    busy_refusals: int = 0
    workers: dict[str, WorkerStats] = field(default_factory=dict)
    sample_t: list[float] = field(default_factory=list)
    sample_verify_q: list[int] = field(default_factory=list)  # chunks waiting at targets, all targets
    sample_admit_q: list[int] = field(default_factory=list)  # sessions waiting for a target slot
    sample_generate_q: list[int] = field(default_factory=list)
    sample_draft_q: list[int] = field(default_factory=list)  # requests waiting for a free draft
    sample_per_target: dict[str, list[int]] = field(default_factory=dict)

    def tokens(self, t: float, n: int) -> None:
        if self.start <= t <= self.end:
            self.tokens_in_window += n

    def worker(self, name: str, max_rows: int, max_tokens: int) -> WorkerStats:
        ws = self.workers[name] = WorkerStats(max_rows=max_rows, max_tokens=max_tokens)
        return ws


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def summarise(m: Metrics, requests: Sequence, slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    window = max(1e-9, m.end - m.start)
    measured = [r for r in requests if m.start <= r.arrival <= m.end]
    done = [r for r in measured if not math.isnan(r.finished)]
    ttft = [(r.first_token - r.arrival) * 1000 for r in measured if not math.isnan(r.first_token)]
    tpot = [(r.finished - r.first_token) * 1000 / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    e2e = [(r.finished - r.arrival) * 1000 for r in done]
    good = 0
    for r in done:
        t1 = (r.first_token - r.arrival) * 1000
        tp = (r.finished - r.first_token) * 1000 / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        good += t1 <= slo_ttft_ms and tp <= slo_tpot_ms
    out: dict[str, Any] = {
        "throughput_tok_s": m.tokens_in_window / window,
        "requests": len(measured),
        "finished": len(done),
        "unfinished": len(measured) - len(done),
        "request_rate": len(measured) / window,
    }
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = percentile(xs, q)
        out[f"{name}_mean_ms"] = _mean(xs)
    out["goodput"] = good / len(measured) if measured else math.nan  # unfinished requests count as misses
    out["goodput_rps"] = good / window
    out["tokens_per_round"] = (m.accepted + m.rounds) / m.rounds if m.rounds else math.nan
    out["acceptance_rate"] = m.accepted / m.drafted if m.drafted else math.nan
    out["decode_rounds"] = m.decode_rounds
    out["mean_gamma"] = m.drafted / (m.rounds + m.decode_rounds) if m.rounds + m.decode_rounds else math.nan
    ws = list(m.workers.values())
    ticks = sum(w.ticks for w in ws)
    out["ticks"] = ticks
    out["batch_rows_mean"] = sum(w.rows for w in ws) / ticks if ticks else math.nan
    out["batch_row_util"] = sum(w.rows / w.max_rows for w in ws) / ticks if ticks else math.nan
    out["batch_token_util"] = sum(w.tokens / w.max_tokens for w in ws) / ticks if ticks else math.nan
    out["worker_busy"] = _mean([min(1.0, w.busy_s / window) for w in ws])
    toks = [w.tokens for w in ws]
    out["load_imbalance"] = max(toks) / _mean(toks) if toks and _mean(toks) > 0 else math.nan  # max/mean tokens
    out["verify_queue_mean"] = _mean(m.sample_verify_q)
    out["verify_queue_max"] = max(m.sample_verify_q, default=0)
    out["admit_queue_mean"] = _mean(m.sample_admit_q)
    out["generate_queue_mean"] = _mean(m.sample_generate_q)
    out["draft_queue_mean"] = _mean(m.sample_draft_q)
    out["busy_refusals"] = m.busy_refusals
    out["per_worker"] = {name: {"ticks": w.ticks, "busy": round(min(1.0, w.busy_s / window), 4),
                                "rows_mean": round(w.rows / w.ticks, 2) if w.ticks else 0.0,
                                "tokens": w.tokens, "sessions": w.sessions}
                         for name, w in m.workers.items()}
    return out

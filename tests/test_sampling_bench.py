"""``specmq bench sampling``'s arithmetic: the ratios and the verdict, and the per-process CPU clock it reads."""
from __future__ import annotations

import os
import sys

import pytest

from benchmarks.sampling import CPU_PARTS, PARTS, compare, process_cpu_ms


def _row(scale: float, median: float) -> dict:
    row = {part: 10.0 * scale for part in PARTS + CPU_PARTS}
    row["round_ms_median"] = median
    return row


def test_verdict_follows_the_median_round_ratio():
    ok = compare(_row(1.0, 20.0), _row(1.3, 22.0), goal=1.15)  # a spiky mean, a typical round within the goal
    assert ok["round_ms"] == 1.3 and ok["round_ms_median"] == 1.1 and ok["ok"]
    slow = compare(_row(1.0, 20.0), _row(1.0, 24.0), goal=1.15)
    assert slow["round_ms_median"] == 1.2 and not slow["ok"]


def test_missing_cpu_figures_give_no_ratio():
    greedy, sampled = _row(1.0, 20.0), _row(1.0, 20.0)
    greedy["cpu_broker_ms"] = None
    assert compare(greedy, sampled, goal=1.15)["cpu_broker_ms"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_cpu_clock_moves_with_work():
    before = process_cpu_ms(os.getpid())
    deadline = before + 30.0
    while process_cpu_ms(os.getpid()) < deadline:  # burn CPU until the clock has moved 30 ms
        sum(i * i for i in range(10_000))
    assert process_cpu_ms(os.getpid()) >= deadline
    assert process_cpu_ms(2 ** 22 + 12345) is None  # no such process

"""``specmq bench chaos``'s bookkeeping without processes: output verdicts, fault recovery, percentiles, flags."""
from __future__ import annotations

import argparse
import time

import pytest

from benchmarks import BenchmarkError
from benchmarks.chaos import FAULT_KINDS, Ledger, add_arguments, classify, config_from_args, percentile


def test_classify_names_duplicated_missing_and_wrong_tokens():
    assert classify([1, 2, 3], [1, 2, 3]) == ("ok", 0)
    assert classify([1, 2, 2, 3], [1, 2, 3]) == ("duplicated", 1)
    assert classify([1, 3], [1, 2, 3]) == ("missing", 1)
    assert classify([1, 4, 3], [1, 2, 3]) == ("wrong", 1)


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4, 1, 3, 2], 50) == 2
    assert percentile(list(range(1, 101)), 99) == 99


def test_target_fault_affects_only_its_sessions_and_recovers_on_their_next_token():
    led = Ledger()
    for unit, worker in (("s:a", "t0"), ("s:b", "t1"), ("s:c", "t0")):
        led.start(unit)
        led.placed(unit, worker)
    led.start("j:x")
    f = led.fault("target-kill", "t0", 1.0)
    assert f.affected == 2 and f.pending == {"s:a", "s:c"}
    led.commit("s:b")  # another target's session: no bearing on this fault
    led.commit("s:a")
    assert f.recovered_s is None
    time.sleep(0.01)
    led.commit("s:c")
    assert f.recovered_s is not None and f.recovered_s >= 0.01 and not f.pending


def test_broker_fault_counts_tokens_only_once_the_broker_is_back():
    led = Ledger()
    for unit in ("s:a", "j:x"):
        led.start(unit)
    f = led.fault("broker-term", "broker", 0.0)
    assert f.affected == 2
    led.commit("s:a")  # drained from the old broker: not a recovery
    led.commit("j:x")
    assert f.pending == {"s:a", "j:x"}
    led.resume(f)
    led.commit("s:a")
    led.commit("j:x")
    assert f.recovered_s is not None and f.row()["unresolved"] == 0


def test_a_lost_unit_leaves_its_fault_unrecovered():
    led = Ledger()
    for unit in ("s:a", "j:x"):
        led.start(unit)
    f = led.fault("broker-kill", "broker", 0.0)
    led.resume(f)
    led.commit("j:x")
    led.end("s:a", ok=False)
    assert f.lost == 1 and f.recovered_s is None and f.row()["unresolved"] == 0


def test_fused_fault_with_no_jobs_in_flight_affects_nothing():
    led = Ledger()
    led.start("s:a")
    f = led.fault("fused-stop", "f0", 0.0)
    assert f.affected == 0 and f.recovered_s is None


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_are_checked_with_the_flag_named():
    cfg = config_from_args(_args("--minutes", "0.5", "--sessions", "4", "--faults", "target-kill,broker-term"))
    assert cfg.faults == ("target-kill", "broker-term") and cfg.sessions == 4 and cfg.fault_every is None
    assert config_from_args(_args()).faults == FAULT_KINDS
    for argv, words in ((("--faults", "target-kill,meteor"), "meteor"), (("--minutes", "0"), "--minutes"),
                        (("--sessions", "0"), "--sessions"), (("--fault-every", "-1"), "--fault-every"),
                        (("--fused", "0",), "--fused")):
        with pytest.raises(BenchmarkError, match=words):
            config_from_args(_args(*argv))

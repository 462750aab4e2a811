"""The tick policy shared by the target worker and the simulator (workers/batching.py)."""
from workers.batching import BatchLimits, plan_tick, tick_due

L = BatchLimits(max_batch_tokens=16, max_batch_rows=3, prefill_chunk=8, tick_ms=2.0)


def test_tick_waits_for_company_until_tick_ms():
    assert not tick_due(0.0, None, 0, 0, L)
    assert not tick_due(0.001, 0.0, 5, 1, L)
    assert tick_due(0.002, 0.0, 5, 1, L)


def test_full_batch_fires_at_once():
    assert tick_due(0.0, 0.0, 16, 1, L)  # token budget reached
    assert tick_due(0.0, 0.0, 3, 3, L)  # row limit reached


def test_tick_fires_at_once_when_every_active_session_has_work():
    assert tick_due(0.0, 0.0, 5, 1, L, active_rows=1)  # a lone session pays no batching delay
    assert tick_due(0.0, 0.0, 10, 2, L, active_rows=2)
    assert not tick_due(0.0, 0.0, 10, 2, L, active_rows=3)  # a third session may still join
    assert not tick_due(0.0, 0.0, 5, 1, L, active_rows=0)  # nothing known: the clock decides


def test_plan_takes_verifies_first_then_chunked_prefills_in_the_leftover_budget():
    plan = plan_tick([("a", 5), ("b", 5)], [("p", 40)], L)
    assert plan.verify == ["a", "b"] and plan.prefill == [("p", 6)]


def test_plan_respects_rows_and_always_makes_progress():
    plan = plan_tick([("a", 5), ("b", 5), ("c", 5), ("d", 5)], [], L)
    assert plan.verify == ["a", "b", "c"]
    big = plan_tick([("huge", 100)], [], L)  # one chunk over the budget still runs alone
    assert big.verify == ["huge"]
    only_prefill = plan_tick([], [("p", 100)], L)
    assert only_prefill.prefill == [("p", 8)]

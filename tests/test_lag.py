"""Lag bookkeeping: per-millisecond counts, and a bounded window whose summary stays right."""

from __future__ import annotations

from invalgw.lag import LagWindow, lag_counts


def test_lag_counts_group_invalidations_by_origin_millisecond() -> None:
    ids = ["1000-0", "1000-1", "1000-2", "1003-0", "1010-0", "1010-1"]
    assert sorted(lag_counts(ids, now_ms=1010.5)) == [(0.5, 2), (7.5, 1), (10.5, 3)]
    assert lag_counts(["2000-0"], now_ms=1999.0) == [(0.0, 1)]  # clocks a little apart


def test_window_summarises_what_it_was_given() -> None:
    window = LagWindow()
    window.add_counts([(float(lag), 1) for lag in range(1, 101)])
    assert window.take() == (51.0, 100.0, 100.0)
    assert window.take() == (None, None, None)  # a new interval starts empty


def test_a_busy_interval_is_summarised_exactly_in_bounded_memory() -> None:
    window = LagWindow()
    for batch in range(50_000):  # more distinct lags than the window holds pairs
        window.add_counts([(1.0 + batch % 7 / 100, 1000), (3.0, 1000)])
    window.add_counts([(99.0, 1)])
    assert len(window._counts) <= LagWindow.MAX_PAIRS
    p50, p99, largest = window.take()
    assert p50 == 3.0  # half the invalidations at 1.0x ms, half (and one more) at 3 or more
    assert p99 == 3.0
    assert largest == 99.0


def test_percentiles_weigh_each_lag_by_its_invalidations() -> None:
    window = LagWindow()
    window.add_counts([(5.0, 98), (1.0, 1), (50.0, 1)])
    assert window.take() == (5.0, 50.0, 50.0)  # p99 of 100: the 100th
    window.add_counts([(5.0, 1), (1.0, 1), (50.0, 98)])
    assert window.take() == (50.0, 50.0, 50.0)

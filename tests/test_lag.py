"""Lag bookkeeping: per-millisecond counts, and a bounded window whose summary stays right."""

from __future__ import annotations

import random

import pytest

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


def test_a_busy_interval_keeps_a_bounded_uniform_sample_and_the_true_max() -> None:
    random.seed(7)
    window = LagWindow()
    for _ in range(50):  # 50 batches of 2,000: five times what the window holds
        window.add_counts([(1.0, 1000), (3.0, 1000)])
    window.add_counts([(99.0, 1)])
    assert len(window._samples) == LagWindow.MAX_SAMPLES
    ones = window._samples.count(1.0) / LagWindow.MAX_SAMPLES
    assert ones == pytest.approx(0.5, abs=0.05)
    p50, p99, largest = window.take()
    assert p99 == 3.0
    assert largest == 99.0
    assert p50 in (1.0, 3.0)

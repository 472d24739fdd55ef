"""The batch histogram exports what prometheus_client's Histogram would for the same values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from invalgw.metrics import LAG_BUCKETS, BatchHistogram

VALUES = [0.0, 0.0004, 0.001, 0.0010001, 0.02, 0.02, 1.0, 59.9, 3600.0, 7200.0]


def _exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_batch_observations_match_one_by_one_observations() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram(
        "lag_seconds", "Lag.", ["origin", "region"], buckets=LAG_BUCKETS, registry=theirs
    )
    batched = BatchHistogram(
        "lag_seconds", "Lag.", ["origin", "region"], buckets=LAG_BUCKETS, registry=ours
    )
    for value in VALUES:
        reference.labels("us-east", "eu-west").observe(value)
    reference.labels("us-east", "ap-south").observe(0.3)
    batched.labels("us-east", "eu-west").observe_many(VALUES[:4])
    batched.labels("us-east", "eu-west").observe_many(VALUES[4:])
    batched.labels("us-east", "ap-south").observe(0.3)

    assert _exposition(ours) == _exposition(theirs)
    count = ours.get_sample_value("lag_seconds_count", {"origin": "us-east", "region": "eu-west"})
    assert count == len(VALUES)


def test_counted_observations_equal_repeated_ones() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("lag_seconds", "Lag.", ["origin"], buckets=LAG_BUCKETS, registry=theirs)
    batched = BatchHistogram("lag_seconds", "Lag.", ["origin"], buckets=LAG_BUCKETS, registry=ours)
    for value, count in [(0.004, 3), (0.2, 1), (30.0, 2)]:
        for _ in range(count):
            reference.labels("us-east").observe(value)
    batched.labels("us-east").observe_counts([(0.004, 3), (0.2, 1), (30.0, 2)])
    assert _exposition(ours) == _exposition(theirs)

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


def test_the_gateway_registry_has_what_an_operator_graphs_first() -> None:
    """Process and Python series, the build's version, no ``_created`` series, and the same
    label order on every per-region metric."""
    from invalgw import __version__
    from invalgw.metrics import Metrics

    metrics = Metrics("us-east")
    metrics.lag.labels("us-east", "eu-west").observe(0.01)
    metrics.applied.labels("us-east", "eu-west", "unlink").inc()
    text = generate_latest(metrics.registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= names
    assert "python_info" in names
    assert f'invalgw_build_info{{version="{__version__}"}} 1.0' in text
    assert not [name for name in names if name.endswith("_created")]
    for family in metrics.registry.collect():
        if family.name.startswith("invalgw_") and family.samples:
            labels = [key for key in family.samples[0].labels if key not in ("le", "version")]
            assert labels[:1] == ["region"] or not labels, (family.name, labels)
    assert 'invalgw_replication_lag_seconds_count{origin="eu-west",region="us-east"}' in text

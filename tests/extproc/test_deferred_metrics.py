"""Deferred histogram observations export exactly what direct ``observe`` calls would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from epp.observability import deferred


@pytest.fixture(autouse=True)
def extproc_core():
    """No server here: opt out of the package-wide core parametrisation."""
    return None


def _samples(h: Histogram) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for metric in h.collect() for s in metric.samples if not s.name.endswith("_created")]


values = st.lists(st.one_of(st.floats(min_value=0, max_value=5000, allow_nan=False),
                            st.sampled_from([0.005, 0.1, 1, 64, 65536])), max_size=60)


@given(values, values)
def test_deferred_equals_direct(a, b):
    buckets = (0.005, 0.025, 0.1, 1, 8, 64, 1024, 65536)
    reg = CollectorRegistry()
    direct = Histogram("direct_h", "d", ["x"], buckets=buckets, registry=reg)
    later = Histogram("later_h", "l", ["x"], buckets=buckets, registry=reg)
    for label, vals in (("a", a), ("b", b)):
        for v in vals:
            direct.labels(label).observe(v)
            deferred.observe(later.labels(label), v)
    assert deferred.pending() >= len(a) + len(b)
    deferred.flush()
    assert deferred.pending() == 0
    strip = lambda rows: [(n.split("_h", 1)[1], lab, round(v, 6)) for n, lab, v in rows]  # noqa: E731
    assert strip(_samples(direct)) == strip(_samples(later))

"""metric-scorer: bounds, min-max normalisation, direction, and missing/stale metrics."""

from __future__ import annotations

import math

import pytest
from sched_helpers import cycle, make, request

from epp.datalayer.endpoint import Endpoint, EndpointMetadata, now
from epp.framework import ParameterError
from epp.framework.types import Candidate
from epp.observability.metrics import REGISTRY


def custom(address: str, value=None, age: float = 0.0, metric: str = "lat") -> Candidate:
    ep = Endpoint(EndpointMetadata(address, 8000))
    if value is not None:
        ep.set_custom({metric: value}, at=now() - age)
    return Candidate(ep)


def score(s, cs):
    return list(s.score(cycle(), request(), cs))


def counted(plugin: str, reason: str, metric: str = "lat") -> float:
    return REGISTRY.get_sample_value("epp_scorer_stale_or_missing_metric_total",
                                     {"plugin_name": plugin, "metric": metric, "reason": reason}) or 0.0


def test_min_max_normalisation_lower_is_better() -> None:
    s = make("metric-scorer", {"metricName": "lat"}, name="mm-low")
    cs = [custom("10.0.0.1", 10.0), custom("10.0.0.2", 30.0), custom("10.0.0.3", 20.0)]
    assert score(s, cs) == [1.0, 0.0, 0.5]


def test_min_max_normalisation_higher_is_better_and_all_equal() -> None:
    s = make("metric-scorer", {"metricName": "lat", "higherIsBetter": True}, name="mm-high")
    assert score(s, [custom("10.0.0.1", 10.0), custom("10.0.0.2", 30.0), custom("10.0.0.3", 25.0)]) == [0.0, 1.0, 0.75]
    assert score(s, [custom("10.0.0.1", 7.0), custom("10.0.0.2", 7.0)]) == [1.0, 1.0]


def test_bounds_give_linear_position_clamped() -> None:
    s = make("metric-scorer", {"metricName": "lat", "min": 100, "max": 300}, name="bounded")
    cs = [custom("10.0.0.1", 50.0), custom("10.0.0.2", 150.0), custom("10.0.0.3", 300.0), custom("10.0.0.4", 900.0)]
    assert score(s, cs) == [1.0, 0.75, 0.0, 0.0]
    s = make("metric-scorer", {"metricName": "lat", "min": 100, "max": 300, "higherIsBetter": True}, name="bounded-up")
    assert score(s, cs) == [0.0, 0.25, 1.0, 1.0]


def test_missing_and_stale_metrics_score_zero_and_are_counted() -> None:
    s = make("metric-scorer", {"metricName": "lat", "metricsStalenessThreshold": "500ms"}, name="staleness")
    before_missing, before_stale = counted("staleness", "missing"), counted("staleness", "stale")
    cs = [custom("10.0.0.1", 10.0), custom("10.0.0.2"), custom("10.0.0.3", 1.0, age=2.0), custom("10.0.0.4", 20.0)]
    # the stale 1.0 would otherwise have been the best; it is excluded from the normalisation too
    assert score(s, cs) == [1.0, 0.0, 0.0, 0.0]
    assert counted("staleness", "missing") == before_missing + 1
    assert counted("staleness", "stale") == before_stale + 1
    # default threshold is 2 s: an age of 1 s is fresh
    d = make("metric-scorer", {"metricName": "lat"}, name="staleness-default")
    assert score(d, [custom("10.0.0.1", 5.0, age=1.0), custom("10.0.0.2", 5.0, age=3.0)]) == [1.0, 0.0]


def test_garbage_values_never_crash() -> None:
    s = make("metric-scorer", {"metricName": "lat"}, name="garbage")
    before = counted("garbage", "invalid")
    cs = [custom("10.0.0.1", math.nan), custom("10.0.0.2", math.inf), custom("10.0.0.3", "abc"), custom("10.0.0.4", 3)]
    assert score(s, cs) == [0.0, 0.0, 0.0, 1.0]
    assert counted("garbage", "invalid") == before + 3
    assert score(s, [custom("10.0.0.1"), custom("10.0.0.2")]) == [0.0, 0.0]
    assert score(s, []) == []


@pytest.mark.parametrize("params,message", [
    ({}, "metricName"),
    ({"metricName": "x", "min": 1}, "together"),
    ({"metricName": "x", "min": 5, "max": 5}, "greater"),
    ({"metricName": "x", "metricsStalenessThreshold": "soon"}, "duration"),
    ({"metricName": "x", "higherIsBetter": "yes"}, "boolean"),
])
def test_bad_parameters(params, message) -> None:
    with pytest.raises(ParameterError, match=message):
        make("metric-scorer", params)

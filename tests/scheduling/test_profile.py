"""SchedulingProfile and Scheduler: filters, clamped weighted sums, breakdown, errors, metrics."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_helpers import cands, cycle, make, request

from epp.framework import Filter, Scorer
from epp.observability import deferred
from epp.observability.metrics import REGISTRY
from epp.scheduling import NoCandidatesError, Scheduler, SchedulingError, SchedulingProfile, WeightedScorer
from epp.scheduling.profile import clamp_scores


class Fixed(Scorer):
    """Returns the scores it was given (a test double for scorer output, not for the scheduler)."""

    def __init__(self, name: str, scores) -> None:
        super().__init__(name)
        self.scores = scores

    def score(self, cycle, request, candidates):
        return self.scores


class DropFirst(Filter):
    def filter(self, cycle, request, candidates):
        return candidates[1:]


def profile(scorers, filters=(), picker="max-score-picker", **kw):
    return SchedulingProfile("p", filters=list(filters), scorers=[WeightedScorer(s, w) for s, w in scorers],
                             picker=make(picker), **kw)


def test_weighted_sum_is_clamped_and_unnormalised() -> None:
    cs = cands(3)
    p = profile([(Fixed("a", [0.5, 1.7, -2.0]), 2.0), (Fixed("b", [math.nan, 0.25, 1.0]), 3.0)])
    res = p.run(cycle(), request(), cs)
    totals = {b.key: b.total for b in res.breakdown}
    assert totals == {"10.0.0.1:8000": 1.0, "10.0.0.2:8000": 2.75, "10.0.0.3:8000": 3.0}
    assert res.targets == [cs[2]]
    by_key = {b.key: b.scorers for b in res.breakdown}
    assert by_key["10.0.0.2:8000"] == {"a": (1.0, 2.0), "b": (0.25, 0.75)}
    assert by_key["10.0.0.1:8000"] == {"a": (0.5, 1.0), "b": (0.0, 0.0)}
    assert len(res.breakdown) == 3 and res.breakdown[0].key == "10.0.0.1:8000"


def test_short_or_garbage_score_lists() -> None:
    assert clamp_scores([0.5], 3) == [0.5, 0.0, 0.0]
    assert clamp_scores([0.5, 0.2, 0.9, 0.1], 2) == [0.5, 0.2]
    assert clamp_scores(["x", None, 0.5], 3) == [0.0, 0.0, 0.5]
    assert clamp_scores([True, 2, -1], 3) == [1.0, 1.0, 0.0]
    assert clamp_scores((0.25, math.inf), 2) == [0.25, 1.0]


def test_filters_record_removed_endpoints_and_an_empty_result_ends_the_profile() -> None:
    cs = cands(3)
    p = profile([(Fixed("a", [0.0, 0.0]), 1.0)], filters=[DropFirst("drop")])
    res = p.run(cycle(), request(), cs)
    assert res.filtered_out == {"drop": ["10.0.0.1:8000"]}
    with pytest.raises(NoCandidatesError, match="filter 'drop' removed all"):
        p.run(cycle(), request(), cs[:1])


def test_scheduler_fails_clearly_when_every_profile_fails() -> None:
    s = Scheduler(make("single-profile-handler"), {"only": profile([], filters=[DropFirst("drop")])})
    with pytest.raises(SchedulingError, match="failed to run any scheduler profile for request r1: only: no endpoints"):
        s.schedule(request(), cands(1))


def test_scheduler_records_e2e_and_attempts() -> None:
    def value(name, labels=None):
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    s = Scheduler(make("single-profile-handler"), {"p": profile([(make("queue-scorer"), 1.0)])})
    deferred.flush()
    before = value("inference_extension_scheduler_e2e_duration_seconds_count")
    labels = {"status": "success", "target_model_name": "metrics-model", "pod_name": "10.0.0.1:8000",
              "namespace": "default", "port": "8000"}
    ok_before = value("inference_extension_scheduler_attempts_total", labels)
    s.schedule(request(model="metrics-model"), cands(1))
    deferred.flush()  # histograms are binned off the request path
    assert value("inference_extension_scheduler_e2e_duration_seconds_count") == before + 1
    assert value("inference_extension_scheduler_attempts_total", labels) == ok_before + 1


def test_plugin_durations_are_sampled() -> None:
    sc = make("queue-scorer", name="timed-queue")
    p = profile([(sc, 1.0)], timing_every=4)
    labels = {"extension_point": "Scorer", "plugin_type": "queue-scorer", "plugin_name": "timed-queue"}
    for _ in range(8):
        p.run(cycle(), request(), cands(2))
    deferred.flush()
    assert REGISTRY.get_sample_value("inference_extension_plugin_duration_seconds_count", labels) == 2
    off = profile([(make("queue-scorer", name="untimed"), 1.0)], timing_every=0)
    off.run(cycle(), request(), cands(2))
    deferred.flush()
    assert REGISTRY.get_sample_value("inference_extension_plugin_duration_seconds_count",
                                     {**labels, "plugin_name": "untimed"}) is None


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(min_value=1, max_value=12), k=st.integers(min_value=1, max_value=6))
def test_weighted_sum_is_monotone_in_each_weight(data, n, k) -> None:
    """Raising one scorer's weight never lowers any candidate's total (scores are >= 0 after clamping)."""
    cs = cands(n)
    raw = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5))
    scorers = [Fixed(f"s{i}", data.draw(st.lists(raw, min_size=n, max_size=n))) for i in range(k)]
    weights = data.draw(st.lists(st.floats(min_value=0, max_value=100), min_size=k, max_size=k))
    which = data.draw(st.integers(min_value=0, max_value=k - 1))
    bump = data.draw(st.floats(min_value=0, max_value=100))
    base = profile(list(zip(scorers, weights))).run(cycle(), request(), cs)
    weights2 = list(weights)
    weights2[which] += bump
    more = profile(list(zip(scorers, weights2))).run(cycle(), request(), cs)
    for b1, b2 in zip(base.breakdown, more.breakdown):
        assert b2.total >= b1.total - 1e-9 * max(1.0, b1.total)
        for name, (raw_score, weighted) in b1.scorers.items():
            assert 0.0 <= raw_score <= 1.0
        assert b1.total == pytest.approx(sum(w for _, w in b1.scorers.values()))
        assert b2.total == pytest.approx(sum(w for _, w in b2.scorers.values()))

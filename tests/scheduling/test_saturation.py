"""utilization-detector, concurrency-detector and legacy admission (upstream §5.4)."""

from __future__ import annotations

import pytest
from sched_helpers import cand, cands, cycle, make, request

from epp.framework import AdmissionDenied, ParameterError
from epp.framework.scheduling import ProfileResult, SchedulingResult
from epp.framework.types import InferenceResponse
from epp.scheduling.admission import LegacyAdmission


def test_utilization_saturation_formula() -> None:
    d = make("utilization-detector")
    cs = [cand("10.0.0.1", waiting_queue_size=5, kv_cache_usage=0.2),  # max(1.0, 0.25) = 1.0
          cand("10.0.0.2", waiting_queue_size=0, kv_cache_usage=0.4)]  # max(0, 0.5) = 0.5
    assert d.saturation(cs) == pytest.approx(0.75)
    assert d.saturation([]) == 1.0


def test_stale_or_unscraped_endpoints_count_as_saturated() -> None:
    d = make("utilization-detector")
    idle = cand("10.0.0.1")
    never = cand("10.0.0.2", fresh=False)
    from epp.datalayer.endpoint import now
    stale = cand("10.0.0.3", update_time=now() - 0.5)  # default staleness 200 ms
    assert d.saturation([idle, never, stale]) == pytest.approx(2 / 3)
    relaxed = make("utilization-detector", {"metricsStalenessThreshold": "1s"})
    assert relaxed.saturation([idle, stale]) == 0.0


def test_utilization_as_filter() -> None:
    d = make("utilization-detector")
    ok = cand("10.0.0.1", waiting_queue_size=4, kv_cache_usage=0.79)
    busy_q = cand("10.0.0.2", waiting_queue_size=5)
    busy_kv = cand("10.0.0.3", kv_cache_usage=0.8)
    never = cand("10.0.0.4", fresh=False)
    assert d.filter(cycle(), request(), [ok, busy_q, busy_kv, never]) == [ok]
    assert d.filter(cycle(), request(), [busy_q, busy_kv]) == [busy_q, busy_kv]  # none left: keep all
    loose = make("utilization-detector", {"headroom": 0.5})
    assert loose.filter(cycle(), request(), [ok, busy_q, busy_kv]) == [ok, busy_q, busy_kv]


@pytest.mark.parametrize("params,message", [
    ({"queueDepthThreshold": 0}, "queueDepthThreshold"),
    ({"kvCacheUtilThreshold": 1.5}, "kvCacheUtilThreshold"),
    ({"metricsStalenessThreshold": "0s"}, "metricsStalenessThreshold"),
    ({"headroom": -1}, "headroom"),
])
def test_utilization_bad_parameters(params, message) -> None:
    with pytest.raises(ParameterError, match=message):
        make("utilization-detector", params)


def test_concurrency_detector() -> None:
    d = make("concurrency-detector", {"maxConcurrency": 2})
    cs = cands(2)
    for i in range(3):
        d.pre_request(request(rid=str(i)), SchedulingResult({"d": ProfileResult([cs[0]])}, "d"))
    assert d.saturation(cs) == 0.75  # 3 in flight / (2 x 2)
    assert d.filter(cycle(), request(), cs) == [cs[1]]
    for i in range(3):
        d.response_complete(request(rid=str(i)), InferenceResponse(str(i)), cs[0].key)
    assert d.saturation(cs) == 0.0
    tokens = make("concurrency-detector", {"concurrencyMode": "tokens", "maxTokenConcurrency": 100})
    tokens.pre_request(request(rid="t", prefix=b"x" * 400), SchedulingResult({"d": ProfileResult([cs[1]])}, "d"))
    assert tokens.saturation(cs) == 0.5  # 100 tokens / (100 x 2)
    with pytest.raises(ParameterError, match="must be one of"):
        make("concurrency-detector", {"concurrencyMode": "bytes"})


def test_legacy_admission_sheds_only_sheddable_requests_when_saturated() -> None:
    adm = LegacyAdmission(make("utilization-detector"))
    saturated = [cand("10.0.0.1", waiting_queue_size=10)]
    calm = [cand("10.0.0.1", waiting_queue_size=1)]
    assert adm.check(request(priority=-1), saturated) == AdmissionDenied(429, "system saturated, sheddable request dropped")
    assert adm.check(request(priority=0), saturated) is None
    assert adm.check(request(priority=5), saturated) is None
    assert adm.check(request(priority=-1), calm) is None

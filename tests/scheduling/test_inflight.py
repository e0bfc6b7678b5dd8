"""In-flight load: booked at PreRequest, released exactly once at ResponseComplete."""

from __future__ import annotations

from sched_helpers import cands, cycle, make, request

from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.pool import EndpointPool
from epp.framework.scheduling import ProfileResult, SchedulingResult
from epp.framework.types import Candidate, InferenceResponse
from epp.framework.handle import PluginHandle
from plugins.requestcontrol.data import INFLIGHT_LOAD_KEY, PREFIX_CACHE_MATCH_INFO_KEY, InFlightLoad, PrefixCacheMatchInfo
from plugins.requestcontrol.inflight import InflightTracker


def result(*targets, profiles=("default",)):
    return SchedulingResult({p: ProfileResult([t]) for p, t in zip(profiles, targets)}, profiles[0])


def loads(p, candidates):
    p.produce(cycle(), request(), candidates)
    return [c.data[INFLIGHT_LOAD_KEY] for c in candidates]


def test_book_and_release_exactly_once() -> None:
    p = make("inflight-load-producer")
    cs = cands(2)
    r1, r2 = request(rid="1", prefix=b"x" * 400), request(rid="2", prefix=b"y" * 40)
    p.pre_request(r1, result(cs[0]))
    p.pre_request(r2, result(cs[0]))
    assert loads(p, cands(2)) == [InFlightLoad(2, 110), InFlightLoad(0, 0)]
    done = InferenceResponse("1", outcome="client-disconnect")
    p.response_complete(r1, done, cs[0].key)
    p.response_complete(r1, done, cs[0].key)  # a second completion of the same request changes nothing
    assert loads(p, cands(2)) == [InFlightLoad(1, 10), InFlightLoad(0, 0)]
    p.response_complete(request(rid="never-booked"), InferenceResponse("x"), cs[0].key)
    p.response_complete(r2, InferenceResponse("2", outcome="error"), cs[0].key)
    assert loads(p, cands(2)) == [InFlightLoad(0, 0), InFlightLoad(0, 0)]
    assert p.tracker.in_flight() == 0


def test_tokens_discount_the_targets_cached_prefix() -> None:
    p = make("inflight-load-producer")
    c = cands(1)[0]
    c.data[PREFIX_CACHE_MATCH_INFO_KEY] = PrefixCacheMatchInfo(5, 10, 16)  # 80 tokens cached
    p.pre_request(request(rid="1", prefix=b"z" * 800), result(c))  # 200 tokens
    assert loads(p, cands(1)) == [InFlightLoad(1, 120)]


def test_every_profile_target_is_booked() -> None:
    p = make("inflight-load-producer")
    cs = cands(2)
    req = request(rid="pd", prefix=b"a" * 40)
    p.pre_request(req, result(cs[0], cs[1], profiles=("decode", "prefill")))
    assert [x.requests for x in loads(p, cands(2))] == [1, 1]
    p.response_complete(req, InferenceResponse("pd"), cs[0].key)
    assert [x.requests for x in loads(p, cands(2))] == [0, 0]


def test_leaked_bookings_are_swept() -> None:
    t = InflightTracker(request_timeout=10.0)
    t.book("old", [("a", 5)])
    assert t.sweep(now=10**9) == 1
    assert t.requests("a") == 0 and t.tokens("a") == 0 and not t.release("old")


async def test_removed_endpoint_forgotten() -> None:
    pool = EndpointPool()
    pool.sync([EndpointMetadata("10.0.0.1", 8000)])
    h = PluginHandle(pool=pool)
    p = h.create("inflight-load-producer")
    await p.start(h)
    (ep,) = pool.endpoints()
    p.pre_request(request(rid="1"), result(Candidate(ep)))
    pool.remove(ep.key)
    assert p.tracker.requests(ep.key) == 0
    await p.close()

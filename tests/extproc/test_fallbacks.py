"""Fallback endpoints (``--destination-fallbacks N``) over a real gRPC channel: the header and
the ``envoy.lb`` metadata carry the same ordered list, primary first, then the next best
endpoints of the primary profile's ranking (subset hint, exclusions and filters respected)."""

from __future__ import annotations

from typing import Sequence

import grpc
import pytest
from extproc_support import (
    REQ_HEADERS,
    EppThread,
    Mode,
    body_msg,
    completion_body,
    headers_msg,
    lb_metadata_of,
    make_config,
    make_pool,
    new_director,
    set_headers_of,
    stub_for,
)

from epp.framework.scheduling import CycleState, Scorer
from epp.framework.types import Candidate, InferenceRequest
from epp.scheduling.profile import WeightedScorer

# Distinct scores by port: the ranking is 8002 > 8004 > 8003 > 8001 > 8005.
SCORES = {8001: 0.2, 8002: 0.9, 8003: 0.5, 8004: 0.7, 8005: 0.1}
PORTS = tuple(SCORES)


class PortRankScorer(Scorer):
    plugin_type = "test-port-rank"

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        return [SCORES[c.metadata.port] for c in candidates]


def key(port: int) -> str:
    return f"10.0.0.1:{port}"


def ranked(*ports: int) -> str:
    return ",".join(key(p) for p in ports)


def start(fallbacks: int, ports: Sequence[int] = PORTS) -> EppThread:
    config = make_config()
    config.profiles["default"].scorers = [WeightedScorer(PortRankScorer("rank"), 1.0)]
    return EppThread(new_director(config, make_pool(*ports), destination_fallbacks=fallbacks))


def pick(epp: EppThread, *, headers: dict[str, str] | None = None, metadata=None, buffered: bool = False) -> str:
    """One request through the channel; returns the destination after checking that the header
    and the metadata agree."""
    hdrs = {**REQ_HEADERS, **(headers or {})}
    if buffered:
        msgs = [headers_msg(hdrs, req_mode=Mode.BUFFERED, metadata=metadata), body_msg(completion_body(), True)]
    else:
        msgs = [headers_msg(hdrs, metadata=metadata), body_msg(completion_body(), True)]
    with grpc.insecure_channel(epp.target) as ch:
        out = list(stub_for(ch)(iter(msgs), timeout=5))
    routed = out[1] if buffered else out[0]
    common = routed.request_body.response if buffered else routed.request_headers.response
    dest = set_headers_of(common)["x-gateway-destination-endpoint"]
    assert lb_metadata_of(routed) == dest
    return dest


@pytest.fixture
def two_fallbacks():  # per test: each runs on both server cores (conftest)
    with start(2) as epp:
        yield epp


@pytest.mark.parametrize("buffered", [False, True])
def test_the_list_is_the_ranking_in_header_and_metadata(two_fallbacks, buffered):
    assert pick(two_fallbacks, buffered=buffered) == ranked(8002, 8004, 8003)
    assert two_fallbacks.director.decisions.recent(1)[0].target == ranked(8002, 8004, 8003)


def test_the_subset_hint_bounds_the_fallbacks(two_fallbacks):
    md = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": [key(8001), key(8005)]}}
    assert pick(two_fallbacks, metadata=md) == ranked(8001, 8005)


def test_the_profile_filters_bound_the_fallbacks(two_fallbacks):
    # The test filter keeps the endpoints named in the ``test-only`` header.
    assert pick(two_fallbacks, headers={"test-only": ranked(8005, 8003, 8001)}) == ranked(8003, 8001, 8005)


def test_an_excluded_endpoint_is_never_a_fallback():
    with start(2) as epp:
        pool = epp.director.pool
        pool.exclude(pool.get(key(8004)), "test: the proxy could not reach it")
        assert pick(epp) == ranked(8002, 8003, 8001)


def test_more_fallbacks_than_endpoints_names_each_once():
    with start(10, ports=(8001, 8002, 8003)) as epp:
        assert pick(epp) == ranked(8002, 8003, 8001)


def test_no_fallbacks_is_one_endpoint():
    with start(0) as epp:
        assert pick(epp) == key(8002)


def test_a_request_without_body_gets_distinct_random_endpoints(two_fallbacks):
    hdrs = {":method": "GET", ":path": "/v1/models"}
    with grpc.insecure_channel(two_fallbacks.target) as ch:
        (out,) = list(stub_for(ch)(iter([headers_msg(hdrs, eos=True)]), timeout=5))
    dest = set_headers_of(out.request_headers.response)["x-gateway-destination-endpoint"]
    assert lb_metadata_of(out) == dest
    keys = dest.split(",")
    assert len(keys) == 3 and len(set(keys)) == 3 and set(keys) <= {key(p) for p in PORTS}

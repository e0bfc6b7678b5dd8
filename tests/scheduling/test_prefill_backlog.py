"""Prefill backlog: booked at PreRequest, released once at the first generated token or at the end;
prefill-backlog-scorer turns it into scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sched_helpers import cands, cycle, make, request

from epp.config.loader import load_config
from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.pool import EndpointPool
from epp.framework.params import ParameterError
from epp.framework.scheduling import ProfileResult, SchedulingResult
from epp.framework.types import InferenceResponse
from epp.requestcontrol.director import Director
from plugins.requestcontrol.data import PREFILL_BACKLOG_KEY, PREFIX_CACHE_MATCH_INFO_KEY, InFlightLoad, PrefixCacheMatchInfo
from plugins.requestcontrol.inflight import carries_generated_text

CONFIG = Path(__file__).resolve().parents[2] / "config" / "ttft-aware.yaml"
ROLE = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
TOKEN = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}\n\n'


def result(*targets):
    return SchedulingResult({"default": ProfileResult(list(targets))}, "default")


def backlog(p, n=2):
    cs = cands(n)
    p.produce(cycle(), request(), cs)
    return [c.data[PREFILL_BACKLOG_KEY] for c in cs]


@pytest.mark.parametrize("chunk, expected", [
    (ROLE, False),
    (TOKEN, True),
    (ROLE + TOKEN, True),  # role and first token in one body chunk
    (b'data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}\n\n', True),
    (b'data: {"choices":[{"index":0,"text":"","finish_reason":null}]}\n\n', False),
    (b'{"choices":[{"message":{"role":"assistant","content": "whole answer"}}]}', True),
    (b'{"delta":{"content":null}}', False),
    (b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\ndata: [DONE]\n\n', False),
    (b'"content":', False),  # marker at the very end of a chunk
    (b'', False),
])
def test_first_token_detection(chunk: bytes, expected: bool) -> None:
    assert carries_generated_text(chunk) is expected


def test_backlog_drops_at_first_token_and_is_released_once() -> None:
    p = make("prefill-backlog-producer")
    cs = cands(2)
    r1, r2 = request(rid="1", prefix=b"x" * 400), request(rid="2", prefix=b"y" * 40)  # 100 and 10 tokens
    cs[0].data[PREFIX_CACHE_MATCH_INFO_KEY] = PrefixCacheMatchInfo(5, 10, 16)  # 80 tokens of r1 cached
    p.pre_request(r1, result(cs[0]))
    del cs[0].data[PREFIX_CACHE_MATCH_INFO_KEY]
    p.pre_request(r2, result(cs[0]))
    assert backlog(p) == [InFlightLoad(2, 30), InFlightLoad(0, 0)]
    resp = InferenceResponse("1", streaming=True)
    p.response_streaming(r1, resp, ROLE, cs[0].key)  # role-only chunk: still prefilling
    assert backlog(p) == [InFlightLoad(2, 30), InFlightLoad(0, 0)]
    p.response_streaming(r1, resp, TOKEN, cs[0].key)
    assert backlog(p) == [InFlightLoad(1, 10), InFlightLoad(0, 0)]
    p.response_streaming(r1, resp, TOKEN, cs[0].key)  # later tokens change nothing
    p.response_complete(r1, resp, cs[0].key)  # nor does the completion of a released request
    assert backlog(p) == [InFlightLoad(1, 10), InFlightLoad(0, 0)]
    p.response_complete(r2, InferenceResponse("2", outcome="client-disconnect"), cs[0].key)  # no token ever
    assert backlog(p) == [InFlightLoad(0, 0), InFlightLoad(0, 0)]
    assert p.tracker.in_flight() == 0


def test_director_releases_the_backlog_at_the_first_streamed_token() -> None:
    """Through the real loader and director: the config's producer sees every response chunk."""
    config = load_config(CONFIG.read_text())
    producer = next(p for p in config.producers if p.plugin_type == "prefill-backlog-producer")
    assert producer in config.response_streaming
    pool = EndpointPool("test")
    pool.sync([EndpointMetadata("127.0.0.1", 8001), EndpointMetadata("127.0.0.1", 8002)])
    director = Director(config, pool)
    prompt = "p" * 4000
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}).encode()
    ctx = director.handle_request({":path": "/v1/chat/completions", "content-type": "application/json"}, body)
    booked = producer.tracker.tokens(ctx.target)
    assert booked >= 1000
    ctx.response_headers({":status": "200", "content-type": "text/event-stream"})
    assert ctx.wants_response_body()
    ctx.response_chunk(ROLE, False)
    assert producer.tracker.tokens(ctx.target) == booked
    ctx.response_chunk(TOKEN, False)
    assert producer.tracker.tokens(ctx.target) == 0 and producer.tracker.in_flight() == 0
    ctx.response_chunk(b"data: [DONE]\n\n", True)
    assert producer.tracker.in_flight() == 0


def scores(params, backlogs):
    s = make("prefill-backlog-scorer", params)
    cs = cands(len(backlogs))
    for c, b in zip(cs, backlogs):
        c.data[PREFILL_BACKLOG_KEY] = InFlightLoad(1 if b else 0, b)
    return list(s.score(cycle(), request(), cs))


def test_minmax_scores_by_hand() -> None:
    assert scores(None, [0, 1000, 4000]) == [1.0, 0.75, 0.0]
    assert scores(None, [500, 500]) == [1.0, 1.0]
    assert scores({"normalization": "threshold", "thresholdTokens": 2000}, [0, 500, 2000, 9000]) == [1.0, 0.75, 0.0, 0.0]


def test_include_request_adds_the_uncached_prompt_per_candidate() -> None:
    s = make("prefill-backlog-scorer", {"includeRequest": True})
    cs = cands(2)
    cs[0].data[PREFILL_BACKLOG_KEY] = InFlightLoad(1, 100)  # busy, but holds the prompt's prefix
    cs[0].data[PREFIX_CACHE_MATCH_INFO_KEY] = PrefixCacheMatchInfo(10, 12, 16)  # 160 of 200 tokens cached
    cs[1].data[PREFILL_BACKLOG_KEY] = InFlightLoad(0, 0)
    req = request(prefix=b"q" * 800)  # 200 tokens
    assert s.backlogs(req, cs) == [140, 200]
    assert list(s.score(cycle(), req, cs)) == [1.0, 0.0]


@pytest.mark.parametrize("params, word", [({"normalization": "linear"}, "normalization"),
                                          ({"thresholdTokens": 0}, "thresholdTokens")])
def test_bad_params_are_named(params, word) -> None:
    with pytest.raises(ParameterError, match=word):
        make("prefill-backlog-scorer", params)


@given(st.lists(st.integers(min_value=0, max_value=1 << 22), min_size=1, max_size=16),
       st.sampled_from(["minmax", "threshold"]), st.integers(min_value=1, max_value=1 << 20))
def test_scores_are_bounded_and_monotone(backlogs, normalization, threshold) -> None:
    out = scores({"normalization": normalization, "thresholdTokens": threshold}, backlogs)
    assert all(0.0 <= s <= 1.0 for s in out)
    for (b1, s1) in zip(backlogs, out):
        for (b2, s2) in zip(backlogs, out):
            if b1 < b2:
                assert s1 >= s2
            if b1 == b2:
                assert s1 == s2

"""The ext_proc protocol over a real gRPC channel, message by message, in every body mode."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from extproc_support import (
    REQ_HEADERS,
    EppThread,
    Mode,
    Recorder,
    body_msg,
    completion_body,
    headers_msg,
    lb_metadata_of,
    make_config,
    make_pool,
    new_director,
    set_headers_of,
    stub_for,
    trailers_msg,
)

from epp.config.model import ModelRewrite, ModelRewriteTarget
from epp.extproc.stream import StreamSettings
from epp.observability import metrics as m


def converse(epp: EppThread, messages, timeout: float = 5.0):
    """Send ``messages`` on one stream (then half-close) and collect every answer."""
    with grpc.insecure_channel(epp.target) as ch:
        return list(stub_for(ch)(iter(messages), timeout=timeout))


class Conversation:
    """A stream driven step by step: send, then read exactly the answers expected."""

    def __init__(self, epp: EppThread, timeout: float = 5.0) -> None:
        self.ch = grpc.insecure_channel(epp.target)
        self._out: list = []
        self._cond = threading.Condition()
        self._closed = False
        self.call = stub_for(self.ch)(self._requests(), timeout=timeout)

    def _requests(self):
        while True:
            with self._cond:
                while not self._out and not self._closed:
                    self._cond.wait()
                if not self._out:
                    return
                msg = self._out.pop(0)
            yield msg

    def send(self, *msgs) -> None:
        with self._cond:
            self._out.extend(msgs)
            self._cond.notify()

    def recv(self, n: int) -> list:
        return [next(self.call) for _ in range(n)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.ch.close()


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def epp(recorder):
    director = new_director(make_config(recorder=recorder))
    with EppThread(director) as e:
        yield e


def duplex_request(body: bytes, headers=None, **kw):
    return [headers_msg(headers or REQ_HEADERS, **kw), body_msg(body, False), body_msg(b"", True)]


def test_duplex_request_and_response_lifecycle(epp, recorder):
    body = completion_body()
    conv = Conversation(epp)
    try:
        conv.send(*duplex_request(body))
        hdr, echoed = conv.recv(2)
        common = hdr.request_headers.response
        assert common.clear_route_cache
        dest = set_headers_of(common)["x-gateway-destination-endpoint"]
        assert dest in {"10.0.0.1:8001", "10.0.0.1:8002", "10.0.0.1:8003"}
        assert lb_metadata_of(hdr) == dest
        assert "content-length" not in set_headers_of(common)  # body unchanged
        sr = echoed.request_body.response.body_mutation.streamed_response
        assert sr.body == body and sr.end_of_stream
        assert epp.director.in_flight == 1

        conv.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
        (rh,) = conv.recv(1)
        assert set_headers_of(rh.response_headers.response)["x-session-token"] == f"tok-{dest}"
        payload = json.dumps({"model": "m1", "usage": {"prompt_tokens": 3, "completion_tokens": 5}}).encode()
        conv.send(body_msg(payload[:10], False, response=True), body_msg(payload[10:], False, response=True),
                  body_msg(b"", True, response=True))
        chunks = conv.recv(3)
        got = [c.response_body.response.body_mutation.streamed_response for c in chunks]
        assert b"".join(g.body for g in got) == payload
        assert [g.end_of_stream for g in got] == [False, False, True]
    finally:
        conv.close()
    assert epp.wait_idle()
    assert epp.director.in_flight == 0
    (complete,) = recorder.of("complete")
    assert complete[1] == "r1"
    outcome, usage = complete[2]
    assert outcome == "complete" and usage.prompt_tokens == 3 and usage.completion_tokens == 5
    assert [e[0] for e in recorder.events] == ["pre", "received", "complete"]


def test_client_x_gateway_destination_is_overwritten(epp):
    headers = dict(REQ_HEADERS, **{"x-gateway-destination-endpoint": "6.6.6.6:1"})
    out = converse(epp, duplex_request(completion_body(), headers))
    opts = out[0].request_headers.response.header_mutation.set_headers
    dest = [o for o in opts if o.header.key == "x-gateway-destination-endpoint"]
    assert len(dest) == 1 and dest[0].header.raw_value != b"6.6.6.6:1"
    assert dest[0].append_action == dest[0].OVERWRITE_IF_EXISTS_OR_ADD


def test_buffered_request_mode_picks_in_body_answer(epp):
    body = completion_body()
    out = converse(epp, [headers_msg(REQ_HEADERS, req_mode=Mode.BUFFERED, resp_mode=Mode.NONE), body_msg(body, True)])
    assert len(out) == 2
    assert out[0].HasField("request_headers") and not out[0].request_headers.HasField("response")
    common = out[1].request_body.response
    dest = set_headers_of(common)["x-gateway-destination-endpoint"]
    assert common.clear_route_cache and lb_metadata_of(out[1]) == dest
    assert not common.HasField("body_mutation")  # untouched: Envoy keeps Content-Length


def test_large_body_is_echoed_in_bounded_chunks(epp):
    body = completion_body(prompt="x" * 200_000)
    out = converse(epp, [headers_msg(REQ_HEADERS)] + [body_msg(body[i:i + 30000], False)
                                                       for i in range(0, len(body), 30000)] + [body_msg(b"", True)])
    chunks = [o.request_body.response.body_mutation.streamed_response for o in out[1:]]
    assert all(len(c.body) <= 62000 for c in chunks)
    assert b"".join(c.body for c in chunks) == body
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_header_rewrite_changes_body_and_is_reversed_in_response(epp):
    headers = dict(REQ_HEADERS, **{"x-gateway-model-name-rewrite": "big-model"})
    conv = Conversation(epp)
    try:
        conv.send(*duplex_request(completion_body(model="alias"), headers))
        hdr, echoed = conv.recv(2)
        new_body = echoed.request_body.response.body_mutation.streamed_response.body
        assert json.loads(new_body) == {"model": "big-model", "prompt": "hello"}
        assert set_headers_of(hdr.request_headers.response)["content-length"] == str(len(new_body))
        conv.send(headers_msg({":status": "200"}, response=True))
        conv.recv(1)
        conv.send(body_msg(b'{"id":"1","model":"big-model","x":1}', True, response=True))
        (resp,) = conv.recv(1)
        assert resp.response_body.response.body_mutation.streamed_response.body == b'{"id":"1","model":"alias","x":1}'
    finally:
        conv.close()


def test_configured_weighted_rewrite():
    rw = {"r1": ModelRewrite("alias", (ModelRewriteTarget("a", 0), ModelRewriteTarget("b", 5)))}
    director = new_director(make_config(rewrites=rw))
    with EppThread(director) as epp:
        out = converse(epp, duplex_request(completion_body(model="alias")))
    assert json.loads(out[1].request_body.response.body_mutation.streamed_response.body)["model"] == "b"


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "inference error: BadRequest - error unmarshaling request body"),
    (b'{"prompt": "no model"}', "inference error: BadRequest - model not found in request body"),
])
def test_bad_body_gets_400(epp, body, needle):
    before = m.REQUEST_ERROR_TOTAL.labels("", "", "BadRequest")._value.get()
    (out,) = converse(epp, duplex_request(body))
    imm = out.immediate_response
    assert imm.status.code == 400 and imm.body.decode().startswith(needle)
    assert m.REQUEST_ERROR_TOTAL.labels("", "", "BadRequest")._value.get() == before + 1


def test_no_endpoints_gets_503():
    with EppThread(new_director(pool=make_pool())) as epp:
        (out,) = converse(epp, duplex_request(completion_body()))
    assert out.immediate_response.status.code == 503
    assert out.immediate_response.body == (b"inference error: ServiceUnavailable - "
                                           b"failed to find endpoint candidates for serving the request")


@pytest.mark.parametrize("hint,expected", [
    (["10.0.0.1:8002"], {"10.0.0.1:8002"}),
    ("10.0.0.1:8003, 10.0.0.1:8001", {"10.0.0.1:8001", "10.0.0.1:8003"}),
    (["10.0.0.1"], {"10.0.0.1:8001", "10.0.0.1:8002", "10.0.0.1:8003"}),
])
def test_subset_hint_restricts_candidates(epp, hint, expected):
    md = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": hint}}
    seen = set()
    for _ in range(12):
        out = converse(epp, duplex_request(completion_body(), metadata=md))
        seen.add(set_headers_of(out[0].request_headers.response)["x-gateway-destination-endpoint"])
    assert seen <= expected and seen


@pytest.mark.parametrize("hint", [[], ["10.0.0.9:8001"], "10.0.0.1:9999"])
def test_empty_or_unmatched_subset_gets_503(epp, hint):
    md = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": hint}}
    (out,) = converse(epp, duplex_request(completion_body(), metadata=md))
    assert out.immediate_response.status.code == 503


def test_body_over_limit_gets_413():
    with EppThread(new_director(), StreamSettings(max_body_bytes=1000)) as epp:
        out = converse(epp, [headers_msg(REQ_HEADERS), body_msg(b"x" * 600, False), body_msg(b"x" * 600, False)])
    assert out[-1].immediate_response.status.code == 413
    assert b"RequestTooLarge" in out[-1].immediate_response.body


def test_incomplete_body_times_out_with_504():
    with EppThread(new_director(), StreamSettings(request_timeout=0.3)) as epp:
        conv = Conversation(epp)
        try:
            t0 = time.monotonic()
            conv.send(headers_msg(REQ_HEADERS), body_msg(b'{"model":', False))
            (out,) = conv.recv(1)
            waited = time.monotonic() - t0
        finally:
            conv.close()
        assert epp.wait_idle()
    assert out.immediate_response.status.code == 504
    assert out.immediate_response.body.startswith(b"inference error: DeadlineExceeded - ")
    assert waited >= 0.25


def test_client_disconnect_mid_response_completes_once(epp, recorder):
    conv = Conversation(epp)
    conv.send(*duplex_request(completion_body(stream=True)))
    conv.recv(2)
    conv.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True),
              body_msg(b"data: {}\n\n", False, response=True))
    conv.recv(2)
    assert epp.director.in_flight == 1
    conv.call.cancel()
    conv.close()
    assert epp.wait_idle()
    assert epp.director.in_flight == 0
    (complete,) = recorder.of("complete")
    assert complete[2][0] == "client-disconnect"


def test_header_only_request_is_routed_in_headers_answer(epp, recorder):
    (out,) = converse(epp, [headers_msg({":method": "GET", ":path": "/v1/models"}, eos=True)])
    common = out.request_headers.response
    dest = set_headers_of(common)["x-gateway-destination-endpoint"]
    assert dest.startswith("10.0.0.1:") and lb_metadata_of(out) == dest and common.clear_route_cache
    assert recorder.events == []  # nothing scheduled, no hooks


def test_request_trailers_end_the_body_in_duplex(epp):
    body = completion_body()
    out = converse(epp, [headers_msg(REQ_HEADERS), body_msg(body, False), trailers_msg()])
    assert out[0].HasField("request_headers")
    sr = out[1].request_body.response.body_mutation.streamed_response
    assert sr.body == body and not sr.end_of_stream  # the trailers end the stream
    assert out[2].HasField("request_trailers")


def test_sheddable_request_is_shed_only_when_saturated():
    headers = dict(REQ_HEADERS, **{"x-gateway-inference-objective": "batch"})
    for saturation, expect_shed in ((2.0, True), (0.1, False)):
        director = new_director(make_config(saturation=saturation, objectives={"batch": -1}))
        with EppThread(director) as epp:
            out = converse(epp, duplex_request(completion_body(), headers))
        if expect_shed:
            assert out[0].immediate_response.status.code == 429
            assert out[0].immediate_response.body.endswith(b"system saturated, sheddable request dropped")
        else:
            assert out[0].HasField("request_headers")
    # Critical (priority >= 0) requests are never shed, whatever the saturation.
    with EppThread(new_director(make_config(saturation=5.0))) as epp:
        assert converse(epp, duplex_request(completion_body()))[0].HasField("request_headers")


def test_scheduling_failure_gets_429(epp):
    headers = dict(REQ_HEADERS, **{"test-only": "1.2.3.4:1"})  # the test filter removes everything
    (out,) = converse(epp, duplex_request(completion_body(), headers))
    assert out.immediate_response.status.code == 429
    assert out.immediate_response.body.startswith(b"inference error: ResourceExhausted - failed to find target endpoint: ")


def test_admitter_denial_uses_its_status(epp):
    (out,) = converse(epp, duplex_request(completion_body(), dict(REQ_HEADERS, **{"test-deny": "1"})))
    assert out.immediate_response.status.code == 403
    assert out.immediate_response.body == b"inference error: Forbidden - denied by test"


def test_scorer_decides_the_pick():
    with EppThread(new_director(make_config(prefer_port=8002))) as epp:
        for _ in range(3):
            out = converse(epp, duplex_request(completion_body()))
            assert set_headers_of(out[0].request_headers.response)["x-gateway-destination-endpoint"] == "10.0.0.1:8002"


def test_debug_header_explains_the_decision():
    director = new_director(make_config(prefer_port=8001), enable_debug_headers=True)
    with EppThread(director) as epp:
        conv = Conversation(epp)
        try:
            conv.send(*duplex_request(completion_body(), dict(REQ_HEADERS, **{"x-epp-debug": "1"})))
            conv.recv(2)
            conv.send(headers_msg({":status": "200"}, response=True))
            (rh,) = conv.recv(1)
        finally:
            conv.close()
        value = set_headers_of(rh.response_headers.response)["x-epp-decision"]
        assert value.startswith("pick=10.0.0.1:8001; candidates=3")
        assert "10.0.0.1:8001 total=2.000 [prefer-port:1.000->2.000]" in value
        assert "10.0.0.1:8002 total=1.000 [prefer-port:0.500->1.000]" in value
        # and without the request header: nothing
        out = converse(epp, duplex_request(completion_body()) + [headers_msg({":status": "200"}, response=True)])
        assert "x-epp-decision" not in set_headers_of(out[-1].response_headers.response)
    decisions = director.decisions.as_json()
    assert decisions[0]["pick"] == "10.0.0.1:8001"
    cand = decisions[0]["profiles"]["default"]["candidates"][0]
    assert cand == {"endpoint": "10.0.0.1:8001", "total": 2.0, "scorers": {"prefer-port": {"raw": 1.0, "weighted": 2.0}}}


def test_body_mode_override_when_policy_skips_streamed_bodies(recorder):
    director = new_director(make_config(recorder=recorder), response_body_policy="non-streaming")
    with EppThread(director) as epp:
        conv = Conversation(epp)
        try:
            conv.send(headers_msg(REQ_HEADERS, req_mode=Mode.BUFFERED, resp_mode=Mode.STREAMED),
                      body_msg(completion_body(stream=True), True))
            conv.recv(2)
            conv.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
            (rh,) = conv.recv(1)
            assert rh.mode_override.response_body_mode == Mode.NONE
            assert director.in_flight == 1
        finally:
            conv.call.cancel()  # Envoy resets the stream when the HTTP response ends
            conv.close()
        assert epp.wait_idle()
    assert director.in_flight == 0
    assert recorder.of("complete")[0][2][0] == "complete"


def test_streamed_response_mode_acks_chunks(epp):
    conv = Conversation(epp)
    try:
        conv.send(headers_msg(REQ_HEADERS, req_mode=Mode.BUFFERED, resp_mode=Mode.STREAMED),
                  body_msg(completion_body(), True))
        conv.recv(2)
        conv.send(headers_msg({":status": "200"}, response=True), body_msg(b"abc", False, response=True),
                  body_msg(b"", True, response=True))
        rh, b1, b2 = conv.recv(3)
        assert b1.HasField("response_body") and not b1.response_body.response.HasField("body_mutation")
        assert b2.HasField("response_body")
    finally:
        conv.close()
    assert epp.wait_idle() and epp.director.in_flight == 0


@pytest.mark.parametrize("messages", [
    [body_msg(b"{}", True)],  # body before headers
    [headers_msg(REQ_HEADERS), headers_msg(REQ_HEADERS)],  # duplicated headers
    [headers_msg({":status": "200"}, response=True)],  # response before request
])
def test_out_of_order_messages_get_500_not_a_crash(epp, messages):
    out = converse(epp, messages)
    assert out[-1].immediate_response.status.code == 500
    assert b"unexpected ext_proc message" in out[-1].immediate_response.body
    # and the server still works
    assert converse(epp, duplex_request(completion_body()))[0].HasField("request_headers")


def test_completion_on_duplicate_response_eos_is_still_once(epp, recorder):
    msgs = duplex_request(completion_body()) + [
        headers_msg({":status": "200"}, response=True), body_msg(b"{}", True, response=True),
        body_msg(b"{}", True, response=True)]
    out = converse(epp, msgs)
    assert out[-1].immediate_response.status.code == 500
    assert epp.wait_idle()
    assert len(recorder.of("complete")) == 1 and epp.director.in_flight == 0


def test_running_requests_gauge_returns_to_zero(epp):
    gauge = m.RUNNING_REQUESTS.labels("gauge-model")
    conv = Conversation(epp)
    conv.send(*duplex_request(completion_body(model="gauge-model")))
    conv.recv(2)
    assert gauge._value.get() == 1
    conv.call.cancel()
    conv.close()
    assert epp.wait_idle()
    assert gauge._value.get() == 0

"""The unreachable-endpoint detector through a real gRPC channel, fed the response-path messages
Envoy 1.40 sends (captured from envoy/envoy.yaml with response_attributes, and without them)."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from epp_configs import RANDOM_PICKER
from extproc_support import REQ_HEADERS, EppThread, body_msg, completion_body, headers_msg, make_pool, \
    set_headers_of, stub_for

from epp.config.loader import load_config
from epp.observability.metrics import REGISTRY
from epp.requestcontrol.director import Director, DirectorOptions

CONFIG = RANDOM_PICKER

# What Envoy 1.40 sends when the connection to the picked endpoint is refused.
LOCAL_REPLY = {":status": "503", "content-length": "98", "content-type": "text/plain"}
REFUSED = {"response.flags": 32, "response.code": 503,
           "response.code_details": "upstream_reset_before_response_started{remote_connection_failure|"
                                    "delayed_connect_error:_Connection_refused}"}
OVERFLOW = {"response.flags": 128, "response.code": 503,
            "response.code_details": "upstream_reset_before_response_started{overflow}"}
# A model server's own 503, as the router forwards it.
SERVER_503 = {":status": "503", "content-type": "application/json", "date": "Sun, 06 Dec 2026 04:32:26 GMT",
              "x-envoy-upstream-service-time": "3"}


def exchange(epp: EppThread, response_headers: dict[str, str], attributes: dict[str, Any] | None = None,
             served: str | None = None) -> str:
    """One request through the EPP; the proxy's answer is ``response_headers``. Returns the pick."""
    with grpc.insecure_channel(epp.target) as channel:
        call = stub_for(channel)
        picked: list[str] = []

        def messages():
            yield headers_msg(REQ_HEADERS)
            yield body_msg(completion_body(), True)
            while not picked:  # wait for the pick to name the endpoint the proxy "tried"
                time.sleep(0.001)
            resp = headers_msg(response_headers, response=True,
                               metadata={"envoy.lb": {"x-gateway-destination-endpoint": picked[0]}})
            if attributes is not None:
                attrs = dict(attributes)
                attrs.setdefault("upstream.address", served or picked[0])
                resp.attributes["envoy.filters.http.ext_proc"].update(attrs)
            yield resp
            yield body_msg(b"upstream connect error or disconnect/reset before headers. reset reason: "
                           b"remote connection failure", True, response=True)

        for answer in call(messages(), timeout=10):
            if answer.WhichOneof("response") == "request_headers":
                picked.append(set_headers_of(answer.request_headers.response)["x-gateway-destination-endpoint"])
    return picked[0]


def exclusions(endpoint: str) -> float:
    return REGISTRY.get_sample_value("epp_endpoint_exclusions_total", {
        "name": "test-pool", "endpoint": endpoint, "reason": "proxy-connect-failure"}) or 0.0


@pytest.fixture()
def epp():
    pool = make_pool(8001, 8002, 8003, host="10.0.14.1")
    director = Director(load_config(CONFIG, pool=pool), pool, DirectorOptions())
    with EppThread(director) as server:
        yield server


def schedulable_keys(epp: EppThread) -> set[str]:
    return {ep.key for ep in epp.director.pool.schedulable()}


def test_a_local_reply_without_attributes_excludes_the_pick_at_once(epp):
    before = {key: exclusions(key) for key in schedulable_keys(epp)}
    picked = exchange(epp, LOCAL_REPLY)
    assert picked not in schedulable_keys(epp) and len(schedulable_keys(epp)) == 2
    assert exclusions(picked) == before[picked] + 1
    for _ in range(10):  # nothing is scheduled there any more
        assert exchange(epp, {":status": "200", "date": "x"}) != picked
    assert epp.wait_idle() and epp.director.in_flight == 0


def test_attributes_name_the_endpoint_the_proxy_tried(epp):
    served = "10.0.14.1:8003"
    exchange(epp, LOCAL_REPLY, REFUSED, served=served)
    assert schedulable_keys(epp) == {"10.0.14.1:8001", "10.0.14.1:8002"}


@pytest.mark.parametrize("headers,attributes", [
    (SERVER_503, None),  # the model server's own 503
    (SERVER_503, {"response.flags": 0, "response.code": 503, "response.code_details": "via_upstream"}),
    ({**LOCAL_REPLY, "x-envoy-overloaded": "true"}, None),  # circuit breaker: the proxy is busy
    (LOCAL_REPLY, OVERFLOW),
    ({":status": "504", "content-type": "text/plain"}, None),  # upstream request timeout
    ({":status": "200", "content-type": "application/json"}, None),
])
def test_answers_that_do_not_mean_unreachable_exclude_nothing(epp, headers, attributes):
    exchange(epp, headers, attributes)
    assert len(schedulable_keys(epp)) == 3


def test_it_can_be_turned_off():
    pool = make_pool(8001, 8002, host="10.0.14.2")
    config = load_config(CONFIG.replace("- type: random-picker\nschedulingProfiles",
                                        "- type: random-picker\n- type: unreachable-endpoint-detector\n"
                                        "  parameters: {enabled: false}\nschedulingProfiles"), pool=pool)
    assert [p.plugin_type for p in config.response_received] == ["unreachable-endpoint-detector"]
    with EppThread(Director(config, pool, DirectorOptions())) as epp:
        exchange(epp, LOCAL_REPLY)
        assert len(schedulable_keys(epp)) == 2

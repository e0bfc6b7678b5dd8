"""Upstream's conformance config (example C) through a real gRPC channel: the served-endpoint
verifier copies the proxy's response-path metadata into a response header, or says what is missing."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from extproc_support import REQ_HEADERS, EppThread, body_msg, completion_body, headers_msg, make_pool, \
    set_headers_of, stub_for

from epp.config.loader import load_config
from epp.requestcontrol.director import Director, DirectorOptions

EXAMPLE_C = Path(__file__).parents[1] / "config" / "testdata" / "example-c-conformance.yaml"
RESULT = "x-conformance-test-served-endpoint"


@pytest.fixture(scope="module")
def epp():
    pool = make_pool(3000, host="10.0.3.2")
    director = Director(load_config(path=str(EXAMPLE_C), pool=pool), pool, DirectorOptions())
    with EppThread(director) as server:
        yield server


def _served_header(epp: EppThread, metadata: dict | None) -> str:
    request = {**REQ_HEADERS, "test-epp-endpoint-selection": "10.0.3.2:3000"}
    messages = [headers_msg(request), body_msg(completion_body(), True),
                headers_msg({":status": "200", "content-type": "application/json"}, response=True, metadata=metadata),
                body_msg(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}', True, response=True)]
    with grpc.insecure_channel(epp.target) as channel:
        answers = list(stub_for(channel)(iter(messages), timeout=10))
    kinds = [a.WhichOneof("response") for a in answers]
    response_headers = answers[kinds.index("response_headers")].response_headers.response
    return set_headers_of(response_headers)[RESULT]


def test_served_endpoint_is_copied_into_the_response(epp):
    lb = {"envoy.lb": {"x-gateway-destination-endpoint-served": "10.0.3.2:3000"}}
    assert _served_header(epp, lb) == "10.0.3.2:3000"


def test_missing_metadata_is_named(epp):
    assert _served_header(epp, None) == "fail: missing envoy lb metadata"
    assert _served_header(epp, {"envoy.lb": {"other": "x"}}) == "fail: missing destination endpoint served metadata"
    assert epp.wait_idle() and epp.director.in_flight == 0

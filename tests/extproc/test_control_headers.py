"""Upstream's control headers under their new (x-llm-d-*) and legacy names, over a real gRPC
channel: the new name wins, both are read, and none reaches the model server."""

from __future__ import annotations

import json

import grpc
import pytest
from extproc_support import REQ_HEADERS, EppThread, body_msg, completion_body, headers_msg, make_config, \
    new_director, stub_for

from epp.framework.headers import CONTROL_HEADERS
from epp.framework.types import InferenceRequest


def _route(epp: EppThread, headers: dict[str, str], body: bytes | None = None) -> list:
    msgs = [headers_msg(dict(REQ_HEADERS, **headers)), body_msg(body or completion_body(), True)]
    with grpc.insecure_channel(epp.target) as ch:
        return list(stub_for(ch)(iter(msgs), timeout=5))


class SeenRequests:
    """A flow gate that lets everything through and keeps what the Director filled in."""

    def __init__(self) -> None:
        self.requests: list[InferenceRequest] = []

    waited = False
    queue_time = 0.0

    async def wait_for_dispatch(self, request: InferenceRequest) -> "SeenRequests":
        self.requests.append(request)
        return self  # a ticket that is never queued

    def scheduled(self, targets) -> None:
        pass

    def finish(self) -> None:
        pass


@pytest.mark.parametrize("headers,objective,fairness,ttft,tpot", [
    ({}, "", "default-flow", 0.0, 0.0),
    ({"x-gateway-inference-objective": "batch", "x-gateway-inference-fairness-id": "tenant-a",
      "x-slo-ttft-ms": "250", "x-slo-tpot-ms": "20.5"}, "batch", "tenant-a", 250.0, 20.5),
    ({"x-llm-d-inference-objective": "chat", "x-llm-d-inference-fairness-id": "tenant-b",
      "x-llm-d-slo-ttft-ms": "100", "x-llm-d-slo-tpot-ms": "nonsense"}, "chat", "tenant-b", 100.0, 0.0),
    # Both names: the new one wins.
    ({"x-llm-d-inference-objective": "chat", "x-gateway-inference-objective": "batch",
      "x-llm-d-inference-fairness-id": "new", "x-gateway-inference-fairness-id": "old",
      "x-llm-d-slo-ttft-ms": "5", "x-slo-ttft-ms": "9", "x-slo-tpot-ms": "-3"}, "chat", "new", 5.0, 0.0),
])
def test_control_headers_fill_the_request(headers, objective, fairness, ttft, tpot):
    director = new_director(make_config(objectives={"batch": -1, "chat": 7}))
    seen = SeenRequests()
    director.set_flow_gate(seen)
    with EppThread(director) as epp:
        out = _route(epp, headers)
    assert out[0].HasField("request_headers")
    (req,) = seen.requests
    assert (req.objective, req.fairness_id, req.slo_ttft_ms, req.slo_tpot_ms) == (objective, fairness, ttft, tpot)
    assert req.priority == {"batch": -1, "chat": 7}.get(objective, 0)


def test_every_control_header_is_removed_before_routing():
    all_of_them = {name: "x" for name in CONTROL_HEADERS}
    with EppThread(new_director()) as epp:
        plain = _route(epp, {})
        stripped = _route(epp, dict(all_of_them, **{"x-llm-d-model-name-rewrite": "m1",
                                                    "x-gateway-model-name-rewrite": "m1"}))
    assert list(plain[0].request_headers.response.header_mutation.remove_headers) == []
    removed = stripped[0].request_headers.response.header_mutation.remove_headers
    assert sorted(removed) == sorted(CONTROL_HEADERS)


def test_legacy_objective_still_sheds():
    director = new_director(make_config(saturation=2.0, objectives={"batch": -1}))
    with EppThread(director) as epp:
        for name in ("x-llm-d-inference-objective", "x-gateway-inference-objective"):
            (out,) = _route(epp, {name: "batch"})
            assert out.immediate_response.status.code == 429


@pytest.mark.parametrize("headers,model", [
    ({"x-gateway-model-name-rewrite": "old-target"}, "old-target"),
    ({"x-llm-d-model-name-rewrite": "new-target"}, "new-target"),
    ({"x-llm-d-model-name-rewrite": "new-target", "x-gateway-model-name-rewrite": "old-target"}, "new-target"),
])
def test_model_rewrite_header_under_both_names(headers, model):
    with EppThread(new_director()) as epp:
        out = _route(epp, headers, completion_body(model="alias"))
    assert json.loads(out[1].request_body.response.body_mutation.streamed_response.body)["model"] == model

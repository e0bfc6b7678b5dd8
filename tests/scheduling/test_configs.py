"""Upstream example configs (§2.8) and the built-in default, loaded with the real loader and run
through the request path (parse -> producers -> scheduler -> pre-request hooks)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from sched_helpers import endpoint

from epp.config import load_config
from epp.config.model import LoadedConfig
from epp.framework.scheduling import CycleState, SchedulingResult
from epp.framework.types import Candidate
from epp.scheduling import Scheduler, SchedulingError

EXAMPLES = Path(__file__).parent.parent / "config" / "testdata"
CHAT = {":path": "/v1/chat/completions"}


def chat_body(text: str, model: str = "m") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()


def decide(cfg: LoadedConfig, eps, body: bytes, headers: dict[str, str]) -> tuple[SchedulingResult, object]:
    """What the director does for one request (the parts this package owns)."""
    req = cfg.parser.parse_request(body, headers)
    candidates = [Candidate(e) for e in eps]
    cycle = CycleState()
    for p in cfg.producers:
        p.produce(cycle, req, candidates)
    result = Scheduler(cfg.profile_handler, cfg.profiles).schedule(req, candidates, cycle)
    for hook in cfg.pre_request:
        hook.pre_request(req, result)
    return result, req


def test_default_config_schedules_by_load_and_prefix() -> None:
    cfg = load_config()
    busy = endpoint("10.0.0.1", waiting_queue_size=9, kv_cache_usage=0.9)
    idle = endpoint("10.0.0.2", waiting_queue_size=0, kv_cache_usage=0.1)
    result, _ = decide(cfg, [busy, idle], chat_body("hello " * 100), CHAT)
    assert result.targets[0].key == "10.0.0.2:8000"
    expl = {b.key: b for b in result.primary.breakdown}
    assert expl["10.0.0.2:8000"].scorers["queue-scorer"] == (1.0, 2.0)
    assert expl["10.0.0.2:8000"].scorers["kv-cache-utilization-scorer"] == (pytest.approx(0.9), pytest.approx(1.8))
    # equal load: the endpoint that served the same long prompt wins on prefix (weight 3)
    a, b = endpoint("10.0.0.3"), endpoint("10.0.0.4")
    first, _ = decide(cfg, [a, b], chat_body("shared context " * 200), CHAT)
    again = Counter(decide(cfg, [a, b], chat_body("shared context " * 200), CHAT)[0].targets[0].key for _ in range(10))
    assert again == {first.targets[0].key: 10}


def test_example_a_decode_filter_and_prefix() -> None:
    cfg = load_config(path=str(EXAMPLES / "example-a-llm-d.yaml"))
    prefill = endpoint("10.0.1.1", labels={"llm-d.ai/role": "prefill"})
    decode = endpoint("10.0.1.2", labels={"llm-d.ai/role": "decode"})
    unlabelled = endpoint("10.0.1.3")
    picked = Counter(decide(cfg, [prefill, decode, unlabelled], chat_body(f"q{i}"), CHAT)[0].targets[0].key
                     for i in range(30))
    assert "10.0.1.1:8000" not in picked and set(picked) <= {"10.0.1.2:8000", "10.0.1.3:8000"}


def test_example_b_gaie_default_with_lora() -> None:
    cfg = load_config(path=str(EXAMPLES / "example-b-gaie-default.yaml"))
    with_adapter = endpoint("10.0.2.1", active_models={"ad": 1}, max_active_models=1)
    without = endpoint("10.0.2.2", active_models={"x": 1}, max_active_models=1)
    result, _ = decide(cfg, [without, with_adapter], json.dumps({"model": "ad", "prompt": "hi"}).encode(), {})
    assert result.targets[0].key == "10.0.2.1:8000"


def test_example_c_header_filter() -> None:
    text = (EXAMPLES / "example-c-conformance.yaml").read_text()
    cfg = load_config(text)
    # the served-endpoint verifier is a response hook (tests/extproc/test_served_verifier.py)
    assert [p.plugin_type for p in cfg.response_received] == ["destination-endpoint-served-verifier",
                                                              "unreachable-endpoint-detector"]  # our default
    eps = [endpoint("10.0.3.1", 3000), endpoint("10.0.3.2", 3000), endpoint("10.0.3.3", 3000)]
    for _ in range(10):
        result, _ = decide(cfg, eps, chat_body("x"), {**CHAT, "test-epp-endpoint-selection": "10.0.3.2,10.0.3.3:3000"})
        assert result.targets[0].key in ("10.0.3.2:3000", "10.0.3.3:3000")
    with pytest.raises(SchedulingError, match="no endpoints available"):
        decide(cfg, eps, chat_body("x"), CHAT)  # no header: nothing selected, as upstream


def test_example_d_prefill_decode() -> None:
    cfg = load_config(path=str(EXAMPLES / "example-d-pd.yaml"))
    eps = [endpoint("10.0.4.1", labels={"llm-d.ai/role": "prefill"}),
           endpoint("10.0.4.2", labels={"llm-d.ai/role": "decode"})]
    long_prompt = chat_body("a long question " * 50)  # > 16 uncached tokens: disaggregated
    result, req = decide(cfg, eps, long_prompt, CHAT)
    assert result.primary_profile == "decode" and result.targets[0].key == "10.0.4.2:8000"
    assert result.profile_results["prefill"].targets[0].key == "10.0.4.1:8000"
    assert req.added_headers["x-prefiller-host-port"] == "10.0.4.1:8000"
    short, req = decide(cfg, eps, chat_body("hi"), CHAT)  # too few tokens to be worth a prefill hop
    assert set(short.profile_results) == {"decode"} and "x-prefiller-host-port" not in req.added_headers


STATEFUL = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: active-request-scorer
- type: session-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: active-request-scorer
  - pluginRef: session-affinity-scorer
    weight: 10
saturationDetector:
  pluginRef: concurrency-detector
"""


def test_stateful_plugins_through_a_loaded_config() -> None:
    """Producers are auto-created for consumed data; hooks are wired; in-flight load and the
    session token follow a request's whole life."""
    from epp.framework.types import InferenceResponse

    cfg = load_config(STATEFUL)
    assert [p.plugin_type for p in cfg.producers] == ["inflight-load-producer"]
    eps = [endpoint("10.0.6.1"), endpoint("10.0.6.2")]
    first, req1 = decide(cfg, eps, chat_body("a"), CHAT)
    busy = first.targets[0].key
    # the in-flight request steers the next one to the other endpoint (active-request-scorer)
    second, req2 = decide(cfg, eps, chat_body("b"), CHAT)
    assert second.targets[0].key != busy
    assert cfg.saturation_detector.saturation([Candidate(e) for e in eps]) == 1.0  # 2 in flight / (1 x 2)
    # the response carries a session token; a request presenting it sticks to that endpoint
    resp = InferenceResponse(req1.request_id)
    for hook in cfg.response_received:
        hook.response_received(req1, resp, busy)
    token = resp.added_headers["x-session-token"]
    for hook in cfg.response_complete:
        hook.response_complete(req1, resp, busy)
        hook.response_complete(req2, InferenceResponse(req2.request_id), second.targets[0].key)
    assert cfg.saturation_detector.saturation([Candidate(e) for e in eps]) == 0.0
    for i in range(5):
        sticky, _ = decide(cfg, eps, chat_body(f"c{i}"), {**CHAT, "x-session-token": token})
        assert sticky.targets[0].key == busy

"""Streamed (SSE) answers through a real Envoy in every mode, with real EPP processes.

Modes: ``duplex`` (envoy.yaml), ``buffered`` (envoy-buffered.yaml, response body NONE) and
``efficient`` (envoy-efficient.yaml) with each ``--response-body-policy``. For each: a
256-event answer arrives complete, in order and without being held back; token usage is
recorded exactly where the mode and policy let the EPP read the body; and the EPP's
in-flight accounting (the running-requests gauge and the inflight-load producer, observed
through the active-request scorer in the decision log) returns to zero when the answer
ends or the client leaves mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from dataclasses import dataclass

import aiohttp
import pytest
import yaml

pytestmark = pytest.mark.envoy

# Only this EPP's own in-flight counts decide the pick (the inflight-load producer is created
# automatically for the active-request scorer), so a probe request's decision shows them.
CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: active-request-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: active-request-scorer
  - pluginRef: max-score-picker
"""
SCORER = "active-request-scorer"


@dataclass(frozen=True)
class Mode:
    name: str
    template: str
    policy: str  # the EPP's --response-body-policy
    reads_sse: bool  # token usage of streamed answers is recorded
    reads_json: bool  # token usage of JSON answers is recorded
    sees_end: bool  # the EPP's stream lasts until the HTTP response ends


MODES = {m.name: m for m in (
    Mode("duplex", "envoy.yaml", "non-streaming", True, True, True),
    Mode("buffered", "envoy-buffered.yaml", "non-streaming", False, False, True),
    Mode("efficient-always", "envoy-efficient.yaml", "always", True, True, True),
    Mode("efficient-non-streaming", "envoy-efficient.yaml", "non-streaming", False, True, True),
    Mode("efficient-never", "envoy-efficient.yaml", "never", False, False, True),
)}


@pytest.fixture(scope="module")
def stack(backends, epp_launcher, envoy_launcher):
    """One EPP per policy (started in parallel), one Envoy per mode."""
    epps = {p: epp_launcher(backends.addresses, config_text=CONFIG, wait=False, extra=["--response-body-policy", p])
            for p in sorted({m.policy for m in MODES.values()})}
    for epp in epps.values():
        epp.wait_ready()
    envoys = {m.name: envoy_launcher(m.template, epp_port=epps[m.policy].grpc_port,
                                     fallback_endpoints=backends.addresses)
              for m in MODES.values()}
    return {name: (epps[m.policy], envoys[name]) for name, m in MODES.items()}


# --- observing the EPP ---------------------------------------------------------------------------
def _sample(text: str, metric: str, model: str) -> float | None:
    pattern = re.compile(rf'^{metric}\{{[^}}]*model_name="{re.escape(model)}"[^}}]*\}} (\S+)$', re.M)
    found = pattern.search(text)
    return float(found.group(1)) if found else None


def running(epp, model: str) -> float:
    return _sample(epp.metrics_text(), "inference_objective_running_requests", model) or 0.0


async def eventually(check, timeout: float = 10.0, what: str = ""):
    """Poll ``check()`` (sync, may block briefly) until it returns a truthy value."""
    end = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value or time.monotonic() > end:
            assert value, f"timed out waiting for {what}"
            return value
        await asyncio.sleep(0.05)


async def post(session: aiohttp.ClientSession, url: str, doc: dict) -> tuple[int, bytes]:
    async with session.post(url + "/v1/completions", json=doc) as r:
        return r.status, await r.read()


async def busy_endpoints(session: aiohttp.ClientSession, epp, url: str, probe_model: str) -> dict[str, float]:
    """Send a probe request and return its decision's active-request score per endpoint
    (1.0 = nothing of ours in flight there)."""
    status, _ = await post(session, url, {"model": probe_model, "prompt": "probe"})
    assert status == 200
    decisions = await asyncio.to_thread(epp.get_json, "/debug/decisions?n=20")
    mine = next(d for d in decisions["decisions"] if d["model"] == probe_model)
    cands = mine["profiles"][mine["primary_profile"]]["candidates"]
    return {c["endpoint"]: c["scorers"][SCORER]["raw"] for c in cands}


async def producer_settles(session, epp, url: str, probe_model: str, busy: str | None) -> None:
    """Probe until the in-flight load the scorer sees is exactly ``busy`` (or nothing)."""
    last: dict[str, float] = {}
    end = time.monotonic() + 10
    while time.monotonic() < end:
        last = await busy_endpoints(session, epp, url, probe_model)
        if all((score == 0.0) if ep == busy else (score == 1.0) for ep, score in last.items()):
            return
        # Earlier probes are released when their own ext_proc stream ends; try again.
        await asyncio.sleep(0.05)
    pytest.fail(f"in-flight load never settled to busy={busy}: {last}")


def pick_of(epp, model: str) -> str:
    decisions = epp.get_json("/debug/decisions?n=50")["decisions"]
    return next(d["pick"] for d in decisions if d["model"] == model)


# --- the tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
async def test_256_event_answer_complete_in_order_on_time_and_accounted(stack, mode):
    m = MODES[mode]
    epp, envoy = stack[mode]
    model = f"sse-{mode}"
    n = 256
    events: list[tuple[float, dict | bytes]] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(envoy.url + "/v1/completions",
                                json={"model": model, "prompt": "hi", "stream": True, "max_tokens": n,
                                      "delay": 0.003}) as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data: "):
                    payload = line[6:].strip()
                    events.append((time.time(), payload if payload == b"[DONE]" else json.loads(payload)))
        # complete and in order
        assert events[-1][1] == b"[DONE]"
        tokens = [e for _, e in events[:-2]]
        assert [t["choices"][0]["text"] for t in tokens] == [f"tok{i} " for i in range(n)]
        assert events[-2][1]["usage"]["completion_tokens"] == 3
        # not held back: each event arrives soon after the backend sent it, and the events are
        # spread over the stream, not delivered together at the end
        delays = [arrived - e["sent_at"] for arrived, e in events[:n]]
        assert statistics.median(delays) < 0.05, f"median delay {statistics.median(delays):.3f}s"
        sent_span = tokens[-1]["sent_at"] - tokens[0]["sent_at"]
        arrival_span = events[n - 1][0] - events[0][0]
        assert arrival_span > 0.5 * sent_span, (arrival_span, sent_span)

        await eventually(lambda: running(epp, model) == 0.0, what="running requests back to 0")
        await producer_settles(session, epp, envoy.url, f"probe-{mode}", busy=None)
    text = epp.metrics_text()
    out_tokens = _sample(text, "inference_objective_output_tokens_count", model)
    in_tokens = _sample(text, "inference_objective_input_tokens_count", model)
    if m.reads_sse:
        assert (out_tokens, in_tokens) == (1.0, 1.0)
        assert _sample(text, "inference_objective_output_tokens_sum", model) == 3.0
    else:
        assert out_tokens is None and in_tokens is None
    assert _sample(text, "inference_objective_request_total", model) == 1.0


@pytest.mark.parametrize("mode", list(MODES))
async def test_json_answer_usage_where_the_policy_reads_it(stack, mode):
    m = MODES[mode]
    epp, envoy = stack[mode]
    model = f"json-{mode}"
    async with aiohttp.ClientSession() as session:
        status, raw = await post(session, envoy.url, {"model": model, "prompt": "hi"})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3
    await eventually(lambda: running(epp, model) == 0.0, what="running requests back to 0")
    text = epp.metrics_text()
    if m.reads_json:
        assert _sample(text, "inference_objective_output_tokens_sum", model) == 3.0
        assert _sample(text, "inference_objective_input_tokens_sum", model) == 7.0
    else:
        assert _sample(text, "inference_objective_output_tokens_count", model) is None


@pytest.mark.parametrize("mode", list(MODES))
async def test_client_leaving_mid_stream_releases_the_request(stack, mode):
    m = MODES[mode]
    epp, envoy = stack[mode]
    model = f"leave-{mode}"
    async with aiohttp.ClientSession() as session:
        async with session.post(envoy.url + "/v1/completions",
                                json={"model": model, "prompt": "hi", "stream": True, "max_tokens": 200,
                                      "delay": 0.02}) as r:
            assert r.status == 200
            assert (await r.content.readline()).startswith(b"data: ")  # the answer is streaming
            if m.sees_end:  # in flight while it streams: gauge and producer both count it
                assert await asyncio.to_thread(running, epp, model) == 1.0
                await producer_settles(session, epp, envoy.url, f"probe-leave-{mode}",
                                       busy=await asyncio.to_thread(pick_of, epp, model))
            r.close()  # leave: the connection closes mid-stream
        await eventually(lambda: running(epp, model) == 0.0, what="running requests back to 0")
        await producer_settles(session, epp, envoy.url, f"probe-leave-{mode}", busy=None)


@pytest.mark.parametrize("mode", list(MODES))
async def test_rewritten_model_is_restored_in_streamed_events(stack, mode):
    """A rewritten model's answer is always read (whatever the policy) so the client sees the
    name it asked for; only a response body mode of NONE (buffered) cannot restore it."""
    _, envoy = stack[mode]
    async with aiohttp.ClientSession() as session:
        async with session.post(envoy.url + "/v1/completions",
                                headers={"x-gateway-model-name-rewrite": "served-model"},
                                json={"model": f"alias-{mode}", "prompt": "hi", "stream": True, "max_tokens": 5}) as r:
            assert r.status == 200
            models = [json.loads(line[6:])["model"] async for line in r.content
                      if line.startswith(b"data: {")]
    assert len(models) == 6  # five tokens and the usage event
    expected = "served-model" if MODES[mode].template == "envoy-buffered.yaml" else f"alias-{mode}"
    assert set(models) == {expected}


@pytest.mark.parametrize("tls", [False, True])
def test_efficient_template_validates(backends, tls):
    from epp.bench.procs import free_port
    from epp.envoyconfig import render_envoy_config, validate

    text = render_envoy_config("envoy-efficient.yaml", listen_port=free_port(), admin_port=free_port(), epp_port=9002,
                               fallback_endpoints=backends.addresses, epp_tls=tls)
    hcm = yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_proc = next(f for f in hcm["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    cfg = ext_proc["typed_config"]
    assert cfg["allow_mode_override"] is True and cfg["failure_mode_allow"] is True
    assert (cfg["processing_mode"]["request_body_mode"], cfg["processing_mode"]["response_body_mode"]) == ("BUFFERED", "STREAMED")
    ok, out = validate(text)
    assert ok, out


async def test_efficient_mode_fails_open_when_the_epp_is_unreachable(envoy_launcher, backends):
    """No EPP listening: failure_mode_allow sends the request down the round-robin fallback
    route, streamed answers included."""
    from epp.bench.procs import free_port

    envoy = envoy_launcher("envoy-efficient.yaml", epp_port=free_port(), fallback_endpoints=backends.addresses)
    async with aiohttp.ClientSession() as session:
        status, raw = await post(session, envoy.url, {"model": "m", "prompt": "hi"})
        assert status == 200
        doc = json.loads(raw)
        assert doc["recv_destination"] is None and doc["served_by"] in backends.names  # no pick: the fallback
        async with session.post(envoy.url + "/v1/completions",
                                json={"model": "m", "prompt": "hi", "stream": True, "max_tokens": 20}) as r:
            assert r.status == 200
            events = [line async for line in r.content if line.startswith(b"data: ")]
    assert len(events) == 22 and events[-1].strip() == b"data: [DONE]"

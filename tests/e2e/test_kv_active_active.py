"""Active-active precise prefix routing through a real Envoy: two EPP replicas behind one
ext_proc cluster, a pod-like mock vLLM fleet publishing KV events, the issue's config as written
(apart from the event port, which must be free on this shared machine).

Requests sharing a prefix go to the server that holds it even when that server's cache was
filled by a request the *other* replica routed: neither replica shares anything with the other,
both learn it from the engine's events.
"""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.request

import pytest

from epp.bench.procs import ProcessGroup

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "kvevents"))
from kv_helpers import common_free_port, random_loopback_block  # noqa: E402

pytestmark = pytest.mark.envoy
MODEL = "meta-llama/Llama-3.1-8B-Instruct"

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSizeTokens: 16}
    kvEventsConfig: {discoverPods: true, podDiscoveryConfig: {socketPort: %d}}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer, weight: 3}, {pluginRef: queue-scorer, weight: 2}, {pluginRef: kv-cache-utilization-scorer, weight: 2}]
"""


def post(url: str, body: dict) -> tuple[int, dict[str, str], dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json",
                                                                             "x-epp-debug": "1"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_replicas_agree_on_blocks_the_other_one_routed(procs: ProcessGroup, epp_launcher, envoy_launcher):
    block = random_loopback_block()
    hosts = [block + str(i) for i in (2, 3, 4)]
    http_port, ev_port = common_free_port(hosts), common_free_port(hosts)
    events = {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{ev_port}",
              "topic": "kv@$(POD_IP):$(POD_PORT)@" + MODEL}
    sim = procs.start("sim-kv", [sys.executable, "-m", "epp", "sim", "--hosts", ",".join(hosts), "--port",
                                 str(http_port), "--time-scale", "0.02", "--kv-events-config", json.dumps(events)])
    procs.wait_for_log(sim, r"sim ready name=(\S+) url=(\S+)", count=3, timeout=30)
    endpoints = [f"{h}:{http_port}" for h in hosts]
    config = CONFIG % ev_port
    replicas = [epp_launcher(endpoints, config_text=config, extra=["--enable-debug-headers"], wait=False)
                for _ in range(2)]
    for r in replicas:
        r.wait_ready()
    envoy = envoy_launcher("envoy.yaml", epp_replicas=[f"127.0.0.1:{r.grpc_port}" for r in replicas])

    def subscribed(r) -> bool:
        kv = next(p for p in r.get_json("/debug/plugins")["plugins"] if p["type"] == "precise-prefix-cache-producer")
        return sum(s["connected"] for s in kv["subscriptions"]) == 3

    for r in replicas:
        wait_for(lambda r=r: subscribed(r), 20, "both replicas subscribed to all 3 servers")

    def index_of(r) -> dict[str, int]:
        kv = next(p for p in r.get_json("/debug/plugins")["plugins"] if p["type"] == "precise-prefix-cache-producer")
        return kv["index"]["per_endpoint"]

    def newest(r) -> str | None:
        decisions = r.get_json("/debug/decisions?n=1")["decisions"]
        return decisions[0]["request_id"] if decisions else None

    rng = random.Random(5)
    seen_by: dict[int, set[str]] = {0: set(), 1: set()}
    for tenant in range(4):
        system = f"[tenant {tenant}] " + " ".join(rng.choice(["cache", "block", "token", "prefix", "route"])
                                                  for _ in range(300))
        owner = None
        for turn in range(4):
            body = {"model": MODEL, "max_tokens": 4, "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": f"question {turn} of {tenant}"}]}
            before = [newest(r) for r in replicas]
            status, headers, _ = post(envoy.url + "/v1/chat/completions", body)
            assert status == 200
            server = headers["x-sim-address"]
            # Requests are sequential: the replica with a new newest decision routed this one.
            replica = next(i for i, r in enumerate(replicas) if newest(r) != before[i])
            seen_by[replica].add(f"{tenant}/{turn}")
            if owner is None:
                owner = server
                # Both replicas hear the owner's KV events, whichever one routed the request.
                for r in replicas:
                    wait_for(lambda r=r: index_of(r).get(owner, 0) >= 20, 10, f"replica indexed {owner}")
            else:
                assert server == owner, f"tenant {tenant} turn {turn} went to {server}, its prefix is on {owner}"
    # Envoy spread the stream over both replicas: each routed requests whose prefix the other one placed.
    assert seen_by[0] and seen_by[1]
    for r in replicas:
        decisions = r.get_json("/debug/decisions?n=50")["decisions"]
        matched = [d["prefix_matches"]["precise-prefix-cache-producer"] for d in decisions if d.get("prefix_matches")]
        assert any(max(m["matched_blocks"].values(), default=0) >= 20 for m in matched)

"""The EPP goes away and comes back: buffered fails open, duplex fails closed, both recover."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from epp_configs import RANDOM_PICKER

pytestmark = pytest.mark.envoy

CONFIG = RANDOM_PICKER


def call(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({"model": "m1", "prompt": "hi"}).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_epp_down_then_restarted(epp_launcher, envoy_launcher, backends):
    epp = epp_launcher(backends.addresses, config_text=CONFIG)
    duplex = envoy_launcher("envoy.yaml", epp_port=epp.grpc_port)
    buffered = envoy_launcher("envoy-buffered.yaml", epp_port=epp.grpc_port, fallback_endpoints=backends.addresses)
    for envoy in (duplex, buffered):
        status, raw = call(envoy.url)
        assert status == 200 and json.loads(raw)["served_by"] in backends.names

    epp.kill()
    # Buffered config: failure_mode_allow sends the request down the round-robin fallback route.
    served = set()
    for _ in range(4):
        status, raw = call(buffered.url)
        assert status == 200
        doc = json.loads(raw)
        assert doc["recv_destination"] is None  # no pick was made: this is the fallback route
        served.add(doc["served_by"])
    assert len(served) >= 2  # round-robin over the backends
    # Duplex config: no fail-open in Envoy for FULL_DUPLEX_STREAMED; the request fails closed,
    # with the 503 of status_on_error rather than a bare 500.
    status, raw = call(duplex.url)
    assert status == 503

    epp.restart()
    deadline = time.monotonic() + 15
    recovered = {}
    while time.monotonic() < deadline and len(recovered) < 2:
        for name, envoy in (("duplex", duplex), ("buffered", buffered)):
            status, raw = call(envoy.url)
            if status == 200 and json.loads(raw)["recv_destination"]:
                recovered[name] = True
        time.sleep(0.2)
    assert recovered == {"duplex": True, "buffered": True}

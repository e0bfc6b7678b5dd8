"""`epp serve` as a process: startup errors, shutdown, the metrics/debug port, TLS behind Envoy,
and config reload."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from epp.bench.procs import free_port

pytestmark = pytest.mark.envoy

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: {picker}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: {picker}
"""


def serve_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "epp", "serve", "--bind-address", "127.0.0.1", "--grpc-port", "0",
            "--grpc-health-port", "0", "--metrics-port", "0", "--secure-serving=false", *extra]


def test_invalid_config_exits_2_with_the_problem_named():
    proc = subprocess.run(serve_argv("--endpoint", "127.0.0.1:9", "--config-text", CONFIG.format(picker="no-such-picker")),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no-such-picker" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_in_use_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        argv = serve_argv("--endpoint", "127.0.0.1:9")
        argv[argv.index("--grpc-port") + 1] = str(busy)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and str(busy) in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_shuts_down_cleanly(procs):
    proc = procs.start("epp-sigterm", serve_argv("--endpoint", "127.0.0.1:9"))
    procs.wait_for_log(proc, r"epp ready grpc_port=\d+", timeout=30)
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(15) == 0
    assert "Traceback" not in proc.log_text()


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


def test_metrics_and_debug_pages(epp_launcher, backends):
    epp = epp_launcher(backends.addresses, config_text=CONFIG.format(picker="random-picker"))
    status, text = _get(epp.metrics_url + "/metrics")
    assert status == 200
    for name in ("inference_pool_ready_pods", "inference_pool_average_kv_cache_utilization",
                 "inference_extension_info", "inference_objective_request_total"):
        assert name in text
    assert _get(epp.metrics_url + "/healthz") == (200, "ok\n")
    status, page = _get(epp.metrics_url + "/debug")
    assert status == 200 and "<h1>Endpoint picker</h1>" in page
    for addr in backends.addresses:
        assert addr in page
    endpoints = epp.get_json("/debug/endpoints")
    assert {e["endpoint"] for e in endpoints["endpoints"]} == set(backends.addresses)
    assert epp.get_json("/debug/decisions") == {"decisions": []}


def test_decision_log_keeps_the_last_n(epp_launcher, envoy_launcher, backends):
    """--decision-log-size: /debug/decisions keeps the newest N (the kv-pressure bench keeps a whole run)."""
    epp = epp_launcher(backends.addresses, config_text=CONFIG.format(picker="random-picker"),
                       extra=["--decision-log-size", "2"])
    envoy = envoy_launcher("envoy.yaml", epp_port=epp.grpc_port)
    for i in range(3):
        req = urllib.request.Request(envoy.url + "/v1/completions", data=b'{"model":"m1","prompt":"hi"}',
                                     headers={"content-type": "application/json", "x-request-id": f"log-{i}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
    kept = epp.get_json("/debug/decisions?n=10")["decisions"]
    assert [d["request_id"] for d in kept] == ["log-2", "log-1"]


def test_tls_between_envoy_and_epp(epp_launcher, envoy_launcher, backends):
    epp = epp_launcher(backends.addresses, config_text=CONFIG.format(picker="random-picker"), secure=True)
    envoy = envoy_launcher("envoy.yaml", epp_port=epp.grpc_port, epp_tls=True)
    req = urllib.request.Request(envoy.url + "/v1/completions", data=b'{"model":"m1","prompt":"hi"}',
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        doc = json.loads(r.read())
    assert doc["served_by"] in backends.names and doc["recv_destination"]


def test_config_reload_keeps_the_old_config_when_the_new_one_is_bad(procs, backends, tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(CONFIG.format(picker="random-picker"))
    metrics_port = free_port()
    argv = serve_argv("--config-file", str(path), "--config-reload", "--endpoint", backends.addresses[0])
    argv[argv.index("--metrics-port") + 1] = str(metrics_port)
    proc = procs.start("epp-reload", argv)
    procs.wait_for_log(proc, r"epp ready grpc_port=\d+", timeout=30)

    def reloads(outcome: str) -> float:
        _, text = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        for line in text.splitlines():
            if line.startswith(f'epp_config_reloads_total{{outcome="{outcome}"}}'):
                return float(line.split()[-1])
        return 0.0

    def wait_for(outcome: str, value: float) -> bool:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if reloads(outcome) >= value:
                return True
            time.sleep(0.2)
        return False

    time.sleep(1.1)  # a different mtime
    path.write_text(CONFIG.format(picker="no-such-picker"))
    assert wait_for("failure", 1), proc.log_tail()
    assert "config reload rejected" in proc.log_text() and "no-such-picker" in proc.log_text()
    time.sleep(1.1)
    path.write_text(CONFIG.format(picker="max-score-picker"))
    assert wait_for("success", 1), proc.log_tail()
    assert proc.alive

"""Kubernetes discovery end to end: the in-memory API server, `epp serve --pool-name`, real Envoy,
and `epp sim` model servers on distinct loopback addresses standing in for pod IPs (one port).

Timings the issue asks for (traffic within 2 s of a Ready pod, none 1 s after not-Ready) are
measured by `epp bench discovery`; here we check the behaviour with generous timeouts.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

import grpc
import pytest
from epp_configs import RANDOM_PICKER
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.bench.kubeapi import KubeApiThread, inference_pool, pod, ready_patch, write_kubeconfig
from epp.bench.procs import ProcessGroup, free_port
from epp.discovery import resources as R
from epp.discovery.leader import lease_name

pytestmark = pytest.mark.envoy

NS = "inference"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
POOL = R.INFERENCE_POOLS[R.POOL_GROUP]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Cluster:
    api: KubeApiThread
    kubeconfig: str
    hosts: list[str]
    port: int

    def address(self, i: int) -> str:
        return f"{self.hosts[i]}:{self.port}"

    def add_pod(self, name: str, i: int, app: str, ready: bool = True) -> None:
        self.api.store.create(R.PODS, pod(name, self.hosts[i], {"app": app}, ready=ready, namespace=NS))


@pytest.fixture(scope="module")
def cluster(procs: ProcessGroup, tmp_path_factory) -> Cluster:
    block = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}."
    hosts = [block + str(i) for i in range(2, 6)]
    port = free_port(hosts[0])
    sims = procs.start("sims", [sys.executable, "-m", "epp.sim", "--hosts", ",".join(hosts), "--port", str(port),
                                "--time-scale", "0.01"])
    procs.wait_for_log(sims, r"sim ready", count=len(hosts), timeout=30)
    api = KubeApiThread(token="e2e", bookmark_interval=0.5)
    kubeconfig = write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig", api.url, "e2e")
    yield Cluster(api, kubeconfig, hosts, port)
    api.close()


def launch_epp(epp_launcher, cluster: Cluster, pool: str, *extra: str):
    return epp_launcher([], config_text=RANDOM_PICKER, wait=False, extra=[
        "--pool-name", pool, "--pool-namespace", NS, "--kubeconfig", cluster.kubeconfig, *extra])


def health(epp, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{epp.health_port}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=2).status
        except grpc.RpcError:
            return -1


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def call(url: str, model: str = MODEL) -> tuple[int, str]:
    body = json.dumps({"model": model, "prompt": f"hi {random.random()}", "max_tokens": 2}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"content-type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("x-sim-address", "")
    except urllib.error.HTTPError as e:
        return e.code, ""


def spread(url: str, n: int = 24) -> collections.Counter:
    return collections.Counter(call(url) for _ in range(n))


def endpoint_keys(epp) -> set[str]:
    return {row["endpoint"] for row in epp.get_json("/debug/endpoints")["endpoints"]}


@pytest.fixture(scope="module")
def served(epp_launcher, envoy_launcher, cluster: Cluster):
    """One EPP on pool 'chat' (pods a, b Ready) behind Envoy (full duplex)."""
    cluster.api.store.create(POOL, inference_pool("chat", {"app": "chat"}, [cluster.port], namespace=NS))
    cluster.add_pod("a", 0, "chat")
    cluster.add_pod("b", 1, "chat")
    epp = launch_epp(epp_launcher, cluster, "chat", "--drain-timeout", "0s")
    epp.wait_ready()
    envoy = envoy_launcher("envoy.yaml", epp_port=epp.grpc_port)
    return epp, envoy


def test_pods_coming_and_going_steer_traffic(served, cluster):
    epp, envoy = served
    assert set(spread(envoy.url)) == {(200, cluster.address(0)), (200, cluster.address(1))}
    row = next(r for r in epp.get_json("/debug/endpoints")["endpoints"] if r["endpoint"] == cluster.address(0))
    assert row["name"] == "a-rank-0"

    cluster.add_pod("c", 2, "chat")  # a new Ready pod gets traffic
    wait_for(lambda: (200, cluster.address(2)) in spread(envoy.url, 12), "traffic to the new pod c")

    cluster.api.store.patch(R.PODS, NS, "a", ready_patch(False))  # not Ready: no new request
    wait_for(lambda: cluster.address(0) not in endpoint_keys(epp), "a dropped")
    assert set(spread(envoy.url)) == {(200, cluster.address(1)), (200, cluster.address(2))}

    cluster.api.store.delete(R.PODS, NS, "c")  # deleted: no new request
    wait_for(lambda: cluster.address(2) not in endpoint_keys(epp), "c dropped")
    assert set(spread(envoy.url, 12)) == {(200, cluster.address(1))}


def test_api_server_restart_mid_watch_loses_no_update(served, cluster):
    epp, envoy = served
    store = cluster.api.store
    cluster.api.stop_listener()
    store.patch(R.PODS, NS, "a", ready_patch(True))  # while the API server is away
    cluster.add_pod("d", 3, "chat")
    wait_for(lambda: not epp.get_json("/debug/discovery")["connected"], "the outage seen")
    assert endpoint_keys(epp) == {cluster.address(1)}  # last known endpoints kept and still served
    assert set(spread(envoy.url, 6)) == {(200, cluster.address(1))}
    assert 'epp_kubernetes_watch_connected{resource="pods"} 0.0' in epp.metrics_text()
    cluster.api.start_listener()
    wait_for(lambda: endpoint_keys(epp) == {cluster.address(i) for i in (0, 1, 3)}, "updates made during the outage")
    wait_for(lambda: epp.get_json("/debug/discovery")["connected"], "every watch reconnected")
    assert set(spread(envoy.url)) == {(200, cluster.address(i)) for i in (0, 1, 3)}


def test_inference_model_rewrite_object_renames_the_model(served, cluster):
    epp, envoy = served
    assert call(envoy.url, "chat-alias")[0] == 404  # the model servers do not know the alias
    rewrite = {"metadata": {"name": "alias", "namespace": NS},
               "spec": {"poolRef": {"name": "chat"}, "rules": [
                   {"matches": [{"model": {"type": "Exact", "value": "chat-alias"}}],
                    "targets": [{"modelRewrite": MODEL, "weight": 1}]}]}}
    cluster.api.store.create(R.REWRITES[0], rewrite)  # llm-d.ai/v1alpha2
    wait_for(lambda: call(envoy.url, "chat-alias")[0] == 200, "the rewrite applied")
    crds = epp.get_json("/debug/discovery")["crds"]
    assert crds["groups"]["InferenceModelRewrite"] == "llm-d.ai"
    cluster.api.store.delete(R.REWRITES[0], NS, "alias")
    wait_for(lambda: call(envoy.url, "chat-alias")[0] == 404, "the rewrite removed")


def test_pool_deleted_gives_503_and_not_serving_until_it_returns(served, cluster):
    epp, envoy = served
    cluster.api.store.delete(POOL, NS, "chat")
    wait_for(lambda: health(epp) == NOT_SERVING, "NOT_SERVING")
    assert health(epp, "inference-extension") == NOT_SERVING  # no election: every name the same
    assert endpoint_keys(epp) == set()
    assert call(envoy.url)[0] == 503
    cluster.api.store.create(POOL, inference_pool("chat", {"app": "chat"}, [cluster.port], namespace=NS))
    wait_for(lambda: health(epp) == SERVING, "SERVING again")
    assert call(envoy.url)[0] == 200


def test_leader_election_one_ready_replica_and_failover(procs, epp_launcher, envoy_launcher, cluster):
    store = cluster.api.store
    store.create(POOL, inference_pool("ha", {"app": "ha"}, [cluster.port], namespace=NS))
    cluster.add_pod("ha-0", 0, "ha")
    timing = ["--ha-enable-leader-election", "--leader-election-lease-duration", "3s",
              "--leader-election-renew-deadline", "2s", "--leader-election-retry-period", "200ms",
              "--drain-timeout", "3s"]
    first, second = launch_epp(epp_launcher, cluster, "ha", *timing), launch_epp(epp_launcher, cluster, "ha", *timing)
    replicas = [first, second]
    wait_for(lambda: sorted(health(e, "readiness") for e in replicas) == sorted([NOT_SERVING, SERVING]), "one leader")
    leader = next(e for e in replicas if health(e, "readiness") == SERVING)
    standby = next(e for e in replicas if e is not leader)
    lease = store.get(R.LEASES, NS, lease_name(NS, "ha"))
    assert lease is not None and lease["spec"]["leaseDurationSeconds"] == 3
    for e in replicas:
        assert health(e, "liveness") == SERVING  # a standby is alive
        assert health(e, "no-such-service") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    assert health(leader, "") == health(leader, "envoy.service.ext_proc.v3.ExternalProcessor") == SERVING
    assert health(standby, "") == NOT_SERVING
    wait_for(lambda: endpoint_keys(standby) == {cluster.address(0)}, "standby's endpoints populated")

    # SIGTERM: the leader reports NOT_SERVING, releases the Lease, and keeps serving ext_proc
    envoy = envoy_launcher("envoy.yaml", epp_port=leader.grpc_port)
    assert call(envoy.url) == (200, cluster.address(0))
    os.kill(leader.proc.pid, signal.SIGTERM)  # as the kubelet does: the main process only
    wait_for(lambda: health(leader, "readiness") == NOT_SERVING, "draining leader NOT_SERVING")
    assert health(leader, "liveness") == SERVING
    wait_for(lambda: health(standby, "readiness") == SERVING, "standby takes over after the release")
    assert call(envoy.url) == (200, cluster.address(0))  # still served while draining
    assert store.get(R.LEASES, NS, lease_name(NS, "ha"))["spec"]["holderIdentity"] != lease["spec"]["holderIdentity"]
    procs.stop(leader.proc)

    # the new leader dies without releasing: a fresh replica takes over once the lease expires
    third = launch_epp(epp_launcher, cluster, "ha", *timing)
    wait_for(lambda: health(third, "liveness") == SERVING, "third replica up")
    assert health(third, "readiness") == NOT_SERVING
    os.killpg(standby.proc.pid, signal.SIGKILL)
    took = wait_for(lambda: health(third, "readiness") == SERVING, "takeover after expiry", timeout=20)
    print(f"takeover after SIGKILL of the leader: {took:.1f}s (lease 3s)")
    procs.stop(standby.proc)

"""The rendered manifests drive the real EPP: the chart's and the kustomize base's command line,
environment, config files and probe service names, run as `epp serve` processes against the
in-memory Kubernetes API server holding the rendered InferencePool and pods that match it.

What a pod's container would see is mapped onto this machine: the ConfigMap's files in a
directory standing in for /config, free loopback ports instead of 9002/9003/9090, the API server
through --kubeconfig instead of the service account, NAMESPACE and POD_NAME from the Downward API.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_manifests import K8S, VALUES_DIR, Obj, container, flag_values, helm_template, kustomize, one

from epp.bench.kubeapi import KubeApiThread, pod, write_kubeconfig
from epp.bench.procs import ProcessGroup, free_port
from epp.discovery import resources as R

NS = "team-a"
SERVING = health_pb2.HealthCheckResponse.SERVING
PORT_FLAGS = ("grpc-port", "grpc-health-port", "metrics-port")


def add_model_server_pods(api: KubeApiThread, labels: dict[str, str], prefix: str, n: int = 2) -> None:
    block = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}."
    for i in range(n):
        api.store.create(R.PODS, pod(f"{prefix}-{i}", block + str(i + 2), labels, namespace=NS))


def start_epp(procs: ProcessGroup, deployment: Obj, configmap: Obj, kubeconfig: str, pod_name: str, tmp: Path) -> int:
    """Run the Deployment's container as a local process; returns its health port."""
    c = container(deployment)
    config_dir = tmp / pod_name / "config"
    config_dir.mkdir(parents=True)
    for name, text in configmap["data"].items():
        (config_dir / name).write_text(text)
    ports = {flag: free_port() for flag in PORT_FLAGS}
    argv = []
    for arg in c["args"]:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if name in ports:
            arg = f"--{name}={ports[name]}"
        elif name == "config-file":
            arg = arg.replace("=/config/", f"={config_dir}/")
        argv.append(arg)
    assert flag_values(argv[1:])["config-file"].startswith(str(config_dir))
    env = {**os.environ}
    for var in c["env"]:
        field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[var["name"]] = {"metadata.namespace": NS, "metadata.name": pod_name}.get(field, var.get("value", ""))
    # --drain-timeout 0: the drain is tested with the discovery code; here it would only slow teardown.
    procs.start(pod_name, [sys.executable, "-m", "epp", *argv, "--bind-address=127.0.0.1",
                           f"--kubeconfig={kubeconfig}", "--drain-timeout=0s"], env=env)
    return ports["grpc-health-port"]


def probe(health_port: int, service: str) -> int:
    """What the kubelet's gRPC probe sees."""
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return -1


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@dataclass
class Replica:
    deployment: Obj
    health_port: int

    def probe(self, kind: str) -> int:
        return probe(self.health_port, container(self.deployment)[kind]["grpc"]["service"])


@pytest.fixture(scope="module")
def cluster(procs: ProcessGroup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Replica]]]:
    """Three deployments at once (they start in parallel): the kind example's EPP (kustomize), the
    chart with two replicas, the chart in standalone mode; each with its pool and pods."""
    tmp = tmp_path_factory.mktemp("live")
    api = KubeApiThread(token="deploy")
    kubeconfig = write_kubeconfig(tmp / "kubeconfig", api.url, "deploy", namespace=NS)
    pools = R.INFERENCE_POOLS[R.POOL_GROUP]
    out: dict[str, list[Replica]] = {}

    kind = kustomize(K8S / "examples" / "kind")
    pool = one(kind, "InferencePool")
    api.store.create(pools, {**pool, "metadata": {**pool["metadata"], "namespace": NS}}, namespace=NS)
    add_model_server_pods(api, one(kind, "Deployment", "vllm-llama3-8b-instruct")["spec"]["template"]["metadata"]["labels"],
                          "vllm-llama3-8b-instruct-7d9c")
    deployment = one(kind, "Deployment", "vllm-pool-epp")
    configmap = next(o for o in kind if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("vllm-pool-epp-"))
    out["kustomize"] = [Replica(deployment, start_epp(procs, deployment, configmap, kubeconfig,
                                                      "vllm-pool-epp-5f7b9c-abcde", tmp))]

    ha = helm_template(set_values=["router.modelServers.matchLabels.app=ha-model", "router.epp.replicas=2"],
                       release="ha-pool", namespace=NS)
    api.store.create(pools, one(ha, "InferencePool"), namespace=NS)
    add_model_server_pods(api, {"app": "ha-model"}, "ha-model-6c8d")
    deployment = one(ha, "Deployment")
    out["ha"] = [Replica(deployment, start_epp(procs, deployment, one(ha, "ConfigMap"), kubeconfig,
                                               f"ha-pool-epp-5f7b9c-{i}", tmp)) for i in (0, 1)]

    solo = helm_template(VALUES_DIR / "standalone.yaml", release="solo", namespace=NS)
    add_model_server_pods(api, {"app": "my-model-service", "tier": "gpu"}, "my-model-service-55d")
    deployment = one(solo, "Deployment")
    out["standalone"] = [Replica(deployment, start_epp(procs, deployment, one(solo, "ConfigMap"), kubeconfig,
                                                       "solo-epp-5f7b9c-abcde", tmp))]
    yield out
    api.close()


def test_kustomize_example_epp_becomes_ready_and_live(cluster: dict[str, list[Replica]]) -> None:
    [epp] = cluster["kustomize"]
    wait_for(lambda: epp.probe("readinessProbe") == SERVING == epp.probe("livenessProbe"), "readiness and liveness")


def test_chart_with_two_replicas_has_one_ready_leader_and_two_live(cluster: dict[str, list[Replica]]) -> None:
    replicas = cluster["ha"]
    wait_for(lambda: all(r.probe("livenessProbe") == SERVING for r in replicas), "liveness SERVING on both")
    wait_for(lambda: [r.probe("readinessProbe") for r in replicas].count(SERVING) == 1, "readiness SERVING on one")


def test_chart_standalone_becomes_ready_without_a_pool(cluster: dict[str, list[Replica]]) -> None:
    [epp] = cluster["standalone"]
    wait_for(lambda: epp.probe("readinessProbe") == SERVING == epp.probe("livenessProbe"), "readiness and liveness")

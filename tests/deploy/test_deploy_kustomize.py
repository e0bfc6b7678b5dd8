"""deploy/kubernetes/{base,overlays/*,examples/kind} rendered by `kubectl kustomize`: every object is
valid for Kubernetes 1.29 and the newest schemas (strict), the EPP's command line parses with the
real `epp serve` parser, its config loads, and the pieces refer to each other correctly."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import yaml
from k8s_manifests import (
    K8S,
    CustomResourceValidator,
    Obj,
    by_kind,
    container,
    expand_env,
    flag_values,
    helm_template,
    kustomize,
    label_selector_matches,
    one,
    parse_serve,
    parse_sim,
    role_rules,
    validate_all,
)

from epp.config.loader import load_config
from epp.envoyconfig import validate as envoy_validate

DIRS = ["base", "overlays/ha", "overlays/standalone", "examples/kind"]
READ = frozenset({"get", "watch", "list"})
POOL_MODE_RULES = {
    ("", "pods", READ),
    ("inference.networking.k8s.io", "inferencepools", READ),
    ("llm-d.ai", "inferenceobjectives", READ),
    ("llm-d.ai", "inferencemodelrewrites", READ),
    ("inference.networking.x-k8s.io", "inferenceobjectives", READ),
    ("inference.networking.x-k8s.io", "inferencemodelrewrites", READ),
}
LEASE_RULES = {
    ("coordination.k8s.io", "leases", frozenset({"get", "list", "watch", "create", "update", "patch", "delete"})),
    ("", "events", frozenset({"create", "patch"})),
}


def render(d: str) -> list[Obj]:
    return kustomize(K8S / d)


def epp(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", "vllm-pool-epp")


def epp_flags(objs: list[Obj]) -> dict[str, str | None]:
    args = container(epp(objs))["args"]
    assert args[0] == "serve"
    return flag_values(args[1:])


@pytest.mark.parametrize("d", DIRS)
def test_every_object_is_valid(d: str, crs: CustomResourceValidator) -> None:
    objs = render(d)
    assert objs
    assert validate_all(objs, crs) == []


@pytest.mark.parametrize("d", DIRS)
def test_epp_command_line_parses_with_the_real_cli(d: str) -> None:
    options, _ = parse_serve(container(epp(render(d)))["args"])
    assert (options.grpc_port, options.grpc_health_port, options.metrics_port) == (9002, 9003, 9090)
    assert options.log_format == "json"
    assert options.secure_serving is True  # upstream's default: Gateways talk TLS to the EPP
    assert options.config_file == "/config/default-plugins.yaml"


@pytest.mark.parametrize("d", DIRS)
def test_config_is_mounted_and_loads_without_warnings(d: str) -> None:
    objs = render(d)
    spec = epp(objs)["spec"]["template"]["spec"]
    mount = next(m for m in container(epp(objs))["volumeMounts"] if m["mountPath"] == "/config")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])  # the generated name, with its hash
    assert cm["metadata"]["name"].startswith("vllm-pool-epp-")
    text = cm["data"]["default-plugins.yaml"]
    loaded = load_config(text)
    assert loaded.warnings == []
    assert set(cm["data"]) == {epp_flags(objs)["config-file"].removeprefix("/config/")}


@pytest.mark.parametrize("d", DIRS)
def test_service_account_service_and_probes_fit_together(d: str) -> None:
    objs = render(d)
    deployment = epp(objs)
    pod = deployment["spec"]["template"]
    c = container(deployment)
    flags = epp_flags(objs)
    assert label_selector_matches(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    service = one(objs, "Service", "vllm-pool-epp")
    assert label_selector_matches(service["spec"]["selector"], pod["metadata"]["labels"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(flags["grpc-port"]), "grpc-health": int(flags["grpc-health-port"]),
                     "metrics": int(flags["metrics-port"])}
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc-ext-proc": (9002, "grpc"), "grpc-health": (9003, "grpc-health"), "http-metrics": (9090, "metrics")}
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["grpc"]["port"] == int(flags["grpc-health-port"])
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    sa = pod["spec"]["serviceAccountName"]
    one(objs, "ServiceAccount", sa)
    for binding in by_kind(objs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
        one(objs, "Role", binding["roleRef"]["name"])
    # Hardening: non-root, nothing writable but /tmp (the self-signed TLS material goes there).
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/config", "/tmp"}


def test_base_is_one_replica_in_pool_mode() -> None:
    objs = render("base")
    deployment = epp(objs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    flags = epp_flags(objs)
    assert flags["pool-name"] == "vllm-pool"
    assert flags["pool-group"] == "inference.networking.k8s.io"
    assert "pool-namespace" not in flags  # from $NAMESPACE: the base is namespace-agnostic
    assert "ha-enable-leader-election" not in flags
    c = container(deployment)
    assert c["livenessProbe"]["grpc"]["service"] == c["readinessProbe"]["grpc"]["service"] == "inference-extension"
    assert role_rules(one(objs, "Role")) == POOL_MODE_RULES
    assert all("namespace" not in o["metadata"] for o in objs)


def test_ha_overlay_elects_a_leader() -> None:
    objs = render("overlays/ha")
    deployment = epp(objs)
    assert deployment["spec"]["replicas"] == 3
    assert epp_flags(objs)["ha-enable-leader-election"] is None  # the bare boolean flag
    c = container(deployment)
    assert c["readinessProbe"]["grpc"]["service"] == "readiness"
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"
    assert role_rules(one(objs, "Role", "vllm-pool-epp")) == POOL_MODE_RULES
    assert role_rules(one(objs, "Role", "vllm-pool-epp-leader-election")) == LEASE_RULES
    assert one(objs, "RoleBinding", "vllm-pool-epp-leader-election")["roleRef"]["name"] == "vllm-pool-epp-leader-election"


def test_standalone_overlay_selects_pods_itself() -> None:
    objs = render("overlays/standalone")
    flags = epp_flags(objs)
    assert flags["endpoint-selector"] == "app=vllm-llama3-8b-instruct"
    assert flags["endpoint-target-ports"] == "8000"
    assert "pool-name" not in flags and "pool-group" not in flags
    assert role_rules(one(objs, "Role")) == {("", "pods", READ)}


def test_kind_example_fits_together(crs: CustomResourceValidator) -> None:
    objs = render("examples/kind")
    pool = one(objs, "InferencePool", "vllm-pool")
    sim = one(objs, "Deployment", "vllm-llama3-8b-instruct")
    pod = sim["spec"]["template"]
    # The pool selects the mock vLLM pods, on the port they serve.
    assert label_selector_matches(pool["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    c = container(sim)
    fleet = parse_sim(expand_env(c["args"], {"POD_NAME": "vllm-llama3-8b-instruct-7d9c-abcde"}))
    assert [s.host for s in fleet.servers] == ["0.0.0.0"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [s.port for s in fleet.servers] == [c["ports"][0]["containerPort"]]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    # The pool names the EPP's Service and its ext_proc port, which is the EPP's --grpc-port.
    ref = crs.defaulted(pool)["spec"]["endpointPickerRef"]
    service = one(objs, "Service", ref["name"])
    ext_proc = next(p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert ext_proc["targetPort"] == "grpc"
    assert epp_flags(objs)["pool-name"] == pool["metadata"]["name"]
    assert (ref["kind"], ref["group"]) == ("Service", "")
    # The objectives and the rewrite apply to this pool, and the EPP may read them.
    for obj in by_kind(objs, "InferenceObjective") + by_kind(objs, "InferenceModelRewrite"):
        ref = crs.defaulted(obj)["spec"]["poolRef"]
        assert (ref["group"], ref["kind"], ref["name"]) == ("inference.networking.k8s.io", "InferencePool", "vllm-pool")
    assert {o["metadata"]["name"] for o in by_kind(objs, "InferenceObjective")} == {"interactive", "batch"}
    # The example uses the image docker-compose builds (`epp:local`), for `kind load docker-image`.
    assert {container(d)["image"] for d in by_kind(objs, "Deployment") if d["metadata"]["name"] != "envoy"} == {"epp:local"}


def test_base_config_is_the_charts_default() -> None:
    # One EndpointPickerConfig, two renderings: kustomize ships the file, Helm renders it from values.
    base = yaml.safe_load((K8S / "base" / "default-plugins.yaml").read_text())
    chart = one(helm_template(set_values=["router.modelServers.matchLabels.app=vllm"]), "ConfigMap")
    assert yaml.safe_load(chart["data"]["default-plugins.yaml"]) == base


def _render_envoy_module() -> Any:
    spec = importlib.util.spec_from_file_location("render_envoy", K8S.parent / "render_envoy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kind_example_envoy_sends_requests_through_the_epp() -> None:
    objs = render("examples/kind")
    envoy = one(objs, "Deployment", "envoy")
    c = container(envoy)
    assert c["image"] == "envoyproxy/envoy:v1.40.0"  # the image docker-compose runs
    config_path = c["args"][c["args"].index("-c") + 1]
    mount = next(m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in envoy["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    text = one(objs, "ConfigMap", volume["configMap"]["name"])["data"][config_path.rsplit("/", 1)[1]]
    assert text == _render_envoy_module().render("kind"), "run: python deploy/render_envoy.py"
    ok, output = envoy_validate(text)
    assert ok, output
    config = yaml.safe_load(text)
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "ext_proc_epp")
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    pool = one(objs, "InferencePool")
    assert cluster["type"] == "STRICT_DNS"
    assert (address["address"], address["port_value"]) == (pool["spec"]["endpointPickerRef"]["name"],
                                                           pool["spec"]["endpointPickerRef"]["port"]["number"])
    assert "transport_socket" in cluster  # TLS: the EPP runs with --secure-serving (default true)
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    service = one(objs, "Service", "envoy")
    assert label_selector_matches(service["spec"]["selector"], envoy["spec"]["template"]["metadata"]["labels"])
    assert listener["port_value"] == c["ports"][0]["containerPort"] == service["spec"]["ports"][0]["port"]

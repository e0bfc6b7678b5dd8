"""The Helm chart deploy/kubernetes/charts/epp, rendered by real Helm with several values files: our
defaults, a values file written for the upstream llm-d-router chart, one for the GAIE v1.5 chart,
HA and standalone. Every object must be valid, the EPP's command line must parse with the real
CLI and its config must load, and each value must land where upstream's chart puts it."""

from __future__ import annotations

import pytest
import yaml
from k8s_manifests import (
    VALUES_DIR,
    CustomResourceValidator,
    Obj,
    RenderError,
    by_kind,
    container,
    flag_values,
    helm_lint,
    helm_notes,
    helm_template,
    label_selector_matches,
    one,
    parse_serve,
    role_rules,
    validate_all,
)

from epp.config.loader import load_config

MATCH = "router.modelServers.matchLabels.app=vllm-llama3-8b-instruct"
UPSTREAM = VALUES_DIR / "upstream-router.yaml"
GAIE = VALUES_DIR / "gaie-v1.5.yaml"
STANDALONE = VALUES_DIR / "standalone.yaml"
SCENARIOS = {
    "defaults": ((), (MATCH,)),
    "ha": ((), (MATCH, "router.epp.replicas=3")),
    "upstream-router": ((UPSTREAM,), ()),
    "gaie-v1.5": ((GAIE,), ()),
    "standalone": ((STANDALONE,), ()),
}
READ = frozenset({"get", "watch", "list"})
LEASES = ("coordination.k8s.io", "leases", frozenset({"get", "list", "watch", "create", "update", "patch", "delete"}))


def render(name: str) -> list[Obj]:
    files, sets = SCENARIOS[name]
    return helm_template(*files, set_values=sets)


def epp(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment")


def epp_flags(objs: list[Obj]) -> dict[str, str | None]:
    args = container(epp(objs))["args"]
    assert args[0] == "serve"
    return flag_values(args[1:])


def probe_services(objs: list[Obj]) -> tuple[str, str]:
    c = container(epp(objs))
    return c["readinessProbe"]["grpc"]["service"], c["livenessProbe"]["grpc"]["service"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_helm_lint_strict(name: str) -> None:
    files, sets = SCENARIOS[name]
    assert "0 chart(s) failed" in helm_lint(*files, set_values=sets)


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_object_is_valid(name: str, crs: CustomResourceValidator) -> None:
    objs = render(name)
    monitors = by_kind(objs, "ServiceMonitor")  # prometheus-operator's kind: checked below
    assert validate_all([o for o in objs if o["kind"] != "ServiceMonitor"], crs) == []
    for monitor in monitors:
        service = one(objs, "Service")
        assert label_selector_matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("name", SCENARIOS)
def test_epp_command_line_and_config(name: str) -> None:
    objs = render(name)
    options, _ = parse_serve(container(epp(objs))["args"])
    cm = one(objs, "ConfigMap", "vllm-pool-epp")
    config = cm["data"][options.config_file.removeprefix("/config/")]
    # The upstream README's example config uses the older apiVersion: accepted, with a notice.
    assert [w for w in load_config(config).warnings if "is deprecated; use 'llm-d.ai/v1alpha1'" not in w] == []


def test_pod_rolls_when_the_config_changes_and_only_then() -> None:
    def checksum(*sets: str) -> str:
        return epp(helm_template(set_values=[MATCH, *sets]))["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum()
    assert checksum("router.epp.replicas=2", "router.epp.flags.v=3") == base
    assert checksum("router.epp.metricsDataSource.path=/stats") != base
    assert checksum("router.epp.pluginsCustomConfig.extra\\.yaml=x: 1") != base


@pytest.mark.parametrize("name", SCENARIOS)
def test_names_selectors_and_ports_fit_together(name: str) -> None:
    objs = render(name)
    deployment = epp(objs)
    pod = deployment["spec"]["template"]
    assert deployment["metadata"]["name"] == "vllm-pool-epp"
    service = one(objs, "Service", "vllm-pool-epp")
    assert label_selector_matches(service["spec"]["selector"], pod["metadata"]["labels"])
    assert label_selector_matches(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    c = container(deployment)
    flags = epp_flags(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(flags["grpc-port"]), "grpc-health": int(flags["grpc-health-port"]),
                     "metrics": int(flags["metrics-port"])}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["grpc"]["port"] == ports["grpc-health"]
    sa = pod["spec"]["serviceAccountName"]
    assert one(objs, "ServiceAccount")["metadata"]["name"] == sa
    for binding in by_kind(objs, "RoleBinding") + by_kind(objs, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "team-a"}]
    env = {e["name"]: e for e in c["env"]}
    assert env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for pool in by_kind(objs, "InferencePool"):
        ref = pool["spec"]["endpointPickerRef"]
        assert ref["name"] == service["metadata"]["name"]
        assert ref["port"]["number"] == next(p["port"] for p in service["spec"]["ports"] if p["targetPort"] == "grpc")
        assert flags["pool-name"] == pool["metadata"]["name"] == "vllm-pool"


def test_defaults() -> None:
    objs = render("defaults")
    flags = epp_flags(objs)
    assert flags == {"pool-name": "vllm-pool", "pool-namespace": "team-a", "pool-group": "inference.networking.k8s.io",
                     "zap-encoder": "json", "config-file": "/config/default-plugins.yaml", "grpc-port": "9002",
                     "grpc-health-port": "9003", "metrics-port": "9090"}
    deployment = epp(objs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert probe_services(objs) == ("inference-extension", "inference-extension")
    assert container(deployment)["image"] == "epp:local"
    assert deployment["spec"]["selector"]["matchLabels"] == {"llm-d-router-gateway": "vllm-pool-epp"}  # as upstream
    assert [r["metadata"]["name"] for r in by_kind(objs, "Role")] == ["vllm-pool-epp"]
    assert role_rules(one(objs, "Role")) == {
        ("", "pods", READ), ("inference.networking.k8s.io", "inferencepools", READ),
        ("llm-d.ai", "inferenceobjectives", READ), ("llm-d.ai", "inferencemodelrewrites", READ),
        ("inference.networking.x-k8s.io", "inferenceobjectives", READ),
        ("inference.networking.x-k8s.io", "inferencemodelrewrites", READ)}
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ServiceMonitor") and not by_kind(objs, "Secret")
    pool = one(objs, "InferencePool", "vllm-pool")
    assert pool["metadata"]["namespace"] == "team-a"
    assert pool["spec"] == {
        "selector": {"matchLabels": {"app": "vllm-llama3-8b-instruct"}},
        "targetPorts": [{"number": 8000}],
        "appProtocol": "http",
        "endpointPickerRef": {"name": "vllm-pool-epp", "port": {"number": 9002}, "failureMode": "FailOpen"},
    }
    assert not by_kind(objs, "InferenceObjective")


def test_more_than_one_replica_elects_a_leader() -> None:
    objs = render("ha")
    assert epp(objs)["spec"]["replicas"] == 3
    assert epp_flags(objs)["ha-enable-leader-election"] is None  # the bare boolean flag
    assert probe_services(objs) == ("readiness", "liveness")
    assert LEASES in role_rules(one(objs, "Role", "vllm-pool-epp-leader-election"))
    assert one(objs, "RoleBinding", "vllm-pool-epp-leader-election")["roleRef"]["name"] == "vllm-pool-epp-leader-election"


def test_active_active_turns_leader_election_off() -> None:
    objs = helm_template(set_values=[MATCH, "router.epp.replicas=2", "router.epp.flags.ha-enable-leader-election=false"])
    args = container(epp(objs))["args"]
    assert "--ha-enable-leader-election" not in args
    assert "--ha-enable-leader-election=false" in args
    parse_serve(args)


def test_upstream_router_values_file() -> None:
    objs = render("upstream-router")
    deployment = epp(objs)
    c = container(deployment)
    flags = epp_flags(objs)
    assert deployment["spec"]["replicas"] == 3
    assert "ha-enable-leader-election" in flags and probe_services(objs) == ("readiness", "liveness")
    assert c["image"] == "my-registry.io/my-epp:v1.2.3" and c["imagePullPolicy"] == "Always"
    assert flags["v"] == "3" and flags["secure-serving"] == "false"
    options, _ = parse_serve(c["args"])
    assert options.verbosity == 3 and options.secure_serving is False
    env = {e["name"]: e for e in c["env"]}
    assert env["FEATURE_FLAG_ENABLED"]["value"] == "true"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "16Gi"}, "limits": {"memory": "32Gi"}}
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeAffinity" in pod["spec"]["affinity"]
    assert {"name": "model-volume", "emptyDir": {}} in pod["spec"]["volumes"]
    assert {"mountPath": "/models", "name": "model-volume"} in c["volumeMounts"]
    # The custom config is the one passed, next to the default one.
    cm = one(objs, "ConfigMap")
    assert flags["config-file"] == "/config/custom-plugins.yaml"
    assert set(cm["data"]) == {"default-plugins.yaml", "custom-plugins.yaml"}
    assert [p["type"] for p in yaml.safe_load(cm["data"]["custom-plugins.yaml"])["plugins"]] == [
        "queue-scorer", "kv-cache-utilization-scorer"]
    # metricsDataSource and modelServers.type shape the default config as upstream's chart does.
    default = yaml.safe_load(cm["data"]["default-plugins.yaml"])
    plugins = {p["type"]: p.get("parameters") for p in default["plugins"]}
    assert plugins["metrics-data-source"]["scheme"] == "https"
    assert plugins["core-metrics-extractor"] == {"defaultEngine": "sglang"}
    assert load_config(cm["data"]["default-plugins.yaml"]).warnings == []
    # The pool: labels, two ports, FailClosed (upstream's README spelling) stored as the CRD's FailClose.
    pool = one(objs, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"] == {"app": "my-sglang-deployment"}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}, {"number": 8001}]
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
    objectives = {o["metadata"]["name"]: o["spec"] for o in by_kind(objs, "InferenceObjective")}
    assert objectives == {
        "high-priority": {"priority": 100, "poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "vllm-pool"}},
        "background-batch": {"priority": -10, "poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "vllm-pool"}},
    }
    assert all(o["apiVersion"] == "llm-d.ai/v1alpha2" for o in by_kind(objs, "InferenceObjective"))
    # Monitoring with auth: the ServiceMonitor sends the token, the Secret holds it, RBAC as upstream.
    monitor = one(objs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["interval"] == "30s"
    secret = one(objs, "Secret")
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "vllm-pool-epp"
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"]["name"] == secret["metadata"]["name"]
    assert role_rules(one(objs, "ClusterRole")) == {
        ("authentication.k8s.io", "tokenreviews", frozenset({"create"})),
        ("authorization.k8s.io", "subjectaccessreviews", frozenset({"create"})),
        ("", "/metrics", frozenset({"get"}))}
    # What this chart does not do is said, not silently dropped.
    assert "Ignored (not supported by this EPP or chart yet): router.tracing." in helm_notes(UPSTREAM)


def test_gaie_v15_values_file() -> None:
    objs = render("gaie-v1.5")
    c = container(epp(objs))
    flags = epp_flags(objs)
    assert epp(objs)["spec"]["replicas"] == 2
    assert "ha-enable-leader-election" in flags
    assert c["image"] == "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"
    assert flags["v"] == "1"
    assert {e["name"]: e.get("value") for e in c["env"]}["LOG_COLOR"] == "false"  # a name: value map
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "8Gi"}
    pool = one(objs, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"] == {"app": "vllm-llama3-8b-instruct"}
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
    assert [o["metadata"]["name"] for o in by_kind(objs, "InferenceObjective")] == ["high-priority"]
    assert not by_kind(objs, "ServiceMonitor")


def test_standalone_values_file() -> None:
    objs = render("standalone")
    flags = epp_flags(objs)
    assert flags["endpoint-selector"] == "app=my-model-service,tier=gpu"
    assert flags["endpoint-target-ports"] == "8000,8002"
    assert "pool-name" not in flags
    assert not by_kind(objs, "InferencePool")
    assert role_rules(one(objs, "Role")) == {("", "pods", READ)}
    assert epp(objs)["spec"]["selector"]["matchLabels"] == {"llm-d-router-standalone": "vllm-pool-epp"}


def test_release_name_and_namespace_name_everything() -> None:
    objs = helm_template(set_values=[MATCH, "router.epp.extProcPort=9102"], release="llama", namespace="prod")
    assert {o["metadata"]["name"] for o in objs if o["kind"] != "InferencePool"} == {"llama-epp"}
    assert {o["metadata"]["namespace"] for o in objs} == {"prod"}
    flags = epp_flags(objs)
    assert (flags["pool-name"], flags["pool-namespace"], flags["grpc-port"]) == ("llama", "prod", "9102")
    pool = one(objs, "InferencePool", "llama")
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] == 9102
    service = one(objs, "Service")
    assert {"name": "grpc-ext-proc", "protocol": "TCP", "port": 9102, "targetPort": "grpc"} in service["spec"]["ports"]


def test_image_as_a_string_env_as_a_map_and_a_structured_config() -> None:
    objs = helm_template(set_values=[
        MATCH, "router.epp.image=ghcr.io/example/epp:1.0", "router.epp.env.EXTRA=yes",
        "router.epp.pluginsConfig.apiVersion=llm-d.ai/v1alpha1", "router.epp.pluginsConfig.kind=EndpointPickerConfig",
        "router.epp.pluginsConfig.plugins[0].type=random-picker",
        "router.epp.pluginsConfig.schedulingProfiles[0].name=default",
        "router.epp.pluginsConfig.schedulingProfiles[0].plugins[0].pluginRef=random-picker",
    ])
    c = container(epp(objs))
    assert c["image"] == "ghcr.io/example/epp:1.0"
    assert {"name": "EXTRA", "value": "yes"} in c["env"]
    # pluginsConfig with the default file name replaces the default config.
    config = one(objs, "ConfigMap")["data"]["default-plugins.yaml"]
    assert load_config(config).warnings == []
    assert yaml.safe_load(config)["plugins"] == [{"type": "random-picker"}]


BAD_VALUES = [
    ((), "router.modelServers.matchLabels is required"),
    ((MATCH, "router.modelServers.protocol=grpc"), "needs a gRPC request parser"),
    ((MATCH, "router.modelServers.type=triton"), 'router.modelServers.type "triton" is not supported'),
    ((MATCH, *(f"router.modelServers.targetPorts[{i}].number={8000 + i}" for i in range(9))), "1 to 8 ports, got 9"),
    ((MATCH, "router.modelServers.targetPorts[0].number=8000", "router.modelServers.targetPorts[1].number=8000"),
     "targetPorts[1].number 8000 is listed twice"),
    ((MATCH, "router.modelServers.targetPorts[0].number=70000"), "targetPorts[0].number must be a port number"),
    ((MATCH, "router.inferencePool.failureMode=Sometimes"), 'failureMode "Sometimes": use FailOpen or FailClose'),
    ((MATCH, "router.inferencePool.create=false", "router.inferenceObjectives[0].name=x"), "need an InferencePool"),
    ((MATCH, "router.epp.pluginsConfigFile=mine.yaml"), 'pluginsConfigFile "mine.yaml" is not in the ConfigMap'),
    ((MATCH, "router.epp.parser=anthropic-parser"), "this EPP has openai-parser"),
]


@pytest.mark.parametrize(("sets", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_bad_values_fail_with_a_message_naming_the_value(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RenderError) as e:
        helm_template(set_values=sets)
    assert message in str(e.value)

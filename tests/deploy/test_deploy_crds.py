"""The CRDs in deploy/kubernetes/crds: valid CustomResourceDefinitions with structural schemas, and
schemas that accept what upstream's API accepts and reject what it rejects (checked the way the
API server checks: defaults, the OpenAPI schema with unknown fields rejected, the CEL rules)."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
from k8s_manifests import CRD_DIR, CustomResourceValidator, kustomize, load_crds, structural_errors, validate_builtin, version_schema

CRDS = load_crds()
EXPECTED = {
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("llm-d.ai/v1alpha2", "InferenceObjective"),
    ("llm-d.ai/v1alpha2", "InferenceModelRewrite"),
}


def test_the_three_crds_and_the_kustomization_lists_them() -> None:
    assert set(CRDS) == EXPECTED
    rendered = kustomize(CRD_DIR)
    assert sorted(o["metadata"]["name"] for o in rendered) == sorted(c["metadata"]["name"] for c in CRDS.values())


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: k[1])
def test_crd_is_a_valid_kubernetes_object(key: tuple[str, str]) -> None:
    crd = CRDS[key]
    assert validate_builtin(crd) == []
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["scope"] == "Namespaced"
    assert [v["name"] for v in spec["versions"] if v["storage"]] == [key[0].split("/")[1]]
    assert all(v["served"] and v["subresources"] == {"status": {}} for v in spec["versions"])
    if spec["group"].endswith(".k8s.io"):  # the API server refuses *.k8s.io CRDs without it
        assert crd["metadata"]["annotations"]["api-approved.kubernetes.io"].startswith("https://")


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: k[1])
def test_crd_schema_is_structural(key: tuple[str, str]) -> None:
    assert structural_errors(version_schema(CRDS[key], key[0])) == []


def test_the_structural_checker_catches_what_the_api_server_refuses() -> None:
    # The check above is only worth something if it fails on bad schemas.
    bad = {
        "type": "object",
        "properties": {
            "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}},
            "spec": {"type": "object", "properties": {"a": {"description": "no type"}},
                     "additionalProperties": {"type": "string"}},
            "list": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "ref": {"$ref": "#/definitions/x"},
            "port": {"type": "integer", "default": "http"},
            "mode": {"type": "string", "enum": ["A", 1]},
            "cel": {"type": "object", "x-kubernetes-validations": [{"rule": "self.a ==", "message": "m"}]},
            "lm": {"type": "array", "maxItems": 2, "x-kubernetes-list-type": "map",
                   "x-kubernetes-list-map-keys": ["k"], "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
        },
    }
    found = "\n".join(structural_errors(bad))
    for fragment in ("metadata: only restrictions", "spec.a: no type", "mutually exclusive", "uniqueItems",
                     "unbounded list", "$ref is not allowed", "spec.a: no type", "port: default 'http'",
                     "enum value 1", "does not compile", "must be required or defaulted"):
        assert fragment in found, fragment


# ----------------------------------------------------------------------------- objects

POOL = {
    "apiVersion": "inference.networking.k8s.io/v1",
    "kind": "InferencePool",
    "metadata": {"name": "vllm-pool", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "vllm-llama3-8b-instruct", "llm-d.ai/role": "decode"}},
        "targetPorts": [{"number": 8000}, {"number": 8001}],
        "endpointPickerRef": {"name": "vllm-pool-epp", "port": {"number": 9002}},
    },
}
OBJECTIVE = {
    "apiVersion": "llm-d.ai/v1alpha2",
    "kind": "InferenceObjective",
    "metadata": {"name": "batch"},
    "spec": {"priority": -1, "poolRef": {"name": "vllm-pool"}},
}
REWRITE = {
    "apiVersion": "llm-d.ai/v1alpha2",
    "kind": "InferenceModelRewrite",
    "metadata": {"name": "canary"},
    "spec": {
        "poolRef": {"name": "vllm-pool"},
        "rules": [
            {"matches": [{"model": {"value": "llama"}}],
             "targets": [{"modelRewrite": "meta-llama/Llama-3.1-8B-Instruct", "weight": 90},
                         {"modelRewrite": "sql-lora", "weight": 10}]},
            {"targets": [{"modelRewrite": "meta-llama/Llama-3.1-8B-Instruct"}]},  # no matches = every request
        ],
    },
}
CONDITION = {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
             "lastTransitionTime": "2026-01-02T03:04:05Z", "observedGeneration": 1}


def test_valid_objects_pass_and_get_upstream_defaults(crs: CustomResourceValidator) -> None:
    for obj in (POOL, OBJECTIVE, REWRITE):
        assert crs.errors(obj) == [], obj["kind"]
    pool = crs.defaulted(POOL)["spec"]
    assert pool["appProtocol"] == "http"
    assert pool["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "vllm-pool-epp",
                                         "port": {"number": 9002}, "failureMode": "FailClose"}
    assert crs.defaulted(OBJECTIVE)["spec"]["poolRef"] == {
        "group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "vllm-pool"}
    assert crs.defaulted(REWRITE)["spec"]["rules"][0]["matches"][0]["model"]["type"] == "Exact"


def test_status_written_by_a_gateway_validates(crs: CustomResourceValidator) -> None:
    pool = copy.deepcopy(POOL)
    pool["status"] = {"parents": [{
        "parentRef": {"name": "inference-gateway", "namespace": "gateway-infra"},
        "controllerName": "gateway.envoyproxy.io/gatewayclass-controller",
        "conditions": [CONDITION, {**CONDITION, "type": "ResolvedRefs"}],
    }]}
    assert crs.errors(pool) == []
    assert crs.defaulted(pool)["status"]["parents"][0]["parentRef"]["kind"] == "Gateway"
    objective = {**OBJECTIVE, "status": {"conditions": [{**CONDITION, "lastTransitionTime": "yesterday"}]}}
    assert any("date-time" in e for e in crs.errors(objective))


def test_minimal_pool_without_endpoint_picker_ref_is_valid(crs: CustomResourceValidator) -> None:
    # endpointPickerRef is optional since v1.5; a non-Service kind needs no port.
    pool = copy.deepcopy(POOL)
    del pool["spec"]["endpointPickerRef"]
    assert crs.errors(pool) == []
    pool["spec"]["endpointPickerRef"] = {"group": "example.com", "kind": "Picker", "name": "p"}
    assert crs.errors(pool) == []


def _edit(base: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    change(obj)
    return obj


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("duplicate target port", _edit(POOL, lambda o: o["spec"]["targetPorts"].append({"number": 8000})),
     "port number must be unique"),
    ("nine target ports", _edit(POOL, lambda o: o["spec"].update(targetPorts=[{"number": 8000 + i} for i in range(9)])),
     "is too long"),
    ("no target ports", _edit(POOL, lambda o: o["spec"].update(targetPorts=[])), "should be non-empty"),
    ("port 0", _edit(POOL, lambda o: o["spec"]["targetPorts"][0].update(number=0)), "less than the minimum"),
    ("port 65536", _edit(POOL, lambda o: o["spec"]["targetPorts"][0].update(number=65536)), "greater than the maximum"),
    ("no selector", _edit(POOL, lambda o: o["spec"].pop("selector")), "'selector' is a required property"),
    ("empty matchLabels", _edit(POOL, lambda o: o["spec"]["selector"].update(matchLabels={})), "should be non-empty"),
    ("matchExpressions", _edit(POOL, lambda o: o["spec"]["selector"].update(matchExpressions=[])),
     "Additional properties are not allowed ('matchExpressions'"),
    ("bad label value", _edit(POOL, lambda o: o["spec"]["selector"]["matchLabels"].update(app="-x")), "does not match"),
    ("legacy v1alpha2 field", _edit(POOL, lambda o: o["spec"].update(targetPortNumber=8000)),
     "Additional properties are not allowed ('targetPortNumber'"),
    ("appProtocol grpc", _edit(POOL, lambda o: o["spec"].update(appProtocol="grpc")), "is not one of"),
    ("failureMode FailClosed", _edit(POOL, lambda o: o["spec"]["endpointPickerRef"].update(failureMode="FailClosed")),
     "is not one of"),
    ("Service without port", _edit(POOL, lambda o: o["spec"]["endpointPickerRef"].pop("port")),
     "port is required when kind is 'Service'"),
    ("objective without poolRef", _edit(OBJECTIVE, lambda o: o["spec"].pop("poolRef")), "'poolRef' is a required"),
    ("objective priority as text", _edit(OBJECTIVE, lambda o: o["spec"].update(priority="high")), "is not of type 'integer'"),
    ("objective poolRef without name", _edit(OBJECTIVE, lambda o: o["spec"]["poolRef"].pop("name")), "'name' is a required"),
    ("rewrite mixes weighted and unweighted targets",
     _edit(REWRITE, lambda o: o["spec"]["rules"][0]["targets"][1].pop("weight")), "give every target a weight, or none"),
    ("rewrite weight 0", _edit(REWRITE, lambda o: o["spec"]["rules"][0]["targets"][0].update(weight=0)),
     "less than the minimum"),
    ("rewrite without targets", _edit(REWRITE, lambda o: o["spec"]["rules"][0].update(targets=[])), "should be non-empty"),
    ("rewrite match type Regex", _edit(REWRITE, lambda o: o["spec"]["rules"][0]["matches"][0]["model"].update(type="Regex")),
     "is not one of"),
    ("rewrite without rules", _edit(REWRITE, lambda o: o["spec"].pop("rules")), "'rules' is a required"),
]


@pytest.mark.parametrize(("obj", "message"), [(o, m) for _, o, m in INVALID], ids=[n for n, _, _ in INVALID])
def test_invalid_objects_are_rejected_with_a_message(crs: CustomResourceValidator, obj: dict[str, Any], message: str) -> None:
    errors = crs.errors(obj)
    assert any(message in e for e in errors), errors



def test_kubernetes_schema_check_catches_a_misspelled_keyword() -> None:
    crd = copy.deepcopy(CRDS[("inference.networking.k8s.io/v1", "InferencePool")])
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["targetPorts"]["maxitems"] = 8
    assert any("'maxitems' was unexpected" in e for e in validate_builtin(crd))

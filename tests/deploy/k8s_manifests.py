"""Render and validate the Kubernetes manifests in deploy/kubernetes, for the tests beside it.

- `kustomize(dir)` and `helm_template(...)` run the real tools (`kubectl kustomize`, `helm
  template`; installed into the venv by deploy/kubernetes/install_tools.py).
- `validate_builtin(obj)` checks built-in kinds against the Kubernetes OpenAPI schemas shipped
  by kubernetes-validate, in strict mode (an unknown field is an error, as `kubectl apply
  --validate=strict` makes it), for the oldest and the newest Kubernetes we support.
- `CustomResourceValidator` checks custom resources the way the API server would with our
  CRDs: defaults applied, the OpenAPI v3 schema (unknown fields rejected), then every
  `x-kubernetes-validations` CEL rule evaluated with cel-python.
- `structural_errors(schema)` lists violations of the API server's structural-schema rules.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import celpy
import jsonschema
import referencing
import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
CHART = K8S / "charts" / "epp"
CRD_DIR = K8S / "crds"
VALUES_DIR = Path(__file__).resolve().parent / "values"
BIN = Path(sys.executable).parent
KUBE_VERSIONS = ("1.29.0", "1.37.0")  # the chart's kubeVersion floor, and the newest schemas we have

Obj = dict[str, Any]


class RenderError(Exception):
    pass


def _run(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RenderError(r.stderr.strip() or r.stdout.strip())
    return r.stdout


def documents(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


@functools.cache
def _kustomize(path: str) -> str:
    return _run([str(BIN / "kubectl"), "kustomize", path])


def kustomize(directory: Path) -> list[Obj]:
    return documents(_kustomize(str(directory)))


@functools.cache
def _helm(args: tuple[str, ...]) -> str:
    return _run([str(BIN / "helm"), *args])


def helm_template(*values_files: Path, set_values: Iterable[str] = (), release: str = "vllm-pool",
                  namespace: str = "team-a") -> list[Obj]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for f in values_files:
        args += ["--values", str(f)]
    for s in set_values:
        args += ["--set", s]
    return documents(_helm(tuple(args)))


def helm_notes(*values_files: Path, set_values: Iterable[str] = ()) -> str:
    args = ["install", "vllm-pool", str(CHART), "--dry-run=client", "--namespace", "team-a"]
    for f in values_files:
        args += ["--values", str(f)]
    for s in set_values:
        args += ["--set", s]
    out = _helm(tuple(args))
    return out.split("NOTES:", 1)[1] if "NOTES:" in out else ""


def helm_lint(*values_files: Path, set_values: Iterable[str] = ()) -> str:
    args = ["lint", "--strict", str(CHART)]
    for f in values_files:
        args += ["--values", str(f)]
    for s in set_values:
        args += ["--set", s]
    return _helm(tuple(args))


# ----------------------------------------------------------------------------- finding objects


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(deployment: Obj, name: str | None = None) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def flag_values(args: list[str]) -> dict[str, str | None]:
    """`--name=value` and `--name value` -> {name: value}; bare `--name` -> {name: None}."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            if eq:
                out[name] = value
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[name] = args[i + 1]
                i += 1
            else:
                out[name] = None
        i += 1
    return out


def expand_env(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in container args."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def role_rules(role: Obj) -> set[tuple[str, str, frozenset[str]]]:
    """(apiGroup, resource or nonResourceURL, verbs) for every rule of a Role/ClusterRole."""
    out = set()
    for rule in role["rules"]:
        verbs = frozenset(rule["verbs"])
        for group in rule.get("apiGroups", [""]):
            for res in rule.get("resources", []):
                out.add((group, res, verbs))
        for url in rule.get("nonResourceURLs", []):
            out.add(("", url, verbs))
    return out


def label_selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ----------------------------------------------------------------------------- built-in kinds


@functools.cache
def _definitions(version: str) -> referencing.Registry:
    defs = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    return referencing.Resource.from_contents(defs) @ referencing.Registry()


@functools.cache
def _builtin_validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/{kind.lower()}-{group_version}.json",
                                version)
    registry = referencing.Resource.from_contents(schema) @ _definitions(version)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_builtin(obj: Obj) -> list[str]:
    errors = []
    for version in KUBE_VERSIONS:
        try:
            validator = _builtin_validator(version, obj["kind"], obj["apiVersion"])
        except FileNotFoundError:
            return [f"{obj['kind']} {obj['apiVersion']}: no Kubernetes {version} schema (not a built-in kind)"]
        for e in validator.iter_errors(obj):
            errors.append(f"k8s {version} {obj['kind']}/{obj['metadata'].get('name')} "
                          f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
    return errors


# ----------------------------------------------------------------------------- CRDs


def load_crds() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> CRD, for every CRD file in deploy/kubernetes/crds."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") != "CustomResourceDefinition":
            continue
        for version in doc["spec"]["versions"]:
            out[(f"{doc['spec']['group']}/{version['name']}", doc["spec"]["names"]["kind"])] = doc
    return out


def version_schema(crd: Obj, api_version: str) -> Obj:
    name = api_version.split("/")[1]
    return next(v for v in crd["spec"]["versions"] if v["name"] == name)["schema"]["openAPIV3Schema"]


_FORBIDDEN = {"$ref", "definitions", "dependencies", "patternProperties", "additionalItems", "id", "$schema"}
_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def structural_errors(schema: Obj, path: str = "", root: bool = True) -> list[str]:
    """The rules the API server enforces on apiextensions.k8s.io/v1 schemas ("structural schemas"),
    plus ours: every list and map is bounded (maxItems/maxProperties), so CEL cost is bounded."""
    errs: list[str] = []
    at = path or "<root>"
    special = schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
    if not schema.get("type") and not special:
        errs.append(f"{at}: no type")
    if root and schema.get("type") != "object":
        errs.append(f"{at}: the root must be an object")
    for key in _FORBIDDEN & set(schema):
        errs.append(f"{at}: {key} is not allowed")
    if schema.get("uniqueItems") is True:
        errs.append(f"{at}: uniqueItems must not be true")
    if "properties" in schema and "additionalProperties" in schema:
        errs.append(f"{at}: properties and additionalProperties are mutually exclusive")
    for junctor in _JUNCTORS:
        subs = schema.get(junctor)
        for sub in subs if isinstance(subs, list) else [subs] if subs is not None else []:
            for key in ("type", "default", "additionalProperties", "nullable", "description"):
                if key in sub:
                    errs.append(f"{at}.{junctor}: {key} is not allowed inside {junctor}")
    type_ = schema.get("type")
    if type_ == "array":
        items = schema.get("items")
        if not isinstance(items, dict):
            errs.append(f"{at}: an array needs one items schema")
        else:
            errs += structural_errors(items, f"{path}[]", root=False)
        if "maxItems" not in schema:
            errs.append(f"{at}: unbounded list (set maxItems)")
        list_type = schema.get("x-kubernetes-list-type")
        if list_type not in (None, "atomic", "set", "map"):
            errs.append(f"{at}: x-kubernetes-list-type {list_type!r}")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            if not keys or not isinstance(items, dict) or items.get("type") != "object":
                errs.append(f"{at}: a map list needs object items and x-kubernetes-list-map-keys")
            else:
                for key in keys:
                    prop = items.get("properties", {}).get(key)
                    if prop is None or prop.get("type") not in ("string", "integer", "number", "boolean"):
                        errs.append(f"{at}: list-map key {key!r} must be a scalar property")
                    elif key not in items.get("required", []) and "default" not in prop:
                        errs.append(f"{at}: list-map key {key!r} must be required or defaulted")
        elif "x-kubernetes-list-map-keys" in schema:
            errs.append(f"{at}: x-kubernetes-list-map-keys without x-kubernetes-list-type: map")
    elif "items" in schema:
        errs.append(f"{at}: items on a non-array")
    if type_ == "object":
        props = schema.get("properties", {})
        for name, sub in props.items():
            sub_path = f"{path}.{name}" if path else name
            if root and name == "metadata":
                extra = set(sub) - {"type", "properties", "description"}
                if extra or set(sub.get("properties", {})) - {"name", "generateName"}:
                    errs.append("metadata: only restrictions on name and generateName are allowed")
                continue
            errs += structural_errors(sub, sub_path, root=False)
        extra_schema = schema.get("additionalProperties")
        if isinstance(extra_schema, dict):
            errs += structural_errors(extra_schema, f"{path}.*", root=False)
            if "maxProperties" not in schema:
                errs.append(f"{at}: unbounded map (set maxProperties)")
        for name in schema.get("required", []):
            if name not in props:
                errs.append(f"{at}: required {name!r} is not a property")
    if "default" in schema:
        errs += [f"{at}: default {schema['default']!r}: {e.message}"
                 for e in _node_validator(schema).iter_errors(schema["default"])]
    if "enum" in schema and type_ in _PY_TYPES:
        errs += [f"{at}: enum value {v!r} is not a {type_}" for v in schema["enum"] if not isinstance(v, _PY_TYPES[type_])]
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            _cel_program(rule["rule"])
        except Exception as e:  # noqa: BLE001 - any compile failure is the finding
            errs.append(f"{at}: CEL rule {rule['rule']!r} does not compile: {e}")
        if not rule.get("message"):
            errs.append(f"{at}: CEL rule {rule['rule']!r} has no message")
    return errs


# jsonschema checks "date-time" only with an optional package; the API server checks RFC 3339.
FORMATS = jsonschema.FormatChecker()
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.match(value):
        return False
    datetime.fromisoformat(value.upper().replace("Z", "+00:00"))  # a real date and time
    return True


_PY_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def to_json_schema(schema: Obj, strict: bool = True) -> Obj:
    """An OpenAPI v3 CRD schema as a JSON schema. strict: unknown fields are errors (as with
    `kubectl apply --validate=strict`) instead of being pruned."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k not in ("default", "nullable")}
    if "properties" in out:
        out["properties"] = {k: to_json_schema(v, strict) for k, v in out["properties"].items()}
        if strict and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"], strict)
    if isinstance(out.get("items"), dict):
        out["items"] = to_json_schema(out["items"], strict)
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    return out


def _node_validator(schema: Obj) -> jsonschema.Validator:
    return jsonschema.Draft7Validator(to_json_schema(schema, strict=False), format_checker=FORMATS)


@functools.cache
def _cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def apply_defaults(value: Any, schema: Obj) -> Any:
    """What the API server stores: missing fields with a default get it (recursively)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(out[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in set(out) - set(schema.get("properties", {})):
                out[name] = apply_defaults(out[name], extra)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


def cel_errors(value: Any, schema: Obj, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule where its node is present, `self` = the node."""
    errs = []
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            result = _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as e:  # the API server rejects the object when a rule errors, too
            errs.append(f"{path or '<root>'}: {rule['message']} (evaluation error: {e})")
            continue
        if not isinstance(result, celpy.celtypes.BoolType) or not result:
            errs.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errs += cel_errors(value[name], sub, f"{path}.{name}" if path else name)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errs += cel_errors(item, schema["items"], f"{path}[{i}]")
    return errs


@dataclass
class CustomResourceValidator:
    crds: dict[tuple[str, str], Obj] = field(default_factory=load_crds)

    def knows(self, obj: Obj) -> bool:
        return (obj.get("apiVersion"), obj.get("kind")) in self.crds

    def schema(self, obj: Obj) -> Obj:
        return version_schema(self.crds[(obj["apiVersion"], obj["kind"])], obj["apiVersion"])

    def defaulted(self, obj: Obj) -> Obj:
        return apply_defaults(obj, self.schema(obj))

    def errors(self, obj: Obj) -> list[str]:
        schema = self.schema(obj)
        stored = apply_defaults(obj, schema)
        validator = jsonschema.Draft7Validator(to_json_schema(schema), format_checker=FORMATS)
        errs = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(stored)]
        return errs or cel_errors(stored, schema)


def validate_all(objs: list[Obj], crs: CustomResourceValidator) -> list[str]:
    """Every object: built-in kinds against Kubernetes' schemas, our custom resources against
    our CRDs. Anything else (e.g. a ServiceMonitor) is listed, so a test must name it."""
    errors = []
    for obj in objs:
        if crs.knows(obj):
            errors += [f"{obj['kind']}/{obj['metadata']['name']} {e}" for e in crs.errors(obj)]
        else:
            errors += validate_builtin(obj)
    return errors


def dump(objs: list[Obj]) -> str:
    return json.dumps(objs, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------- the EPP's own CLI

def parse_serve(argv: list[str]) -> tuple[Any, argparse.Namespace]:
    """`epp serve ARGS` through the real parser and the server's own option validation."""
    from epp import cli as epp_cli

    assert argv and argv[0] == "serve", argv
    args = epp_cli.build_parser().parse_args(argv)
    ignored = set(getattr(args, "ignored_flags", []))
    assert not ignored, f"flags the EPP ignores: {sorted(ignored)}"
    return epp_cli.serve_options(args), args


def parse_sim(argv: list[str]) -> Any:
    """`epp sim ARGS` through the real parser and the sim's own validation; returns the fleet."""
    from epp.sim import cli as sim_cli

    assert argv and argv[0] == "sim", argv
    parser = argparse.ArgumentParser(prog="epp sim", allow_abbrev=False)
    sim_cli.add_arguments(parser)
    return sim_cli.build_fleet(parser.parse_args(argv[1:]))

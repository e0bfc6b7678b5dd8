"""The typed shape of an EndpointPickerConfig document and its strict decoder.

Decoding is strict like upstream's (unknown or mistyped fields are errors, each naming
its path) and collects every problem instead of stopping at the first. ``parameters``
blocks stay free-form here: each plugin's ``Params`` dataclass decodes its own.

Accepted beyond upstream (extensions, documented in the README):

- ``data:`` as a synonym of ``dataLayer:`` (older upstream releases and our docs used it);
  giving both is an error.
- ``discovery: {pluginRef}`` either at the top level (newest upstream) or inside the data
  layer section (older upstream); both is an error.
- ``inferenceObjectives: [{name, priority}]``: stands in for the InferenceObjective CRD,
  mapping the ``x-gateway-inference-objective`` header value to a priority.
- ``modelRewrites: [{name?, match: <model>, targets: [{model, weight}]}]``: stands in for
  the InferenceModelRewrite CRD (weighted choice of the model sent upstream).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from epp.config.errors import Problems
from epp.config.model import API_VERSIONS, KIND
from epp.config.quantity import parse_quantity
from epp.framework.durations import parse_duration

CURRENT_API_VERSION = API_VERSIONS[0]
DEPRECATED_API_VERSION = API_VERSIONS[1]

FEATURE_GATES = ("dataLayer", "enableLegacyMetrics", "flowControl")

# Flow-control defaults (upstream §2.1; the numbers live with the controller).
DEFAULT_FAIRNESS_POLICY = "global-strict-fairness-policy"
DEFAULT_ORDERING_POLICY = "fcfs-ordering-policy"
DEFAULT_USAGE_LIMIT_POLICY = "static-usage-limit-policy"

_TOP_LEVEL = (
    "apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "saturationDetector",
    "dataLayer", "data", "flowControl", "parser", "discovery", "inferenceObjectives", "modelRewrites",
)
# Fields older upstream releases had, with what replaced them: turns "unknown field" into advice.
_REMOVED_HINTS = {
    ("saturationDetector", "queueDepthThreshold"): "set it in the parameters of the utilization-detector plugin",
    ("saturationDetector", "kvCacheUtilThreshold"): "set it in the parameters of the utilization-detector plugin",
    ("saturationDetector", "metricsStalenessThreshold"): "use the --metrics-staleness-threshold flag",
    ("", "requestHandler"): "use 'parser: {pluginRef: ...}'",
}


# ----------------------------------------------------------------------------- the spec


@dataclass
class PluginEntry:
    index: int
    name: str
    type: str
    parameters: Any = None
    has_parameters: bool = False
    added_because: str = ""  # set for plugins the loader added as a system default

    @property
    def path(self) -> str:
        return f"plugins[{self.index}]"

    def label(self) -> str:
        return f"plugin '{self.name}' (type '{self.type}')"


@dataclass
class ProfileRef:
    path: str
    ref: str
    weight: float | None = None  # None = not given


@dataclass
class Profile:
    path: str
    name: str
    refs: list[ProfileRef] = field(default_factory=list)
    added_by_default: bool = False


@dataclass
class SourceEntry:
    path: str
    ref: str
    extractors: list[tuple[str, str]] = field(default_factory=list)  # (path, ref)


@dataclass
class DataLayerSpec:
    key: str = "dataLayer"  # the key the user wrote ("data" is accepted too)
    given: bool = False
    inject_defaults: bool = True
    inject_given: bool = False
    sources: list[SourceEntry] = field(default_factory=list)
    discovery_ref: str | None = None
    discovery_path: str = ""
    discovery_top_level: bool = False


@dataclass
class PriorityBand:
    path: str
    priority: int = 0
    max_bytes: int | None = None
    max_requests: int | None = None
    fairness_ref: str | None = None
    ordering_ref: str | None = None


@dataclass
class FlowControlSpec:
    max_bytes: int | None = None
    max_requests: int | None = None
    default_request_ttl: float | None = None  # None = 60s; 0 = never expire
    no_endpoint_ttl: float | None = None  # None = defaultRequestTTL
    default_band: PriorityBand | None = None
    negative_band: PriorityBand | None = None
    bands: list[PriorityBand] = field(default_factory=list)
    usage_limit_ref: str | None = None
    saturation_ref: str | None = None
    enable_eviction: bool = False


@dataclass
class ObjectiveEntry:
    path: str
    name: str
    priority: int


@dataclass
class RewriteEntry:
    path: str
    name: str | None
    match: str
    targets: list[tuple[str, int]]


@dataclass
class ConfigSpec:
    recognized: bool = True  # False when apiVersion/kind say this is not an EndpointPickerConfig
    api_version: str = CURRENT_API_VERSION
    kind: str = KIND
    feature_gates: list[str] = field(default_factory=list)
    plugins: list[PluginEntry] = field(default_factory=list)
    # Names of plugin entries too broken to create: references to them are not reported again.
    broken_names: set[str] = field(default_factory=set)
    profiles: list[Profile] = field(default_factory=list)
    saturation_ref: str | None = None
    saturation_path: str = "saturationDetector.pluginRef"
    parser_ref: str | None = None
    data_layer: DataLayerSpec = field(default_factory=DataLayerSpec)
    flow_control: FlowControlSpec | None = None
    objectives: list[ObjectiveEntry] = field(default_factory=list)
    rewrites: list[RewriteEntry] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers


def describe(value: Any) -> str:
    """A short description of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    kind = {"str": "string", "int": "integer", "float": "number"}.get(type(value).__name__, type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}"


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


class _Reader:
    """Typed field access that records a path-named error instead of raising."""

    def __init__(self, problems: Problems) -> None:
        self.p = problems

    def mapping(self, value: Any, path: str) -> dict | None:
        if isinstance(value, dict):
            return value
        self.p.error(path, f"expected a mapping, got {describe(value)}")
        return None

    def sequence(self, value: Any, path: str) -> list | None:
        if value is None:
            return []
        if isinstance(value, list):
            return value
        self.p.error(path, f"expected a list, got {describe(value)}")
        return None

    def fields(self, m: dict, path: str, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        for k in m:
            if k in allowed:
                continue
            where = path or "(top level)"
            hint = _REMOVED_HINTS.get((path, k)) if isinstance(k, str) else None
            suffix = f" (no longer supported: {hint})" if hint else f"; known fields: {', '.join(allowed)}"
            self.p.error(where, f"unknown field {k!r}{suffix}")

    def string(self, m: dict, key: str, path: str, *, required: bool = False, what: str = "") -> str | None:
        if key not in m or m[key] is None:
            if required:
                self.p.error(path, what or f"missing required field '{key}'")
            return None
        value = m[key]
        if not isinstance(value, str):
            self.p.error(join(path, key), f"expected a string, got {describe(value)}")
            return None
        if required and not value:
            self.p.error(path, what or f"field '{key}' must not be empty")
            return None
        return value

    def boolean(self, m: dict, key: str, path: str) -> bool | None:
        value = m.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.p.error(join(path, key), f"expected a boolean, got {describe(value)}")
            return None
        return value

    def integer(self, m: dict, key: str, path: str, *, lo: int = -(2**31), hi: int = 2**31 - 1) -> int | None:
        value = m.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.p.error(join(path, key), f"expected an integer, got {describe(value)}")
            return None
        if not lo <= value <= hi:
            self.p.error(join(path, key), f"{value} is out of range [{lo}, {hi}]")
            return None
        return value

    def number(self, m: dict, key: str, path: str) -> float | None:
        value = m.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.p.error(join(path, key), f"expected a number, got {describe(value)}")
            return None
        value = float(value)
        if not math.isfinite(value):
            self.p.error(join(path, key), f"expected a finite number, got {value}")
            return None
        return value

    def parsed(self, m: dict, key: str, path: str, parse: Callable[[Any], Any]) -> Any:
        value = m.get(key)
        if value is None:
            return None
        try:
            return parse(value)
        except (ValueError, TypeError, ArithmeticError) as e:
            self.p.error(join(path, key), str(e))
            return None

    def ref(self, value: Any, path: str) -> str | None:
        """A ``{pluginRef: name}`` block."""
        m = self.mapping(value, path)
        if m is None:
            return None
        self.fields(m, path, ("pluginRef",))
        return self.string(m, "pluginRef", path, required=True, what="is missing a 'pluginRef'")


# ----------------------------------------------------------------------------- decoder


def decode(doc: Any, problems: Problems) -> ConfigSpec:
    """Strictly decode a parsed document into a ConfigSpec, recording every problem."""
    r = _Reader(problems)
    spec = ConfigSpec()
    top = r.mapping(doc, "(top level)")
    if top is None:
        spec.recognized = False
        return spec
    r.fields(top, "", _TOP_LEVEL)

    api = r.string(top, "apiVersion", "", required=True, what="missing required field 'apiVersion'")
    if api is None:
        spec.recognized = False
    else:
        if api not in API_VERSIONS:
            problems.error("apiVersion", f"unsupported apiVersion {api!r}; expected one of {', '.join(API_VERSIONS)}")
            spec.recognized = False
        else:
            spec.api_version = api
            if api == DEPRECATED_API_VERSION:
                problems.warn("apiVersion", f"'{api}' is deprecated; use '{CURRENT_API_VERSION}'")
    kind = r.string(top, "kind", "", required=True, what="missing required field 'kind'")
    if kind is not None and kind != KIND:
        problems.error("kind", f"unsupported kind {kind!r}; expected '{KIND}'")
    if kind != KIND:
        spec.recognized = False

    _decode_gates(r, top, spec, problems)
    _decode_plugins(r, top, spec, problems)
    _decode_profiles(r, top, spec, problems)
    if "saturationDetector" in top and top["saturationDetector"] is not None:
        sd = r.mapping(top["saturationDetector"], "saturationDetector")
        if sd is not None:
            r.fields(sd, "saturationDetector", ("pluginRef",))
            spec.saturation_ref = r.string(sd, "pluginRef", "saturationDetector")
            if spec.saturation_ref == "":
                problems.error("saturationDetector.pluginRef", "saturation detector plugin reference is empty")
                spec.saturation_ref = None
    if "parser" in top and top["parser"] is not None:
        spec.parser_ref = r.ref(top["parser"], "parser")
    _decode_data_layer(r, top, spec, problems)
    if top.get("flowControl") is not None:
        spec.flow_control = _decode_flow_control(r, top["flowControl"], problems)
        _flow_control_gate(spec, problems)
    _decode_objectives(r, top, spec, problems)
    _decode_rewrites(r, top, spec, problems)
    return spec


def _decode_gates(r: _Reader, top: dict, spec: ConfigSpec, problems: Problems) -> None:
    gates = r.sequence(top.get("featureGates"), "featureGates") or []
    for i, g in enumerate(gates):
        path = f"featureGates[{i}]"
        if not isinstance(g, str):
            problems.error(path, f"expected a string, got {describe(g)}")
        elif g not in FEATURE_GATES:
            problems.error(path, f"feature gate '{g}' is unknown or unregistered; known gates: {', '.join(FEATURE_GATES)}")
        elif g not in spec.feature_gates:
            spec.feature_gates.append(g)
            if g == "enableLegacyMetrics":
                problems.warn(path, "this EPP has no legacy metrics poller: the data layer's default metrics source "
                                    "is used instead (set dataLayer.injectDefaults: false to opt out)")
    if os.environ.get("ENABLE_EXPERIMENTAL_FLOW_CONTROL_LAYER", "").lower() == "true" and "flowControl" not in spec.feature_gates:
        spec.feature_gates.append("flowControl")
        problems.warn("featureGates", "ENABLE_EXPERIMENTAL_FLOW_CONTROL_LAYER=true is deprecated; add the 'flowControl' feature gate instead")


def _decode_plugins(r: _Reader, top: dict, spec: ConfigSpec, problems: Problems) -> None:
    items = r.sequence(top.get("plugins"), "plugins") or []
    seen: dict[str, str] = {}
    for i, item in enumerate(items):
        path = f"plugins[{i}]"
        m = r.mapping(item, path)
        if m is None:
            continue
        r.fields(m, path, ("name", "type", "parameters"))
        n_errors = len(problems.errors)
        name = r.string(m, "name", path)
        ptype = r.string(m, "type", path)
        name = name or ptype
        if not ptype:
            label = f"plugin '{name}'" if name else "plugin"
            if "type" not in m or m["type"] is None or m["type"] == "":
                problems.error(path, f"{label} is missing a type")
        if name and name in seen:
            problems.error(join(path, "name"), f"duplicate plugin name '{name}' (first defined at {seen[name]})")
            continue
        if name:
            seen[name] = path
        if len(problems.errors) != n_errors or not name or not ptype:
            if name:
                spec.broken_names.add(name)
            continue
        spec.plugins.append(
            PluginEntry(index=i, name=name, type=ptype, parameters=m.get("parameters"), has_parameters="parameters" in m)
        )


def _decode_profiles(r: _Reader, top: dict, spec: ConfigSpec, problems: Problems) -> None:
    items = r.sequence(top.get("schedulingProfiles"), "schedulingProfiles") or []
    seen: set[str] = set()
    for i, item in enumerate(items):
        path = f"schedulingProfiles[{i}]"
        m = r.mapping(item, path)
        if m is None:
            continue
        r.fields(m, path, ("name", "plugins"))
        name = r.string(m, "name", path, required=True, what="is missing a name")
        if name is not None:
            if name in seen:
                problems.error(join(path, "name"), f"duplicate profile name '{name}'")
                name = None
            else:
                seen.add(name)
        profile = Profile(path=path, name=name or "")
        refs = r.sequence(m.get("plugins"), join(path, "plugins")) or []
        for j, entry in enumerate(refs):
            rpath = f"{path}.plugins[{j}]"
            e = r.mapping(entry, rpath)
            if e is None:
                continue
            r.fields(e, rpath, ("pluginRef", "weight"))
            ref = r.string(e, "pluginRef", rpath, required=True, what="is missing a 'pluginRef'")
            weight = r.number(e, "weight", rpath)
            if ref is not None:
                profile.refs.append(ProfileRef(rpath, ref, weight))
        if name is not None:
            spec.profiles.append(profile)


def _decode_data_layer(r: _Reader, top: dict, spec: ConfigSpec, problems: Problems) -> None:
    dl = spec.data_layer
    present = [k for k in ("dataLayer", "data") if top.get(k) is not None]
    if len(present) == 2:
        problems.error("data", "both 'dataLayer' and 'data' are given; they are the same section, use only 'dataLayer'")
    if present:
        dl.key = present[0]
        dl.given = True
        m = r.mapping(top[dl.key], dl.key)
        if m is not None:
            r.fields(m, dl.key, ("injectDefaults", "sources", "discovery"))
            inject = r.boolean(m, "injectDefaults", dl.key)
            if inject is not None:
                dl.inject_defaults, dl.inject_given = inject, True
            sources = r.sequence(m.get("sources"), join(dl.key, "sources")) or []
            for i, item in enumerate(sources):
                spath = f"{dl.key}.sources[{i}]"
                s = r.mapping(item, spath)
                if s is None:
                    continue
                r.fields(s, spath, ("pluginRef", "extractors"))
                ref = r.string(s, "pluginRef", spath, required=True, what="is missing a 'pluginRef'")
                entry = SourceEntry(spath, ref or "")
                for j, ex in enumerate(r.sequence(s.get("extractors"), join(spath, "extractors")) or []):
                    epath = f"{spath}.extractors[{j}]"
                    eref = r.ref(ex, epath)
                    if eref is not None:
                        entry.extractors.append((epath, eref))
                if ref is not None:
                    dl.sources.append(entry)
            if m.get("discovery") is not None:
                dl.discovery_path = join(dl.key, "discovery")
                dl.discovery_ref = r.ref(m["discovery"], dl.discovery_path)
    if top.get("discovery") is not None:
        if dl.discovery_path:
            problems.error("discovery", f"discovery is given both at the top level and in '{dl.key}'; keep one")
        else:
            dl.discovery_path, dl.discovery_top_level = "discovery", True
            dl.discovery_ref = r.ref(top["discovery"], "discovery")


def _decode_band(r: _Reader, value: Any, path: str, *, need_priority: bool) -> PriorityBand | None:
    m = r.mapping(value, path)
    if m is None:
        return None
    r.fields(m, path, ("priority", "maxBytes", "maxRequests", "fairnessPolicyRef", "orderingPolicyRef"))
    band = PriorityBand(path)
    priority = r.integer(m, "priority", path)
    if priority is None and need_priority and m.get("priority") is None:
        r.p.error(path, "missing required field 'priority'")
    band.priority = priority or 0
    band.max_bytes = r.parsed(m, "maxBytes", path, parse_quantity)
    band.max_requests = r.parsed(m, "maxRequests", path, parse_quantity)
    band.fairness_ref = r.string(m, "fairnessPolicyRef", path)
    band.ordering_ref = r.string(m, "orderingPolicyRef", path)
    return band


def _decode_flow_control(r: _Reader, value: Any, problems: Problems) -> FlowControlSpec | None:
    path = "flowControl"
    m = r.mapping(value, path)
    if m is None:
        return None
    r.fields(m, path, (
        "maxBytes", "maxRequests", "defaultRequestTTL", "noEndpointRequestTTL", "defaultPriorityBand",
        "defaultNegativePriorityBand", "priorityBands", "usageLimitPolicyPluginRef", "saturationDetector",
        "enableEviction",
    ))
    fc = FlowControlSpec()
    fc.max_bytes = r.parsed(m, "maxBytes", path, parse_quantity)
    fc.max_requests = r.parsed(m, "maxRequests", path, parse_quantity)
    fc.default_request_ttl = r.parsed(m, "defaultRequestTTL", path, parse_duration)
    fc.no_endpoint_ttl = r.parsed(m, "noEndpointRequestTTL", path, parse_duration)
    for key, attr in (("defaultPriorityBand", "default_band"), ("defaultNegativePriorityBand", "negative_band")):
        if m.get(key) is not None:
            setattr(fc, attr, _decode_band(r, m[key], join(path, key), need_priority=False))
    if m.get("saturationDetector") is not None:
        fc.saturation_ref = r.ref(m["saturationDetector"], join(path, "saturationDetector"))
    fc.enable_eviction = bool(r.boolean(m, "enableEviction", path))
    if fc.enable_eviction:
        problems.warn(join(path, "enableEviction"), "in-flight eviction is not implemented by this EPP; "
                                                   "queued requests are still shed by TTL and capacity")
    seen: dict[int, str] = {}
    for i, item in enumerate(r.sequence(m.get("priorityBands"), join(path, "priorityBands")) or []):
        bpath = f"{path}.priorityBands[{i}]"
        band = _decode_band(r, item, bpath, need_priority=True)
        if band is None:
            continue
        if band.priority in seen:
            problems.error(join(bpath, "priority"), f"duplicate priority {band.priority} (also at {seen[band.priority]})")
            continue
        seen[band.priority] = bpath
        fc.bands.append(band)
    fc.usage_limit_ref = r.string(m, "usageLimitPolicyPluginRef", path)
    return fc


def _flow_control_gate(spec: ConfigSpec, problems: Problems) -> None:
    """flowControl.saturationDetector serves admission too (it supersedes the top-level field);
    the rest of the section needs the gate."""
    fc = spec.flow_control
    if fc is None:
        return
    if fc.saturation_ref:
        if spec.saturation_ref and spec.saturation_ref != fc.saturation_ref:
            problems.error("flowControl.saturationDetector.pluginRef",
                           f"'{fc.saturation_ref}' contradicts the top-level saturationDetector "
                           f"'{spec.saturation_ref}' (deprecated); keep one")
        spec.saturation_ref = fc.saturation_ref
        spec.saturation_path = "flowControl.saturationDetector.pluginRef"
    if "flowControl" not in spec.feature_gates:
        problems.warn("flowControl", "the flowControl feature gate is off: this section is ignored "
                                     "(except saturationDetector); add 'flowControl' to featureGates")


def _decode_objectives(r: _Reader, top: dict, spec: ConfigSpec, problems: Problems) -> None:
    seen: set[str] = set()
    for i, item in enumerate(r.sequence(top.get("inferenceObjectives"), "inferenceObjectives") or []):
        path = f"inferenceObjectives[{i}]"
        m = r.mapping(item, path)
        if m is None:
            continue
        r.fields(m, path, ("name", "priority"))
        name = r.string(m, "name", path, required=True)
        priority = r.integer(m, "priority", path)
        if name is None:
            continue
        if name in seen:
            problems.error(join(path, "name"), f"duplicate inference objective '{name}'")
            continue
        seen.add(name)
        spec.objectives.append(ObjectiveEntry(path, name, priority or 0))


def _decode_rewrites(r: _Reader, top: dict, spec: ConfigSpec, problems: Problems) -> None:
    seen: dict[str, str] = {}
    for i, item in enumerate(r.sequence(top.get("modelRewrites"), "modelRewrites") or []):
        path = f"modelRewrites[{i}]"
        m = r.mapping(item, path)
        if m is None:
            continue
        r.fields(m, path, ("name", "match", "targets"))
        name = r.string(m, "name", path)
        match = r.string(m, "match", path, required=True)
        targets: list[tuple[str, int]] = []
        raw_targets = r.sequence(m.get("targets"), join(path, "targets"))
        if raw_targets == [] and m.get("targets") is None:
            problems.error(path, "missing required field 'targets'")
        elif raw_targets == []:
            problems.error(join(path, "targets"), "must list at least one target model")
        for j, t in enumerate(raw_targets or []):
            tpath = f"{path}.targets[{j}]"
            tm = r.mapping(t, tpath)
            if tm is None:
                continue
            r.fields(tm, tpath, ("model", "weight"))
            model = r.string(tm, "model", tpath, required=True)
            weight = r.integer(tm, "weight", tpath, lo=0)
            if model is not None:
                targets.append((model, 1 if weight is None else weight))
        if match is None:
            continue
        if match in seen:
            problems.error(join(path, "match"), f"model '{match}' is already rewritten by {seen[match]}")
            continue
        seen[match] = path
        if targets:
            spec.rewrites.append(RewriteEntry(path, name, match, targets))

"""The effective configuration as a document: what `epp check-config` prints.

It is itself a valid EndpointPickerConfig (loading it again gives the same document):
defaults appear as ordinary entries, plugin ``parameters`` appear exactly as the user gave
them, and the data-layer section is always spelled ``dataLayer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from epp.config.model import KIND
from epp.config.schema import (
    DEFAULT_FAIRNESS_POLICY,
    DEFAULT_ORDERING_POLICY,
    DEFAULT_USAGE_LIMIT_POLICY,
    ConfigSpec,
    FlowControlSpec,
    PriorityBand,
)
from epp.config.yamlio import dump_yaml
from epp.flowcontrol.settings import DEFAULT_BAND_MAX_BYTES, DEFAULT_BAND_MAX_REQUESTS, DEFAULT_REQUEST_TTL
from epp.framework.durations import format_duration
from epp.framework.params import params_to_dict

if TYPE_CHECKING:
    from epp.config.model import LoadedConfig
    from epp.config.wiring import Wiring


def _band(b: PriorityBand | None, *, with_priority: bool, policies: bool) -> dict[str, Any]:
    b = b or PriorityBand("")
    out: dict[str, Any] = {"priority": b.priority} if with_priority else {}
    # 0 or unset = the default: per-band limits are always bounded (upstream)
    out["maxBytes"] = b.max_bytes or DEFAULT_BAND_MAX_BYTES
    out["maxRequests"] = b.max_requests or DEFAULT_BAND_MAX_REQUESTS
    for key, ref, default in (("fairnessPolicyRef", b.fairness_ref, DEFAULT_FAIRNESS_POLICY),
                              ("orderingPolicyRef", b.ordering_ref, DEFAULT_ORDERING_POLICY)):
        if ref or policies:
            out[key] = ref or default
    return out


def flow_control_settings(fc: FlowControlSpec | None, *, gate: bool = True) -> dict[str, Any]:
    """The flowControl section with every default filled in.

    ``maxBytes``/``maxRequests`` are ints or None (= unlimited); the TTLs are seconds (0 =
    never expire); ``defaultNegativePriorityBand`` is None when negative priorities use the
    default band; bands keep upstream's camelCase keys. With the gate off, the default
    policies are not named (they were not created).
    """
    fc = fc or FlowControlSpec()
    ttl = DEFAULT_REQUEST_TTL if fc.default_request_ttl is None else fc.default_request_ttl
    usage = fc.usage_limit_ref or (DEFAULT_USAGE_LIMIT_POLICY if gate else None)
    return {
        "maxBytes": fc.max_bytes or None,
        "maxRequests": fc.max_requests or None,
        "defaultRequestTTL": ttl,
        "noEndpointRequestTTL": ttl if fc.no_endpoint_ttl is None else fc.no_endpoint_ttl,
        "defaultPriorityBand": _band(fc.default_band, with_priority=False, policies=gate),
        "defaultNegativePriorityBand": (_band(fc.negative_band, with_priority=False, policies=gate)
                                        if fc.negative_band else None),
        "priorityBands": [_band(b, with_priority=True, policies=gate) for b in fc.bands],
        "usageLimitPolicyPluginRef": usage,
        "enableEviction": fc.enable_eviction,
    }


def effective_document(spec: ConfigSpec, wiring: "Wiring", flow_control: dict[str, Any] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"apiVersion": spec.api_version, "kind": KIND, "featureGates": list(spec.feature_gates)}
    plugins = []
    for e in spec.plugins:
        item: dict[str, Any] = {"name": e.name, "type": e.type}
        if e.has_parameters:
            item["parameters"] = e.parameters
        plugins.append(item)
    doc["plugins"] = plugins
    doc["schedulingProfiles"] = [
        {
            "name": name,
            "plugins": [{"pluginRef": ref} if w is None else {"pluginRef": ref, "weight": w} for ref, w in refs],
        }
        for name, refs in wiring.profile_refs.items()
    ]
    if wiring.saturation_detector is not None:
        doc["saturationDetector"] = {"pluginRef": wiring.saturation_detector.name}
    if wiring.parser is not None:
        doc["parser"] = {"pluginRef": wiring.parser.name}
    doc["dataLayer"] = {
        "injectDefaults": spec.data_layer.inject_defaults,
        "sources": [
            {"pluginRef": w.source.name, "extractors": [{"pluginRef": e.name} for e in w.extractors]}
            for w in wiring.sources
        ],
    }
    if wiring.discovery is not None:
        doc["discovery"] = {"pluginRef": wiring.discovery.name}
    if flow_control is not None:
        fc: dict[str, Any] = {}
        for key in ("maxBytes", "maxRequests"):
            if flow_control[key] is not None:
                fc[key] = flow_control[key]
        for key in ("defaultRequestTTL", "noEndpointRequestTTL"):
            fc[key] = format_duration(flow_control[key])
        fc["defaultPriorityBand"] = dict(flow_control["defaultPriorityBand"])
        if flow_control["defaultNegativePriorityBand"] is not None:
            fc["defaultNegativePriorityBand"] = dict(flow_control["defaultNegativePriorityBand"])
        fc["priorityBands"] = [dict(b) for b in flow_control["priorityBands"]]
        if flow_control["usageLimitPolicyPluginRef"]:
            fc["usageLimitPolicyPluginRef"] = flow_control["usageLimitPolicyPluginRef"]
        if "saturationDetector" in doc:
            fc["saturationDetector"] = dict(doc["saturationDetector"])
        if flow_control["enableEviction"]:
            fc["enableEviction"] = True
        doc["flowControl"] = fc
    if spec.objectives:
        doc["inferenceObjectives"] = [{"name": o.name, "priority": o.priority} for o in spec.objectives]
    if spec.rewrites:
        doc["modelRewrites"] = [
            {
                **({"name": r.name} if r.name else {}),
                "match": r.match,
                "targets": [{"model": m, "weight": w} for m, w in r.targets],
            }
            for r in spec.rewrites
        ]
    return doc


def effective_parameters(loaded: "LoadedConfig") -> dict[str, dict[str, Any]]:
    """Every plugin's parameters after decoding (defaults filled in), for plugins that have any."""
    out: dict[str, dict[str, Any]] = {}
    for name, plugin in loaded.plugins.items():
        params = params_to_dict(getattr(plugin, "params", None))
        if params:
            out[name] = params
    return out


def render(loaded: "LoadedConfig", *, with_parameters: bool = True) -> str:
    """The effective config as YAML; optionally followed by a second YAML document listing
    the effective parameters of each plugin (``effectiveParameters``)."""
    text = dump_yaml(loaded.document)
    if with_parameters:
        params = effective_parameters(loaded)
        if params:
            text += "---\n" + dump_yaml({"effectiveParameters": params})
    return text

"""The effective configuration as a document: what `epp check-config` prints.

It is itself a valid EndpointPickerConfig (loading it again gives the same document):
defaults appear as ordinary entries, plugin ``parameters`` appear exactly as the user gave
them, and the data-layer section is always spelled ``dataLayer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from epp.config.model import KIND
from epp.config.schema import (
    DEFAULT_BAND_MAX_BYTES,
    DEFAULT_FAIRNESS_POLICY,
    DEFAULT_ORDERING_POLICY,
    DEFAULT_USAGE_LIMIT_POLICY,
    ConfigSpec,
    FlowControlSpec,
    PriorityBand,
)
from epp.config.yamlio import dump_yaml
from epp.framework.durations import format_duration
from epp.framework.params import params_to_dict

if TYPE_CHECKING:
    from epp.config.model import LoadedConfig
    from epp.config.wiring import Wiring


def _band(b: PriorityBand | None, *, with_priority: bool) -> dict[str, Any]:
    b = b or PriorityBand("")
    out: dict[str, Any] = {"priority": b.priority} if with_priority else {}
    out["maxBytes"] = DEFAULT_BAND_MAX_BYTES if b.max_bytes is None else b.max_bytes
    out["maxRequests"] = b.max_requests or 0  # 0 = unlimited
    out["fairnessPolicyRef"] = b.fairness_ref or DEFAULT_FAIRNESS_POLICY
    out["orderingPolicyRef"] = b.ordering_ref or DEFAULT_ORDERING_POLICY
    return out


def flow_control_settings(fc: FlowControlSpec | None) -> dict[str, Any]:
    """The flowControl section with every default filled in.

    ``maxBytes``/``maxRequests`` are ints or None (= unlimited), ``defaultRequestTTL`` is
    seconds (0 = the client's deadline); bands keep upstream's camelCase keys.
    """
    fc = fc or FlowControlSpec()
    return {
        "maxBytes": fc.max_bytes,
        "maxRequests": fc.max_requests,
        "defaultRequestTTL": fc.default_request_ttl or 0.0,
        "defaultPriorityBand": _band(fc.default_band, with_priority=False),
        "priorityBands": [_band(b, with_priority=True) for b in fc.bands],
        "usageLimitPolicyPluginRef": fc.usage_limit_ref or DEFAULT_USAGE_LIMIT_POLICY,
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
        fc["defaultRequestTTL"] = format_duration(flow_control["defaultRequestTTL"])
        fc["defaultPriorityBand"] = dict(flow_control["defaultPriorityBand"])
        fc["priorityBands"] = [dict(b) for b in flow_control["priorityBands"]]
        fc["usageLimitPolicyPluginRef"] = flow_control["usageLimitPolicyPluginRef"]
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

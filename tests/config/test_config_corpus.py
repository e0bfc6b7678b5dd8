"""The config corpus: valid documents with the key facts of their effective config, invalid
ones with the exact errors (path + problem) they must produce. Uses the isolated test registry
(cfg_testkit.py), so it does not depend on the built-in plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from epp.config import ConfigError, load_config

H = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
OLD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
SYSTEM = ["openai-parser", "utilization-detector", "metrics-data-source", "core-metrics-extractor"]
DEFAULT_SOURCES = {"metrics-data-source": ["core-metrics-extractor"]}


@dataclass
class Case:
    id: str
    text: str
    facts: dict[str, Any] = field(default_factory=dict)  # for valid configs
    errors: list[str] = field(default_factory=list)  # each must be one whole error line (prefix match)
    n_errors: int | None = None  # exact number of errors, when noise would be a bug
    warnings: list[str] = field(default_factory=list)  # substrings, each in some warning


def facts_of(loaded) -> dict[str, Any]:
    doc = loaded.document
    return {
        "plugins": [p["name"] for p in doc["plugins"]],
        "profiles": {p["name"]: [(r["pluginRef"], r.get("weight")) for r in p["plugins"]] for p in doc["schedulingProfiles"]},
        "sources": {s["pluginRef"]: [e["pluginRef"] for e in s["extractors"]] for s in doc["dataLayer"]["sources"]},
        "handler": loaded.profile_handler.name,
        "parser": loaded.parser.name,
        "saturation": loaded.saturation_detector.name,
        "producers": [p.name for p in loaded.producers],
        "gates": loaded.feature_gates,
        "flow_control": loaded.document.get("flowControl"),
        "flow_gate": loaded.flow_control is not None,
        "objectives": {k: v.priority for k, v in loaded.objectives.items()},
        "rewrites": {k: [(t.model, t.weight) for t in v.targets] for k, v in loaded.model_rewrites.items()},
        "discovery": loaded.discovery.name if loaded.discovery else None,
    }


UPSTREAM_FULL = """
plugins:
- name: test1
  type: test-plugin
  parameters:
    threshold: 10
- name: profileHandler
  type: test-profile-handler
- type: test-scorer
  parameters:
    blockSize: 32
- name: testPicker
  type: test-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: test1
  - pluginRef: test-scorer
    weight: 50
  - pluginRef: testPicker
featureGates:
- dataLayer
- flowControl
"""
FLOW_DEFAULTS = ["fcfs-ordering-policy", "global-strict-fairness-policy", "static-usage-limit-policy"]
UPSTREAM_FULL_FACTS = {
    "plugins": ["test1", "profileHandler", "test-scorer", "testPicker", *FLOW_DEFAULTS, *SYSTEM],
    "profiles": {"default": [("test1", None), ("test-scorer", 50.0), ("testPicker", None)]},
    "handler": "profileHandler",
    "gates": ["dataLayer", "flowControl"],
    "sources": DEFAULT_SOURCES,
}
TEST_SOURCE = """
plugins:
- name: maxScore
  type: max-score-picker
- name: testSource
  type: test-source
- name: testExtractor
  type: test-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: maxScore
{key}:
  sources:
  - pluginRef: testSource
    extractors:
    - pluginRef: testExtractor
"""
TWO_PROFILES = """
plugins:
- name: maxScore
  type: max-score-picker
{handler}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: maxScore
- name: prof2
  plugins:
  - pluginRef: maxScore
"""

VALID = [
    Case("minimal-document-gets-every-default", H, facts={
        "plugins": ["single-profile-handler", "max-score-picker", *SYSTEM],
        "profiles": {"default": [("max-score-picker", None)]},
        "sources": DEFAULT_SOURCES, "handler": "single-profile-handler", "parser": "openai-parser",
        "saturation": "utilization-detector", "gates": [], "flow_control": None,
    }),
    Case("upstream-full-llm-d-apiversion", H + UPSTREAM_FULL, facts={
        **UPSTREAM_FULL_FACTS,
        "flow_gate": True,
        "flow_control": {  # the gate turns the defaults on even without a flowControl section
            "defaultRequestTTL": "60s", "noEndpointRequestTTL": "60s",
            "defaultPriorityBand": {"maxBytes": 1_000_000_000, "maxRequests": 5000,
                                    "fairnessPolicyRef": "global-strict-fairness-policy",
                                    "orderingPolicyRef": "fcfs-ordering-policy"},
            "priorityBands": [], "usageLimitPolicyPluginRef": "static-usage-limit-policy",
            "saturationDetector": {"pluginRef": "utilization-detector"},
        },
    }),
    Case("upstream-full-deprecated-apiversion", OLD + UPSTREAM_FULL, facts=UPSTREAM_FULL_FACTS,
         warnings=["apiVersion: 'inference.networking.x-k8s.io/v1alpha1' is deprecated; use 'llm-d.ai/v1alpha1'"]),
    Case("no-profiles-gets-default-profile", H + """
plugins:
- name: test1
  type: test-plugin
  parameters:
    threshold: 10
- type: test-scorer
""", facts={
        "plugins": ["test1", "test-scorer", "single-profile-handler", "max-score-picker", *SYSTEM],
        "profiles": {"default": [("test1", None), ("test-scorer", 1.0), ("max-score-picker", None)]},
    }),
    Case("scorer-without-weight-gets-1", H + """
plugins:
- name: profileHandler
  type: single-profile-handler
- name: testScorer
  type: test-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: testScorer
""", facts={"profiles": {"default": [("testScorer", 1.0), ("max-score-picker", None)]}, "handler": "profileHandler"}),
    Case("picker-before-scorer", H + """
plugins:
- type: single-profile-handler
- type: test-picker
- type: test-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: test-picker
  - pluginRef: test-scorer
""", facts={
        "plugins": ["single-profile-handler", "test-picker", "test-scorer", *SYSTEM],
        "profiles": {"default": [("test-picker", None), ("test-scorer", 1.0)]},
    }),
    Case("dataLayer-explicit-source-plus-default", H + TEST_SOURCE.format(key="dataLayer"), facts={
        "sources": {"testSource": ["testExtractor"], **DEFAULT_SOURCES},
        "plugins": ["maxScore", "testSource", "testExtractor", "single-profile-handler", *SYSTEM],
    }),
    Case("data-key-is-the-same-section", H + TEST_SOURCE.format(key="data"), facts={
        "sources": {"testSource": ["testExtractor"], **DEFAULT_SOURCES},
    }),
    Case("injectDefaults-false-keeps-only-user-source",
         H + TEST_SOURCE.format(key="dataLayer") + "  injectDefaults: false\n", facts={
             "sources": {"testSource": ["testExtractor"]},
             "plugins": ["maxScore", "testSource", "testExtractor", "single-profile-handler",
                         "openai-parser", "utilization-detector"],
         }),
    Case("empty-dataLayer-still-gets-default-source", H + "dataLayer: {}\n", facts={"sources": DEFAULT_SOURCES}),
    Case("seed-pipeline-shares-one-scrape", H + """
plugins:
- name: prom
  type: prometheus-data-source
- name: queue-depth
  type: prometheus-metric
  parameters: {metric: "vllm:num_requests_waiting", name: queue}
- name: by-queue
  type: metric-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: by-queue
    weight: 2
data:
  sources:
  - pluginRef: prom
    extractors:
    - pluginRef: queue-depth
""", facts={
        # the default core extractor joins the user's metrics source instead of a second scrape
        "sources": {"prom": ["queue-depth", "core-metrics-extractor"]},
        "plugins": ["prom", "queue-depth", "by-queue", "single-profile-handler", "max-score-picker",
                    "openai-parser", "utilization-detector", "core-metrics-extractor"],
        "profiles": {"default": [("by-queue", 2.0), ("max-score-picker", None)]},
    }),
    Case("json-document", """{"apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig",
          "plugins": [{"type": "test-scorer", "parameters": {"blockSize": 8}}],
          "schedulingProfiles": [{"name": "only", "plugins": [{"pluginRef": "test-scorer", "weight": 0.5}]}]}""",
         facts={"profiles": {"only": [("test-scorer", 0.5), ("max-score-picker", None)]}}),
    Case("flow-control-section", H + """
featureGates: [flowControl]
plugins:
- type: test-flow-policy
  name: customFCFS
flowControl:
  maxBytes: "1Gi"
  maxRequests: 1k
  defaultRequestTTL: 1m30s
  priorityBands:
  - priority: 100
    orderingPolicyRef: customFCFS
    maxRequests: 50
  - priority: -1
""", facts={"flow_gate": True, "flow_control": {
        "maxBytes": 2**30, "maxRequests": 1000, "defaultRequestTTL": "90s", "noEndpointRequestTTL": "90s",
        "defaultPriorityBand": {"maxBytes": 1_000_000_000, "maxRequests": 5000,
                                "fairnessPolicyRef": "global-strict-fairness-policy", "orderingPolicyRef": "fcfs-ordering-policy"},
        "priorityBands": [
            {"priority": 100, "maxBytes": 1_000_000_000, "maxRequests": 50,
             "fairnessPolicyRef": "global-strict-fairness-policy", "orderingPolicyRef": "customFCFS"},
            {"priority": -1, "maxBytes": 1_000_000_000, "maxRequests": 5000,
             "fairnessPolicyRef": "global-strict-fairness-policy", "orderingPolicyRef": "fcfs-ordering-policy"},
        ],
        "usageLimitPolicyPluginRef": "static-usage-limit-policy",
        "saturationDetector": {"pluginRef": "utilization-detector"}}}),
    Case("flow-control-full-section", H + """
featureGates: [flowControl]
plugins:
- {type: test-fairness-policy, name: rr}
- {type: test-usage-limit, name: holdback}
- {type: test-detector, name: sat}
flowControl:
  defaultRequestTTL: 0s
  noEndpointRequestTTL: 5m
  defaultPriorityBand: {fairnessPolicyRef: rr, maxRequests: 0}
  defaultNegativePriorityBand: {maxRequests: 10}
  priorityBands: [{priority: 5, maxBytes: 1Mi}]
  usageLimitPolicyPluginRef: holdback
  saturationDetector: {pluginRef: sat}
""", facts={"flow_gate": True, "saturation": "sat", "flow_control": {
        "defaultRequestTTL": "0s", "noEndpointRequestTTL": "300s",
        "defaultPriorityBand": {"maxBytes": 1_000_000_000, "maxRequests": 5000,
                                "fairnessPolicyRef": "rr", "orderingPolicyRef": "fcfs-ordering-policy"},
        "defaultNegativePriorityBand": {"maxBytes": 1_000_000_000, "maxRequests": 10,
                                        "fairnessPolicyRef": "global-strict-fairness-policy",
                                        "orderingPolicyRef": "fcfs-ordering-policy"},
        "priorityBands": [{"priority": 5, "maxBytes": 2**20, "maxRequests": 5000,
                           "fairnessPolicyRef": "global-strict-fairness-policy",
                           "orderingPolicyRef": "fcfs-ordering-policy"}],
        "usageLimitPolicyPluginRef": "holdback", "saturationDetector": {"pluginRef": "sat"}}}),
    Case("flow-control-section-without-the-gate", H + """
plugins:
- {type: test-detector, name: sat}
flowControl:
  maxRequests: 10
  saturationDetector: {pluginRef: sat}
""", facts={"flow_gate": False, "saturation": "sat"},
         warnings=["flowControl: the flowControl feature gate is off: this section is ignored"]),
    Case("objectives-and-rewrites-extensions", H + """
inferenceObjectives:
- {name: premium, priority: 10}
- {name: batch, priority: -1}
- {name: plain}
modelRewrites:
- name: canary
  match: llama
  targets:
  - {model: llama-v1, weight: 90}
  - {model: llama-v2, weight: 10}
- match: tiny
  targets: [{model: tiny-2}]
""", facts={"objectives": {"premium": 10, "batch": -1, "plain": 0},
            "rewrites": {"llama": [("llama-v1", 90), ("llama-v2", 10)], "tiny": [("tiny-2", 1)]}}),
    Case("consumer-scorer-gets-default-producer-in-order", H + """
plugins:
- type: test-chain-tail
- type: test-consumer-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: test-consumer-scorer
""", facts={
        "producers": ["test-producer", "test-chain-tail"],  # the tail consumes what the producer makes
        "plugins": ["test-chain-tail", "test-consumer-scorer", "single-profile-handler", "max-score-picker",
                    *SYSTEM, "test-producer"],
    }),
    Case("discovery-in-dataLayer", H + """
plugins:
- {name: files, type: test-discovery}
dataLayer:
  discovery: {pluginRef: files}
""", facts={"discovery": "files"}),
    Case("custom-parser-and-detector-names", H + """
plugins:
- {name: myParser, type: test-parser}
- {name: sat, type: test-detector, parameters: {queueDepthThreshold: 9}}
parser: {pluginRef: myParser}
saturationDetector: {pluginRef: sat}
""", facts={"parser": "myParser", "saturation": "sat",
            "plugins": ["myParser", "sat", "single-profile-handler", "max-score-picker",
                        "metrics-data-source", "core-metrics-extractor"]}),
    Case("two-profiles-with-handler", H + TWO_PROFILES.format(handler="- {name: h, type: test-profile-handler}"),
         facts={"handler": "h", "profiles": {"default": [("maxScore", None)], "prof2": [("maxScore", None)]}}),
    Case("unknown-parameter-is-a-warning", H + """
plugins:
- name: s
  type: test-scorer
  parameters: {blockSize: 4, hashBlockSize: 64}
""", facts={"profiles": {"default": [("s", 1.0), ("max-score-picker", None)]}},
         warnings=["plugins[0]: plugin 's' (type 'test-scorer'): unknown parameter 'hashBlockSize' is ignored"]),
    Case("weight-on-picker-is-a-warning", H + """
plugins: [{type: test-picker}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: test-picker, weight: 3}]
""", facts={"profiles": {"default": [("test-picker", None)]}},
         warnings=["schedulingProfiles[0].plugins[0].weight: ignored: 'test-picker' is not a scorer"]),
]

INVALID = [
    Case("flow-control-policy-of-the-wrong-kind", H + """
featureGates: [flowControl]
plugins: [{type: test-scorer}]
flowControl:
  priorityBands: [{priority: 1, orderingPolicyRef: test-scorer}]
""", errors=["flowControl.priorityBands[0].orderingPolicyRef: plugin 'test-scorer' (type 'test-scorer') is not a "
             "flow-control ordering policy (it is a scorer)"], n_errors=1),
    Case("flow-control-undefined-usage-limit", H + """
featureGates: [flowControl]
flowControl: {usageLimitPolicyPluginRef: nope}
""", errors=["flowControl.usageLimitPolicyPluginRef: references undefined plugin 'nope'"], n_errors=1),
    Case("flow-control-contradicting-detectors", H + """
plugins: [{type: test-detector, name: a}, {type: test-detector, name: b}]
saturationDetector: {pluginRef: a}
flowControl: {saturationDetector: {pluginRef: b}}
""", errors=["flowControl.saturationDetector.pluginRef: 'b' contradicts the top-level saturationDetector 'a'"]),
    Case("flow-control-bad-ttl", H + "flowControl: {noEndpointRequestTTL: soon}\n",
         errors=["flowControl.noEndpointRequestTTL: invalid duration"], n_errors=1),
    Case("plugin-entry-not-a-mapping", H + "plugins:\n- testing 1 2 3\n",
         errors=["plugins[0]: expected a mapping, got string 'testing 1 2 3'"], n_errors=1),
    Case("yaml-syntax-error", H + "plugins:\n  - type: [a\n",
         errors=["failed to decode configuration YAML/JSON: line"], n_errors=1),
    Case("duplicate-yaml-key", H + "plugins: []\nplugins: []\n",
         errors=["failed to decode configuration YAML/JSON: line 4, column 1: duplicate key 'plugins' (first given on line 3)"]),
    Case("missing-type", H + "plugins:\n- parameters:\n    a: 1234\n",
         errors=["plugins[0]: plugin is missing a type"], n_errors=1),
    Case("unregistered-type", H + """
plugins:
- name: testx
  type: unknown-plugin-type
- type: test-scorer
""", errors=["plugins[0]: plugin type 'unknown-plugin-type' is not registered; known types: core-metrics-extractor, "],
         n_errors=1),
    Case("unregistered-type-suggests-close-name", H + "plugins:\n- type: test-scorrer\n",
         errors=["plugins[0]: plugin type 'test-scorrer' is not registered (did you mean 'test-scorer'?); known types:"]),
    Case("wrong-parameter-type", H + """
plugins:
- name: profileHandler
  type: single-profile-handler
- name: testScorer
  type: test-scorer
  parameters:
    blockSize: asdf
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: testScorer
    weight: 50
""", errors=["plugins[1].parameters.blockSize: expected integer, got str 'asdf' (plugin 'testScorer', type 'test-scorer')"],
         n_errors=1),
    Case("wrong-nested-parameter-type", H + "plugins:\n- type: test-scorer\n  parameters: {labels: {a: 1}, window: soon}\n",
         errors=["plugins[0].parameters.labels.a: expected string, got int 1",
                 "plugins[0].parameters.window: invalid duration 'soon'"][:1], n_errors=1),
    Case("unknown-feature-gate", H + "featureGates: [unknown-gate]\n",
         errors=["featureGates[0]: feature gate 'unknown-gate' is unknown or unregistered; known gates: "
                 "dataLayer, enableLegacyMetrics, flowControl"], n_errors=1),
    Case("profile-without-name", H + """
plugins: [{name: test1, type: test-plugin}, {name: profileHandler, type: test-profile-handler}]
schedulingProfiles:
- plugins:
  - pluginRef: test1
""", errors=["schedulingProfiles[0]: is missing a name"]),
    Case("profile-entry-without-pluginRef", H + """
plugins: [{name: profileHandler, type: test-profile-handler}]
schedulingProfiles:
- name: default
  plugins:
  - weight: 10
""", errors=["schedulingProfiles[0].plugins[0]: is missing a 'pluginRef'"], n_errors=1),
    Case("undefined-plugin-reference", H + """
plugins: [{type: test-picker}, {type: test-scorer}]
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: test-picker
  - pluginRef: test-scorer
  - pluginRef: foo
""", errors=["schedulingProfiles[0].plugins[2]: references undefined plugin 'foo'"], n_errors=1),
    Case("duplicate-plugin-name", H + """
plugins:
- {name: test1, type: test-plugin, parameters: {threshold: 10}}
- {name: test1, type: test-plugin, parameters: {threshold: 20}}
""", errors=["plugins[1].name: duplicate plugin name 'test1' (first defined at plugins[0])"], n_errors=1),
    Case("duplicate-profile-name", H + """
plugins: [{name: test1, type: test-plugin}, {name: h, type: test-profile-handler}]
schedulingProfiles:
- {name: default, plugins: [{pluginRef: test1}]}
- {name: default, plugins: [{pluginRef: test1}]}
""", errors=["schedulingProfiles[1].name: duplicate profile name 'default'"], n_errors=1),
    Case("two-pickers-in-one-profile", H + """
plugins:
- {name: maxScore, type: max-score-picker}
- {name: random, type: test-picker}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: maxScore}, {pluginRef: random}]
""", errors=["schedulingProfiles[0].plugins[1]: cannot set 'random' as the picker of profile 'default': "
             "it already has picker 'maxScore' (one picker per profile)"], n_errors=1),
    Case("two-profile-handlers", H + """
plugins:
- {name: profileHandler, type: single-profile-handler}
- {name: secondProfileHandler, type: single-profile-handler}
""", errors=["plugins[1]: multiple profile handlers found ('profileHandler', 'secondProfileHandler'); only one is allowed"],
         n_errors=1),
    Case("multiple-profiles-without-handler", H + TWO_PROFILES.format(handler=""),
         errors=["schedulingProfiles: no profile handler configured: 2 profiles need a profile handler plugin"], n_errors=1),
    Case("single-profile-handler-with-two-profiles",
         H + TWO_PROFILES.format(handler="- {name: profileHandler, type: single-profile-handler}"),
         errors=["plugins[1]: profile handler plugin 'profileHandler' (type 'single-profile-handler') supports at most "
                 "1 scheduling profile, but 2 are configured"], n_errors=1),
    Case("source-is-not-a-data-source", H + """
plugins: [{name: test1, type: test-one}]
dataLayer:
  sources:
  - pluginRef: test1
""", errors=["dataLayer.sources[0].pluginRef: plugin 'test1' (type 'test-one') is not a data source "
             "(it implements no known extension point)"], n_errors=1),
    Case("extractor-as-bare-string", H + """
plugins: [{type: test-source}]
dataLayer:
  sources:
  - pluginRef: test-source
    extractors:
    - test-one
""", errors=["dataLayer.sources[0].extractors[0]: expected a mapping, got string 'test-one'"], n_errors=1),
    Case("extractor-is-not-an-extractor", H + """
plugins: [{type: test-source}, {name: sc, type: test-scorer}]
data:
  sources:
  - pluginRef: test-source
    extractors: [{pluginRef: sc}]
""", errors=["data.sources[0].extractors[0].pluginRef: plugin 'sc' (type 'test-scorer') is not an extractor (it is a scorer)"]),
    Case("source-extractor-type-mismatch", H + """
plugins:
- {name: api, type: test-json-source}
- {name: lines, type: test-extractor}
dataLayer:
  sources:
  - pluginRef: api
    extractors: [{pluginRef: lines}]
""", errors=["dataLayer.sources[0].extractors[0].pluginRef: extractor plugin 'lines' (type 'test-extractor') expects "
             "input of type cfg_testkit.RawText, but data source plugin 'api' (type 'test-json-source') produces cfg_testkit.JsonDoc"],
         n_errors=1),
    Case("flow-control-undefined-policy", H + """
featureGates: [flowControl]
flowControl:
  priorityBands:
  - priority: 100
    orderingPolicyRef: non-existent-policy
""", errors=["flowControl.priorityBands[0].orderingPolicyRef: references undefined plugin 'non-existent-policy'"], n_errors=1),
    Case("flow-control-policy-of-wrong-kind", H + """
plugins: [{name: testScorer, type: test-scorer}]
flowControl:
  usageLimitPolicyPluginRef: testScorer
""", errors=["flowControl.usageLimitPolicyPluginRef: plugin 'testScorer' (type 'test-scorer') is not a flow-control "
             "usage limit policy (it is a scorer)"], n_errors=1),
    Case("flow-control-bad-values", H + """
flowControl:
  maxBytes: lots
  defaultRequestTTL: forever
  priorityBands:
  - {priority: 1}
  - {priority: 1}
  - {maxRequests: 5}
""", errors=["flowControl.maxBytes: invalid quantity 'lots'", "flowControl.defaultRequestTTL: invalid duration 'forever'",
             "flowControl.priorityBands[1].priority: duplicate priority 1 (also at flowControl.priorityBands[0])",
             "flowControl.priorityBands[2]: missing required field 'priority'"], n_errors=4),
    Case("parser-of-wrong-kind", H + """
plugins: [{name: openaiParser, type: test-scorer}]
parser: {pluginRef: openaiParser}
""", errors=["parser.pluginRef: plugin 'openaiParser' (type 'test-scorer') is not a parser plugin (it is a scorer)"]),
    Case("saturation-detector-undefined", H + "saturationDetector: {pluginRef: nope}\n",
         errors=["saturationDetector.pluginRef: references undefined plugin 'nope'"], n_errors=1),
    Case("removed-saturation-fields", H + "saturationDetector:\n  queueDepthThreshold: 5\n",
         errors=["saturationDetector: unknown field 'queueDepthThreshold' (no longer supported: set it in the "
                 "parameters of the utilization-detector plugin)"], n_errors=1),
    Case("unknown-top-level-field", H + "schedulingProfile: []\n",
         errors=["(top level): unknown field 'schedulingProfile'; known fields: apiVersion, kind,"], n_errors=1),
    Case("both-data-and-dataLayer", H + "data: {}\ndataLayer: {}\n",
         errors=["data: both 'dataLayer' and 'data' are given; they are the same section, use only 'dataLayer'"], n_errors=1),
    Case("wrong-apiversion-and-kind", "apiVersion: v1\nkind: ConfigMap\nplugins: [{type: nope}]\n",
         errors=["apiVersion: unsupported apiVersion 'v1'; expected one of llm-d.ai/v1alpha1, inference.networking.x-k8s.io/v1alpha1",
                 "kind: unsupported kind 'ConfigMap'; expected 'EndpointPickerConfig'"], n_errors=2),
    Case("no-sources-with-injectDefaults-false", H + "dataLayer: {injectDefaults: false}\n",
         errors=["dataLayer: data layer enabled but no data sources configured"], n_errors=1),
    Case("producer-cycle", H + "plugins: [{type: test-cycle-a}, {type: test-cycle-b}]\n",
         errors=["plugins[0]: data producers form a dependency cycle (produces/consumes) among 'test-cycle-a', 'test-cycle-b'"],
         n_errors=1),
    Case("consumed-data-nobody-produces", H + "plugins: [{name: o, type: test-orphan-consumer}]\n",
         errors=["plugins[0]: plugin 'o' (type 'test-orphan-consumer') consumes data 'test.nobody-makes-this', but no "
                 "configured plugin produces it and no default producer is registered for it"], n_errors=1),
    Case("factory-failure", H + "plugins: [{name: tok, type: test-exploding}]\n",
         errors=["plugins[0]: failed to create plugin 'tok' (type 'test-exploding'): cannot reach the tokenizer service"],
         n_errors=1),
    Case("profile-handler-used-in-a-profile", H + """
plugins: [{name: h, type: test-profile-handler}]
schedulingProfiles:
- {name: default, plugins: [{pluginRef: h}]}
""", errors=["schedulingProfiles[0].plugins[0]: plugin 'h' (type 'test-profile-handler') cannot be used in a scheduling "
             "profile: it is a profile handler, not a filter, scorer or picker"], n_errors=1),
    Case("mistyped-fields", H + """
featureGates: flowControl
plugins:
- {name: 7, type: test-scorer}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: test-scorer, weight: heavy}]
dataLayer: {injectDefaults: "no"}
""", errors=["featureGates: expected a list, got string 'flowControl'", "plugins[0].name: expected a string, got integer 7",
             "schedulingProfiles[0].plugins[0].weight: expected a number, got string 'heavy'",
             "dataLayer.injectDefaults: expected a boolean, got string 'no'"]),
    Case("every-error-in-one-pass", H + """
plugins:
- {type: nope}
- {name: a, type: test-scorer, parameters: {blockSize: x}}
schedulingProfiles:
- {name: p, plugins: [{pluginRef: ghost}]}
featureGates: [warp]
""", errors=["featureGates[0]: feature gate 'warp' is unknown", "plugins[0]: plugin type 'nope' is not registered",
             "plugins[1].parameters.blockSize: expected integer", "schedulingProfiles[0].plugins[0]: references undefined plugin 'ghost'"],
         n_errors=4),
    Case("no-cascade-from-broken-plugin", H + """
plugins:
- {name: s, type: nope}
schedulingProfiles:
- {name: p, plugins: [{pluginRef: s}]}
""", errors=["plugins[0]: plugin type 'nope' is not registered"], n_errors=1),
    Case("rewrite-without-targets-and-duplicate-objective", H + """
inferenceObjectives: [{name: a, priority: 1}, {name: a, priority: 2}]
modelRewrites: [{match: m, targets: []}, {match: m2}]
""", errors=["inferenceObjectives[1].name: duplicate inference objective 'a'",
             "modelRewrites[0].targets: must list at least one target model",
             "modelRewrites[1]: missing required field 'targets'"], n_errors=3),
    Case("top-level-is-a-list", "- a\n- b\n", errors=["(top level): expected a mapping, got a list"], n_errors=1),
    Case("empty-document", "   \n", errors=["configuration is empty"], n_errors=1),
]


def _check_errors(case: Case, err: ConfigError) -> None:
    for expected in case.errors:
        assert any(line.startswith(expected) for line in err.errors), f"{expected!r} not in:\n{err}"
    if case.n_errors is not None:
        assert len(err.errors) == case.n_errors, str(err)
    assert str(err) == "\n".join(err.errors)


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.id)
def test_valid_config(case: Case, load) -> None:
    loaded = load(case.text)
    facts = facts_of(loaded)
    for key, expected in case.facts.items():
        assert facts[key] == expected, f"{key}: {facts[key]!r} != {expected!r}"
    for w in case.warnings:
        assert any(w in line for line in loaded.warnings), f"{w!r} not in {loaded.warnings}"
    # The effective document is itself a valid config that loads to the same effective document.
    from epp.config.yamlio import dump_yaml

    again = load(dump_yaml(loaded.document))
    assert again.document == loaded.document


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.id)
def test_invalid_config(case: Case, load) -> None:
    with pytest.raises(ConfigError) as exc:
        load(case.text)
    _check_errors(case, exc.value)


def test_corpus_size() -> None:
    assert len(VALID) + len(INVALID) >= 25


def test_missing_system_default_types_are_named_with_the_reason() -> None:
    from cfg_testkit import SYSTEM_DEFAULT_TYPES, make_registry

    reg = make_registry(exclude=SYSTEM_DEFAULT_TYPES)
    with pytest.raises(ConfigError) as exc:
        load_config(H + "plugins: [{type: test-scorer}]\n", registry=reg)
    errors = exc.value.errors
    expected = [
        ("single-profile-handler", "one scheduling profile and no profile handler"),
        ("max-score-picker", "no picker is configured"),
        ("openai-parser", "no parser is configured"),
        ("utilization-detector", "no saturation detector is configured"),
        ("metrics-data-source", "dataLayer.injectDefaults is true"),
        ("core-metrics-extractor", "dataLayer.injectDefaults is true"),
    ]
    assert len(errors) == len(expected), "\n".join(errors)
    for line, (type_name, reason) in zip(errors, expected):
        assert line.startswith(
            f"plugins: cannot add the default plugin '{type_name}' (needed because {reason}): "
            f"plugin type '{type_name}' is not registered; known types: "
        ), line

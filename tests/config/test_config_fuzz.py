"""Hypothesis: no input makes the loader fail with anything but a clean ConfigError.

Three generators, from blind to structure-aware: arbitrary text, arbitrary YAML documents,
and documents built from the config's own vocabulary (field names, plugin types, refs), which
reach the deep stages (plugin creation, defaults, wiring). A ConfigError carrying an
"internal error" line means the catch-all fired, i.e. a loader bug: that fails the test too.
"""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfg_testkit import TEST_TYPES, make_registry
from epp.config import ConfigError, load_config
from epp.config.yamlio import dump_yaml

REGISTRY = make_registry()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELDS = [
    "apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "saturationDetector", "dataLayer",
    "data", "flowControl", "parser", "discovery", "inferenceObjectives", "modelRewrites", "name", "type",
    "parameters", "pluginRef", "weight", "injectDefaults", "sources", "extractors", "maxBytes", "maxRequests",
    "defaultRequestTTL", "defaultPriorityBand", "priorityBands", "priority", "fairnessPolicyRef",
    "orderingPolicyRef", "usageLimitPolicyPluginRef", "match", "targets", "model", "blockSize", "window",
    "labels", "threshold", "maxNumOfEndpoints",
]
WORDS = [*TEST_TYPES, "llm-d.ai/v1alpha1", "EndpointPickerConfig", "flowControl", "dataLayer", "a", "b", "1Gi",
         "50ms", "", "default", "prometheus-data-source"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS), st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=5),
    ),
    max_leaves=30,
)
plugin_entry = st.fixed_dictionaries(
    {"type": st.sampled_from(list(TEST_TYPES)) | scalars},
    optional={"name": st.sampled_from(["a", "b", "c"]) | scalars, "parameters": values},
)
ref = st.fixed_dictionaries({"pluginRef": st.sampled_from(["a", "b", "c", *TEST_TYPES]) | scalars},
                            optional={"weight": scalars})
documents = st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1"]),
     "kind": st.just("EndpointPickerConfig")},
    optional={
        "plugins": st.lists(plugin_entry, max_size=6),
        "schedulingProfiles": st.lists(
            st.fixed_dictionaries({"name": st.sampled_from(["p", "q"]) | scalars, "plugins": st.lists(ref, max_size=4)}),
            max_size=3,
        ),
        "featureGates": st.lists(st.sampled_from(["dataLayer", "flowControl", "enableLegacyMetrics", "x"]), max_size=3),
        "parser": ref, "saturationDetector": ref,
        "dataLayer": st.fixed_dictionaries({}, optional={
            "injectDefaults": st.booleans() | scalars,
            "sources": st.lists(st.fixed_dictionaries({"pluginRef": st.sampled_from(["a", "b", "c"])},
                                                      optional={"extractors": st.lists(ref, max_size=3)}), max_size=3),
        }),
        "flowControl": values, "inferenceObjectives": values, "modelRewrites": values, "discovery": values,
    },
)


def _load(text: str) -> None:
    try:
        cfg = load_config(text, registry=REGISTRY)
    except ConfigError as e:
        assert e.errors and all(isinstance(x, str) and x for x in e.errors)
        assert not any("internal error" in x for x in e.errors), str(e)
        return
    # a config that loads prints an effective document that loads again to itself (compared as
    # text: a NaN given in some parameter is never == itself)
    text = dump_yaml(cfg.document)
    assert dump_yaml(load_config(text, registry=REGISTRY).document) == text


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes(text: str) -> None:
    _load(text)


@FUZZ
@given(values)
def test_arbitrary_yaml_documents_never_crash(doc) -> None:
    _load(yaml.safe_dump(doc))


@FUZZ
@given(documents)
def test_config_shaped_documents_never_crash(doc) -> None:
    _load(yaml.safe_dump(doc))


def test_hostile_yaml() -> None:
    hostile = [
        "a: &a [*a]\n",  # recursive alias
        "x: &x [1,1,1,1,1,1,1,1,1]\ny: &y [*x,*x,*x,*x,*x,*x,*x,*x,*x]\nz: &z [*y,*y,*y,*y,*y,*y,*y,*y,*y]\n",
        "[" * 2000,
        "!!python/object/apply:os.system ['true']\n",
        "plugins:\n- type: test-scorer\n  parameters: &p {labels: *p}\n",
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: test-scorer\n  parameters: &p\n    nested: *p\n",
        "\x00\x01\x02",
        "? [a, b]\n: c\n",
        "when: 2001-12-14t21:59:43.10-05:00\n",
        "a: !!binary aGVsbG8=\n",
        "--- 1\n--- 2\n",
    ]
    for text in hostile:
        _load(text)

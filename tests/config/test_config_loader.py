"""What the loader builds: live objects wired into profiles, hooks, sources and producers;
the effective config it prints; how it reads files; and what plugin factories see."""

from __future__ import annotations

import textwrap

import pytest

from epp.config import ConfigError, effective_parameters, load_config, render
from epp.config.yamlio import parse_document
from epp.datalayer.pool import EndpointPool
from epp.framework import RuntimeSettings
from epp.scheduling import SchedulingProfile

H = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"

WIRED = H + """
plugins:
- {name: only-a, type: test-filter, parameters: {threshold: 3}}
- {name: s1, type: test-scorer, parameters: {blockSize: 32, window: 250ms, labels: {tier: gold}}}
- {name: only-b, type: test-filter}
- {name: s2, type: test-scorer}
- {name: pick, type: test-picker, parameters: {maxNumOfEndpoints: 2}}
- {name: hooks, type: test-hooks}
- {name: gate, type: test-admitter}
- {name: src, type: test-source}
- {name: ex1, type: test-extractor}
- {name: ex2, type: test-any-extractor}
- {name: tail, type: test-chain-tail}
- {name: wants-match, type: test-consumer-scorer}
schedulingProfiles:
- name: main
  plugins:
  - {pluginRef: only-b}
  - {pluginRef: s1, weight: 2.5}
  - {pluginRef: pick}
  - {pluginRef: only-a}
  - {pluginRef: s2}
  - {pluginRef: wants-match, weight: 0}
dataLayer:
  injectDefaults: false
  sources:
  - pluginRef: src
    extractors: [{pluginRef: ex1}, {pluginRef: ex2}]
"""


def test_profiles_hooks_sources_and_producers_are_wired(load) -> None:
    cfg = load(WIRED)
    main = cfg.profiles["main"]
    assert isinstance(main, SchedulingProfile)
    assert [f.name for f in main.filters] == ["only-b", "only-a"]  # listed order, not plugin order
    assert [(w.scorer.name, w.weight) for w in main.scorers] == [("s1", 2.5), ("s2", 1.0), ("wants-match", 0.0)]
    assert main.picker is cfg.plugins["pick"]
    assert cfg.profile_handler.name == "single-profile-handler"
    assert [p.name for p in cfg.pre_request] == ["hooks"]
    assert [p.name for p in cfg.response_complete] == ["hooks"]
    assert cfg.response_received == [] and cfg.response_streaming == []
    assert [a.name for a in cfg.admitters] == ["gate"]
    # the auto-created default producer runs before the producer that consumes its output
    assert [p.name for p in cfg.producers] == ["test-producer", "tail"]
    (wiring,) = cfg.sources
    assert wiring.source is cfg.plugins["src"]
    assert [e.name for e in wiring.extractors] == ["ex1", "ex2"]
    assert wiring.source.bound == wiring.extractors  # bind() was told its extractors
    assert cfg.parser.name == "openai-parser" and cfg.saturation_detector.name == "utilization-detector"
    assert list(cfg.plugins)[:3] == ["only-a", "s1", "only-b"]


def test_parameters_are_decoded_into_the_plugin_params(load) -> None:
    cfg = load(WIRED)
    s1 = cfg.plugins["s1"]
    assert (s1.params.blockSize, float(s1.params.window), s1.params.labels) == (32, 0.25, {"tier": "gold"})
    assert cfg.plugins["s2"].params.blockSize == 16  # default
    assert effective_parameters(cfg)["s1"] == {"blockSize": 32, "window": "250ms", "labels": {"tier": "gold"}}


def test_effective_config_golden(load) -> None:
    cfg = load(H + """
plugins:
- name: s
  type: test-scorer
  parameters: {blockSize: 8, extra: true}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: s, weight: 2}]
""")
    assert render(cfg) == textwrap.dedent("""\
        apiVersion: llm-d.ai/v1alpha1
        kind: EndpointPickerConfig
        featureGates: []
        plugins:
        - name: s
          type: test-scorer
          parameters:
            blockSize: 8
            extra: true
        - name: single-profile-handler
          type: single-profile-handler
        - name: max-score-picker
          type: max-score-picker
        - name: openai-parser
          type: openai-parser
        - name: utilization-detector
          type: utilization-detector
        - name: metrics-data-source
          type: metrics-data-source
        - name: core-metrics-extractor
          type: core-metrics-extractor
        schedulingProfiles:
        - name: default
          plugins:
          - pluginRef: s
            weight: 2.0
          - pluginRef: max-score-picker
        saturationDetector:
          pluginRef: utilization-detector
        parser:
          pluginRef: openai-parser
        dataLayer:
          injectDefaults: true
          sources:
          - pluginRef: metrics-data-source
            extractors:
            - pluginRef: core-metrics-extractor
        ---
        effectiveParameters:
          s:
            blockSize: 8
            window: 1s
            labels: {}
          max-score-picker:
            maxNumOfEndpoints: 1
          utilization-detector:
            queueDepthThreshold: 5
            kvCacheUtilThreshold: 0.8
          metrics-data-source:
            path: /metrics
            scheme: http
          core-metrics-extractor:
            metric: ''
            name: ''
        """)
    assert cfg.warnings == [
        "plugins[0]: plugin 's' (type 'test-scorer'): unknown parameter 'extra' is ignored (known: blockSize, labels, window)"
    ]
    assert render(cfg, with_parameters=False).count("---") == 0


def test_factories_see_earlier_plugins_pool_and_settings(registry) -> None:
    from cfg_testkit import TestScorer

    seen: dict = {}

    class Peeker(TestScorer):
        @classmethod
        def create(cls, name, params, handle):
            seen["earlier"] = [p.name for p in handle.plugins()]
            seen["first"] = handle.plugin("first").name
            seen["pool"] = handle.pool
            seen["interval"] = handle.settings.refresh_metrics_interval
            handle.warn("tokenizer cache is cold")
            return cls(name, params)

    registry.register_class(Peeker, "test-peeker")
    pool = EndpointPool("p", "ns")
    cfg = load_config(
        H + "plugins: [{name: first, type: test-scorer}, {name: peek, type: test-peeker}]\n",
        registry=registry, pool=pool, settings=RuntimeSettings(refresh_metrics_interval=0.2),
    )
    assert seen == {"earlier": ["first"], "first": "first", "pool": pool, "interval": 0.2}
    assert "plugins[1]: plugin 'peek' (type 'test-peeker'): tokenizer cache is cold" in cfg.warnings


def test_load_from_file_and_file_errors(tmp_path, load) -> None:
    good = tmp_path / "epp.yaml"
    good.write_text(H + "plugins: [{type: test-scorer}]\n")
    assert "test-scorer" in load(path=str(good)).plugins
    with pytest.raises(ConfigError, match=r"cannot read config file '.*missing.yaml': No such file"):
        load(path=str(tmp_path / "missing.yaml"))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load(path=str(binary))
    with pytest.raises(ConfigError, match="use only one"):
        load("x: 1", path=str(good))


def test_default_config_text_is_upstreams(load) -> None:
    from epp.config import DEFAULT_CONFIG_TEXT

    doc = parse_document(DEFAULT_CONFIG_TEXT)
    assert [p["type"] for p in doc["plugins"]] == [
        "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "metrics-data-source", "core-metrics-extractor",
    ]
    assert [(r["pluginRef"], r["weight"]) for r in doc["schedulingProfiles"][0]["plugins"]] == [
        ("queue-scorer", 2), ("kv-cache-utilization-scorer", 2), ("prefix-cache-scorer", 3),
    ]
    # neither text nor path: the default is what gets loaded (its scorers are not in the test registry)
    with pytest.raises(ConfigError) as exc:
        load()
    assert [e.split(":")[0] for e in exc.value.errors] == ["plugins[0]", "plugins[1]", "plugins[2]"]
    assert all("is not registered" in e for e in exc.value.errors)


def test_warnings_travel_with_errors(load) -> None:
    with pytest.raises(ConfigError) as exc:
        load(H.replace("llm-d.ai", "inference.networking.x-k8s.io") + "plugins: [{type: nope}]\n")
    assert any("deprecated" in w for w in exc.value.warnings)


def test_env_flow_control_gate_is_deprecated_but_honoured(load, monkeypatch) -> None:
    monkeypatch.setenv("ENABLE_EXPERIMENTAL_FLOW_CONTROL_LAYER", "true")
    cfg = load(H)
    assert cfg.feature_gates == ["flowControl"]
    assert cfg.flow_control is not None and cfg.flow_control.usage_limit.name == "static-usage-limit-policy"
    assert any("ENABLE_EXPERIMENTAL_FLOW_CONTROL_LAYER" in w for w in cfg.warnings)


def test_legacy_metrics_gate_still_collects_metrics(load) -> None:
    cfg = load(H + "featureGates: [enableLegacyMetrics]\n")
    assert [w.source.name for w in cfg.sources] == ["metrics-data-source"]
    assert any("no legacy metrics poller" in w for w in cfg.warnings)


def test_unused_plugins_are_reported(load) -> None:
    cfg = load(H + """
plugins:
- {name: forgotten, type: test-scorer}
- {name: used, type: test-scorer}
- {name: lonely, type: test-extractor}
schedulingProfiles:
- {name: default, plugins: [{pluginRef: used}]}
""")
    assert "plugins[0]: plugin 'forgotten' (type 'test-scorer') is not used by any scheduling profile" in cfg.warnings
    assert "plugins[2]: plugin 'lonely' (type 'test-extractor') is not wired in dataLayer.sources and will not run" in cfg.warnings
    assert not any("'used'" in w for w in cfg.warnings)


def test_a_source_that_rejects_its_extractors(load, registry) -> None:
    from cfg_testkit import TextSource

    class Picky(TextSource):
        def bind(self, extractors):
            raise ValueError("only one extractor supported")

    registry.register_class(Picky, "test-picky-source")
    with pytest.raises(ConfigError) as exc:
        load(H + """
plugins: [{name: p, type: test-picky-source}, {name: e, type: test-extractor}]
dataLayer: {injectDefaults: false, sources: [{pluginRef: p, extractors: [{pluginRef: e}]}]}
""")
    assert exc.value.errors == ["dataLayer.sources[0]: data source 'p' rejected its extractors: only one extractor supported"]


def test_a_buggy_plugin_never_escapes_as_another_exception(load, registry) -> None:
    from cfg_testkit import TestScorer

    class Weird(TestScorer):
        @property
        def consumes(self):  # a plugin bug the loader cannot anticipate
            raise KeyError("boom")

    registry.register_class(Weird, "test-weird")
    with pytest.raises(ConfigError) as exc:
        load(H + "plugins: [{type: test-weird}]\n")
    assert exc.value.errors[-1].startswith("internal error while loading the configuration: KeyError")


def test_discovery_in_both_places_is_an_error(load) -> None:
    with pytest.raises(ConfigError) as exc:
        load(H + """
plugins: [{name: d, type: test-discovery}]
discovery: {pluginRef: d}
dataLayer: {discovery: {pluginRef: d}}
""")
    assert exc.value.errors == ["discovery: discovery is given both at the top level and in 'dataLayer'; keep one"]


def test_discovery_must_be_a_discovery_plugin(load) -> None:
    with pytest.raises(ConfigError) as exc:
        load(H + "plugins: [{name: d, type: test-scorer}]\ndiscovery: {pluginRef: d}\n")
    assert exc.value.errors[0] == (
        "discovery.pluginRef: plugin 'd' (type 'test-scorer') is not a discovery plugin (it is a scorer)"
    )

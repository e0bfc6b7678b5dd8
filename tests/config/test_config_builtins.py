"""Upstream's example configs (§2.8), the built-in default config and our seed pipeline,
loaded with the real registry (built-in plugins + entry points).

A config whose types all exist must load with the expected profiles; one that names types we
do not have must fail with exactly one clear 'is not registered' error per missing type.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.config import ConfigError, load_config
from epp.config.yamlio import parse_document
from epp.framework import registry

DATA = Path(__file__).parent / "testdata"


def _profiles(cfg) -> dict[str, list[tuple[str, float | None]]]:
    return {p["name"]: [(r["pluginRef"], r.get("weight")) for r in p["plugins"]] for p in cfg.document["schedulingProfiles"]}


def _missing_types(path: Path) -> list[str]:
    doc = parse_document(path.read_text())
    return [p["type"] for p in doc["plugins"] if p["type"] not in registry]


def test_builtin_default_config() -> None:
    cfg = load_config()
    assert _profiles(cfg) == {"default": [
        ("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0),
        ("max-score-picker", None),
    ]}
    assert cfg.profile_handler.plugin_type == "single-profile-handler"
    assert (cfg.parser.name, cfg.saturation_detector.name) == ("openai-parser", "utilization-detector")
    assert [(w.source.name, [e.name for e in w.extractors]) for w in cfg.sources] == [
        ("metrics-data-source", ["core-metrics-extractor"])
    ]
    # prefix-cache-scorer consumes the prefix match info: its default producer was created
    assert "approx-prefix-cache-producer" in [p.name for p in cfg.producers]


def test_example_a_llm_d() -> None:
    cfg = load_config(path=str(DATA / "example-a-llm-d.yaml"))
    assert _profiles(cfg) == {"default": [("decode-filter", None), ("max-score-picker", None), ("prefix-cache-scorer", 2.0)]}
    assert [f.name for f in cfg.profiles["default"].filters] == ["decode-filter"]
    assert not any("deprecated" in w for w in cfg.warnings)


def test_example_b_deprecated_apiversion_and_legacy_gate() -> None:
    cfg = load_config(path=str(DATA / "example-b-gaie-default.yaml"))
    assert _profiles(cfg)["default"][:4] == [
        ("queue-scorer", 1.0), ("kv-cache-utilization-scorer", 1.0), ("prefix-cache-scorer", 1.0), ("lora-affinity-scorer", 1.0),
    ]
    assert cfg.feature_gates == ["enableLegacyMetrics"]
    assert any("apiVersion" in w and "deprecated" in w for w in cfg.warnings)
    assert cfg.sources, "metrics are still collected with the legacy gate"


@pytest.mark.parametrize("name,profiles", [
    ("example-c-conformance.yaml", {"conformance-profile"}),
    ("example-d-pd.yaml", {"prefill", "decode"}),
])
def test_examples_c_d_load_or_name_the_missing_types(name: str, profiles: set[str]) -> None:
    path = DATA / name
    missing = _missing_types(path)
    if not missing:
        cfg = load_config(path=str(path))
        assert set(cfg.profiles) == profiles
        return
    with pytest.raises(ConfigError) as exc:
        load_config(path=str(path))
    assert len(exc.value.errors) == len(missing), str(exc.value)
    for line, type_name in zip(exc.value.errors, missing):
        assert f"plugin type '{type_name}' is not registered; known types: " in line


def test_seed_pipeline_one_scrape_feeds_both_extractors() -> None:
    cfg = load_config(path=str(DATA / "seed-pipeline.yaml"))
    (wiring,) = cfg.sources  # the default core extractor joined 'prom' instead of a second scrape
    assert wiring.source.name == "prom"
    assert [e.name for e in wiring.extractors] == ["waiting", "core-metrics-extractor"]
    assert _profiles(cfg)["default"] == [("by-waiting", 1.0), ("max-score-picker", None)]

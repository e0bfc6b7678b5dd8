"""Filters against upstream semantics (label selectors, roles, the conformance header filter)."""

from __future__ import annotations

import pytest
from sched_helpers import cand, cycle, make, request

from epp.framework import ParameterError


def keys(cs) -> list[str]:
    return [c.key for c in cs]


def run(f, candidates, headers=None):
    return keys(f.filter(cycle(), request(headers=headers or {}), candidates))


LABELLED = [
    cand("10.0.0.1", labels={"app": "vllm", "tier": "gold"}),
    cand("10.0.0.2", labels={"app": "vllm", "tier": "silver"}),
    cand("10.0.0.3", labels={"app": "sglang"}),
    cand("10.0.0.4"),
]


def test_label_selector_match_labels_and_expressions() -> None:
    f = make("label-selector-filter", {"matchLabels": {"app": "vllm"}})
    assert run(f, LABELLED) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    f = make("label-selector-filter", {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold", "bronze"]}]})
    assert run(f, LABELLED) == ["10.0.0.1:8000"]
    # NotIn matches endpoints without the label (Kubernetes semantics)
    f = make("label-selector-filter", {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]})
    assert run(f, LABELLED) == ["10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"]
    f = make("label-selector-filter", {"matchExpressions": [{"key": "tier", "operator": "Exists"}]})
    assert run(f, LABELLED) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    f = make("label-selector-filter", {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]})
    assert run(f, LABELLED) == ["10.0.0.3:8000", "10.0.0.4:8000"]
    # all requirements must hold
    f = make("label-selector-filter", {"matchLabels": {"app": "vllm"},
                                       "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]})
    assert run(f, LABELLED) == ["10.0.0.2:8000"]
    # an empty selector selects everything
    assert run(make("label-selector-filter"), LABELLED) == keys(LABELLED)


def test_label_selector_alias_and_bad_params() -> None:
    f = make("by-label-selector", {"matchLabels": {"app": "sglang"}})
    assert run(f, LABELLED) == ["10.0.0.3:8000"]
    with pytest.raises(ParameterError, match="needs at least one value"):
        make("label-selector-filter", {"matchExpressions": [{"key": "tier", "operator": "In"}]})
    with pytest.raises(ParameterError, match="must be one of"):
        make("label-selector-filter", {"matchExpressions": [{"key": "tier", "operator": "Gt", "values": ["1"]}]})
    with pytest.raises(ParameterError, match="takes no values"):
        make("label-selector-filter", {"matchExpressions": [{"key": "tier", "operator": "Exists", "values": ["x"]}]})


def test_by_label() -> None:
    f = make("by-label", {"label": "tier", "validValues": ["gold", "silver"]})
    assert run(f, LABELLED) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    f = make("by-label", {"label": "tier", "validValues": ["gold"], "allowsNoLabel": True})
    assert run(f, LABELLED) == ["10.0.0.1:8000", "10.0.0.3:8000", "10.0.0.4:8000"]
    with pytest.raises(ParameterError, match="label"):
        make("by-label", {"validValues": ["x"]})


ROLES = [
    cand("10.0.1.1", labels={"llm-d.ai/role": "prefill"}),
    cand("10.0.1.2", labels={"llm-d.ai/role": "decode"}),
    cand("10.0.1.3", labels={"llm-d.ai/role": "both"}),
    cand("10.0.1.4", labels={"llm-d.ai/role": "prefill-decode"}),
    cand("10.0.1.5", labels={"llm-d.ai/role": "encode"}),
    cand("10.0.1.6"),
    cand("10.0.1.7", labels={"llm-d.ai/role": "encode-prefill"}),
]


def test_role_filters() -> None:
    assert run(make("decode-filter"), ROLES) == ["10.0.1.2:8000", "10.0.1.3:8000", "10.0.1.4:8000", "10.0.1.6:8000"]
    assert run(make("prefill-filter"), ROLES) == ["10.0.1.1:8000", "10.0.1.3:8000", "10.0.1.4:8000", "10.0.1.7:8000"]
    assert run(make("encode-filter"), ROLES) == ["10.0.1.5:8000", "10.0.1.7:8000"]


DP = [cand("10.1.0.1", 3000), cand("10.1.0.1", 3002), cand("10.1.0.2", 3000), cand("fd00::5", 3000)]
HEADER = "test-epp-endpoint-selection"


@pytest.mark.parametrize("value,expected", [
    (None, []),
    ("", []),
    ("   ", []),
    ("10.1.0.2", ["10.1.0.2:3000"]),
    ("10.1.0.1:3002", ["10.1.0.1:3002"]),
    ("10.1.0.1:3004", []),  # ip:port must match exactly
    (" 10.1.0.2 , 10.1.0.1:3000", ["10.1.0.2:3000", "10.1.0.1:3000"]),  # header order, trimmed
    ("10.1.0.1:3000,10.1.0.1:3002", ["10.1.0.1:3000"]),  # de-duplicated by ip
    ("10.9.9.9,,10.1.0.2", ["10.1.0.2:3000"]),
    ("fd00::5", ["[fd00::5]:3000"]),
    ("[fd00::5]", ["[fd00::5]:3000"]),
    ("[fd00::5]:3000", ["[fd00::5]:3000"]),
    ("[fd00::5]:3001", []),
])
def test_header_based_testing_filter(value, expected) -> None:
    headers = {} if value is None else {HEADER: value}
    assert run(make("header-based-testing-filter"), DP, headers) == expected


def test_header_bare_ip_selects_one_rank() -> None:
    got = run(make("header-based-testing-filter"), DP, {HEADER: "10.1.0.1"})
    assert len(got) == 1 and got[0] in ("10.1.0.1:3000", "10.1.0.1:3002")

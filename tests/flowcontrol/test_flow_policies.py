"""The built-in usage-limit policies, configured through the real config loader."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from epp.config import ConfigError, load_config

H = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\n"


def usage_policy(params: str):
    cfg = load_config(H + f"""
plugins:
- name: limits
  type: priority-holdback-policy
  parameters: {params}
flowControl: {{usageLimitPolicyPluginRef: limits}}
""")
    return cfg.flow_control.usage_limit


def test_holdback_rank_spreads_ceilings_evenly() -> None:
    p = usage_policy("{minCeiling: 0.4, maxCeiling: 0.9}")
    assert p.ceilings(0.5, [10, 5, 0]) == pytest.approx([0.9, 0.65, 0.4])
    assert p.ceilings(0.5, [3]) == [0.9]  # one band alone is not held back


def test_holdback_value_follows_the_priority_values() -> None:
    p = usage_policy("{domain: value, minCeiling: 0.2}")
    assert p.ceilings(0.0, [100, 90, 0]) == pytest.approx([1.0, 0.92, 0.2])
    assert p.ceilings(0.0, [7, 7]) == [1.0, 1.0]


def test_holdback_explicit_ceilings_and_unlisted_priorities() -> None:
    p = usage_policy("{domain: explicit, ceilings: {100: 0.95, 10: 0.3}}")
    assert p.ceilings(0.0, [100, 50, 10]) == [0.95, 0.0, 0.3]


@pytest.mark.parametrize("params, error", [
    ("{}", "'minCeiling' is required"),
    ("{minCeiling: 1.0}", "'minCeiling' must be in [0, 1)"),
    ("{minCeiling: 0.5, maxCeiling: 0.4}", "must be below 'maxCeiling'"),
    ("{domain: explicit, ceilings: {1: 0.9, 2: 0.1}}", "must not increase as priority falls"),
    ("{domain: explicit, minCeiling: 0.1, ceilings: {1: 0.5}}", "'minCeiling' must not be set"),
    ("{domain: rank, minCeiling: 0.1, ceilings: {1: 0.5}}", "'ceilings' must not be set"),
    ("{shape: cubic, minCeiling: 0.1}", "must be one of 'linear'"),
])
def test_holdback_parameter_errors_name_the_problem(params: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        usage_policy(params)
    assert any(error in x and x.startswith("plugins[0]") for x in e.value.errors), e.value.errors


def test_static_threshold_is_validated() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(H + "plugins: [{type: static-usage-limit-policy, parameters: {threshold: 0}}]\n")
    assert "'threshold' must be in (0, 1]" in str(e.value)


@given(st.lists(st.integers(-100, 100), min_size=1, max_size=8, unique=True),
       st.floats(0, 0.99), st.floats(0.01, 1.0), st.sampled_from(["rank", "value"]))
def test_holdback_ceilings_never_rise_as_priority_falls(prios, lo, hi, domain) -> None:
    if lo >= hi:
        lo, hi = hi / 2, hi
    from plugins.flowcontrol.usage_limits import HoldbackParams, PriorityHoldback

    params = HoldbackParams(domain=domain, minCeiling=lo, maxCeiling=hi)
    params.validate()
    ceilings = PriorityHoldback("p", params).ceilings(0.5, sorted(prios, reverse=True))
    assert all(a >= b - 1e-12 for a, b in zip(ceilings, ceilings[1:]))
    assert all(lo - 1e-12 <= c <= hi + 1e-12 for c in ceilings)

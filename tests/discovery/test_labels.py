"""Label selectors: the text syntax of --endpoint-selector, matching, and the canonical form."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.discovery.labels import LabelSelector, Requirement, SelectorError, parse_selector, selector_from_match_labels

KEYS = st.sampled_from(["app", "tier", "llm-d.ai/role", "x.y/z-1", "k8s.io/a_b"])
VALUES = st.sampled_from(["", "vllm", "a", "b-1", "1", "42", "x.y"])
NONEMPTY = VALUES.filter(bool)


@st.composite
def requirements(draw) -> Requirement:
    key = draw(KEYS)
    op = draw(st.sampled_from(["exists", "!exists", "=", "!=", "in", "notin", ">", "<"]))
    if op in ("exists", "!exists"):
        return Requirement(key, op)
    if op in ("in", "notin"):
        return Requirement(key, op, tuple(sorted(set(draw(st.lists(NONEMPTY, min_size=1, max_size=3))))))
    if op in (">", "<"):
        return Requirement(key, op, (str(draw(st.integers(-5, 50))),))
    return Requirement(key, op, (draw(VALUES),))


@given(st.lists(requirements(), max_size=4), st.dictionaries(KEYS, VALUES, max_size=4))
def test_text_form_round_trips_and_matches_the_same(reqs, labels):
    sel = LabelSelector(tuple(reqs))
    again = parse_selector(str(sel))
    assert str(again) == str(sel)
    assert again.matches(labels) == sel.matches(labels)


@pytest.mark.parametrize("text,labels,expected", [
    ("app=vllm", {"app": "vllm"}, True),
    ("app==vllm", {"app": "sglang"}, False),
    ("app!=vllm", {}, True),  # absent counts as not equal
    ("tier notin (a,b)", {}, True),
    ("tier in (a, b)", {}, False),
    ("tier", {"tier": ""}, True),
    ("!tier", {"tier": "a"}, False),
    ("gpus>2", {"gpus": "4"}, True),
    ("gpus<2", {"gpus": "x"}, False),
    ("app=vllm , tier in ( a )", {"app": "vllm", "tier": "a"}, True),
])
def test_matching(text, labels, expected):
    assert parse_selector(text).matches(labels) is expected


@pytest.mark.parametrize("text,message", [
    ("a in x", "needs a '(' value list"), ("a in (b", "unclosed '('"), ("a,", "trailing ','"),
    ("a b", "unexpected 'b' after key 'a'"), ("-a=b", "not a valid label key"), ("a=b c", "expected ',' before 'c'"),
    ("a=" + "v" * 64, "not a valid label value"), ("a>b", "needs an integer"), ("a in ()", "at least one value"),
])
def test_errors_say_what_is_wrong(text, message):
    with pytest.raises(SelectorError, match=re.escape(message)):
        parse_selector(text)


def test_match_labels_become_equalities_in_key_order():
    assert str(selector_from_match_labels({"b": "2", "a": "1"})) == "a=1,b=2"

"""Pickers: max-score (random tie-break), random, weighted-random (A-Res)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_helpers import cands, cycle, make, request

from epp.framework.scheduling import ScoredCandidate

PICKERS = ("max-score-picker", "random-picker", "weighted-random-picker")


def scored(cs, scores):
    return [ScoredCandidate(c, s) for c, s in zip(cs, scores)]


def test_max_score_picks_the_best_and_orders_n() -> None:
    cs = cands(4)
    p = make("max-score-picker")
    assert p.pick(cycle(), request(), scored(cs, [0.1, 2.5, 0.3, 1.0])) == [cs[1]]
    p3 = make("max-score-picker", {"maxNumOfEndpoints": 3})
    assert p3.pick(cycle(), request(), scored(cs, [0.1, 2.5, 0.3, 1.0])) == [cs[1], cs[3], cs[2]]
    assert make("max-score-picker", {"maxNumOfEndpoints": 0}).n == 1
    assert make("max-score-picker", {"maxNumOfEndpoints": 9}).pick(cycle(), request(), scored(cs[:2], [1, 2])) == [cs[1], cs[0]]
    assert p.pick(cycle(), request(), []) == []


@pytest.mark.parametrize("n", [1, 2])
def test_max_score_ties_are_uniform(n: int) -> None:
    """Four tied candidates (and one worse): each tied one is first ~1/4 of the time."""
    cs = cands(5)
    p = make("max-score-picker", {"maxNumOfEndpoints": n})
    p.rng = random.Random(7)
    runs = 4000
    firsts = Counter(p.pick(cycle(), request(), scored(cs, [0.9, 0.9, 0.2, 0.9, 0.9]))[0].key for _ in range(runs))
    assert cs[2].key not in firsts
    for c in (cs[0], cs[1], cs[3], cs[4]):
        # expected 1000, sd ~27: the bound is ~7 sd
        assert abs(firsts[c.key] - runs / 4) < 200, firsts


def test_random_picker_is_uniform_and_ignores_scores() -> None:
    cs = cands(3)
    p = make("random-picker")
    p.rng = random.Random(3)
    got = Counter(p.pick(cycle(), request(), scored(cs, [0.0, 0.0, 5.0]))[0].key for _ in range(3000))
    assert all(abs(got[c.key] - 1000) < 200 for c in cs), got
    two = make("random-picker", {"maxNumOfEndpoints": 2}).pick(cycle(), request(), scored(cs, [1, 1, 1]))
    assert len(two) == 2 and len(set(map(id, two))) == 2


def test_weighted_random_follows_the_scores() -> None:
    """A-Res with one item drawn: P(i) = w_i / sum(w)."""
    cs = cands(3)
    p = make("weighted-random-picker")
    p.rng = random.Random(11)
    runs = 6000
    got = Counter(p.pick(cycle(), request(), scored(cs, [1.0, 2.0, 0.0]))[0].key for _ in range(runs))
    assert got[cs[2].key] == 0  # score 0 is never chosen while a positive one exists
    assert abs(got[cs[0].key] - runs / 3) < 250 and abs(got[cs[1].key] - 2 * runs / 3) < 250, got


def test_weighted_random_without_positive_scores_is_random() -> None:
    cs = cands(2)
    p = make("weighted-random-picker")
    p.rng = random.Random(5)
    got = Counter(p.pick(cycle(), request(), scored(cs, [0.0, -1.0]))[0].key for _ in range(2000))
    assert all(abs(got[c.key] - 1000) < 150 for c in cs), got
    three = make("weighted-random-picker", {"maxNumOfEndpoints": 3}).pick(cycle(), request(), scored(cands(3), [0, 1, 0]))
    assert len(three) == 3 and three[0].key == "10.0.0.2:8000"


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), min_size=1, max_size=40),
       n=st.integers(min_value=-1, max_value=6), picker=st.sampled_from(PICKERS))
def test_pickers_only_return_candidates(scores, n, picker) -> None:
    cs = cands(len(scores))
    p = make(picker, {"maxNumOfEndpoints": n})
    got = p.pick(cycle(), request(), scored(cs, scores))
    want = min(max(n, 1) if n > 0 else 1, len(cs))
    assert len(got) == want
    assert all(any(g is c for c in cs) for g in got)
    assert len({id(g) for g in got}) == len(got)  # no endpoint twice
    if picker == "max-score-picker":
        assert got[0] is cs[scores.index(max(scores))] or scores[cs.index(got[0])] == max(scores)

"""Profile handlers: single-profile and the disaggregation handler's rounds."""

from __future__ import annotations

import pytest
from sched_helpers import cand, make, request

from epp.framework.scheduling import ProfileResult
from epp.scheduling import Scheduler, SchedulingError, SchedulingProfile, WeightedScorer
from epp.framework.handle import PluginHandle


def prof(name: str, *filters) -> SchedulingProfile:
    return SchedulingProfile(name, filters=list(filters), scorers=[WeightedScorer(make("queue-scorer"), 1.0)],
                             picker=make("max-score-picker"))


def test_single_profile_handler() -> None:
    h = make("single-profile-handler")
    c = cand()
    res = Scheduler(h, {"only": prof("only")}).schedule(request(), [c])
    assert res.primary_profile == "only" and res.targets == [c]
    with pytest.raises(ValueError, match="exactly one"):
        h.process_results(None, request(), {"a": ProfileResult([c]), "b": ProfileResult([c])})
    with pytest.raises(LookupError, match="failed to run scheduler profile 'a'"):
        h.process_results(None, request(), {"a": None})


def disagg(nontokens: int = 16):
    h = PluginHandle()
    h.create("prefix-based-pd-decider", params={"nonCachedTokens": nontokens})
    handler = h.create("disagg-profile-handler", params={"deciders": {"prefill": "prefix-based-pd-decider"}})
    profiles = {"prefill": prof("prefill", make("prefill-filter")), "decode": prof("decode", make("decode-filter"))}
    return handler, Scheduler(handler, profiles)


PD = [cand("10.0.0.1", labels={"llm-d.ai/role": "prefill"}), cand("10.0.0.2", labels={"llm-d.ai/role": "decode"})]


def test_disagg_runs_decode_then_prefill_when_the_decider_agrees() -> None:
    handler, s = disagg()
    req = request(prefix=b"x" * 400)  # 100 tokens, nothing cached
    res = s.schedule(req, PD)
    assert res.primary_profile == "decode" and res.targets[0].key == "10.0.0.2:8000"
    assert res.profile_results["prefill"].targets[0].key == "10.0.0.1:8000"
    handler.pre_request(req, res)
    assert req.added_headers == {"x-prefiller-host-port": "10.0.0.1:8000"}
    small = s.schedule(request(prefix=b"x" * 20), PD)
    assert list(small.profile_results) == ["decode"]


def test_disagg_falls_back_to_decode_alone_when_prefill_fails() -> None:
    _, s = disagg(nontokens=0)
    res = s.schedule(request(prefix=b"x" * 400), PD[1:])  # no prefill endpoint
    assert list(res.profile_results) == ["decode"]
    with pytest.raises(SchedulingError):
        s.schedule(request(), PD[:1])  # no decode endpoint: the request fails


async def test_disagg_decider_errors() -> None:
    h = PluginHandle()
    handler = h.create("disagg-profile-handler", params={"deciders": {"prefill": "later"}})
    with pytest.raises(ValueError, match="'later' is not a configured plugin"):
        await handler.start(h)
    h.create("queue-scorer", name="later")
    with pytest.raises(ValueError, match="is not a decider"):
        await handler.start(h)

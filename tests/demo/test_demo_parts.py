"""The demo's pieces on their own: explaining a decision, the traffic plan, the totals, the feed."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from local_servers import serve_app

from epp.demo.explain import DecisionFeed, explain, short_scorer
from epp.demo.summary import histogram_mean, summarize
from epp.demo.traffic import ADAPTERS, KINDS, PREFIX_HIT_TOKENS, TENANTS, DemoRequest, Outcome, plan

SCORERS = ("prefix-cache-scorer", "queue-scorer", "kv-cache-utilization-scorer", "running-requests-scorer")


def record(cands: list[dict[str, float]], pick: int | None = None, filtered: dict[str, list[str]] | None = None,
           request_id: str = "r1") -> dict[str, Any]:
    """A /debug/decisions record shaped like epp/observability/decisions.py writes it."""
    entries = [{"endpoint": f"10.0.0.{i}:8000", "total": round(sum(c.values()), 6),
                "scorers": {n: {"raw": w, "weighted": round(w, 6)} for n, w in c.items()}}
               for i, c in enumerate(cands)]
    if pick is None:
        pick = max(range(len(entries)), key=lambda i: entries[i]["total"])
    return {"request_id": request_id, "pick": entries[pick]["endpoint"], "primary_profile": "default",
            "profiles": {"default": {"targets": [entries[pick]["endpoint"]], "filtered_out": filtered or {},
                                     "candidates": sorted(entries, key=lambda e: -e["total"])}}}


weights = st.floats(min_value=0, max_value=3, allow_nan=False).map(lambda w: round(w, 3))
candidate = st.fixed_dictionaries({n: weights for n in SCORERS})


@given(st.lists(candidate, min_size=2, max_size=6))
def test_explanation_agrees_with_the_scores(cands: list[dict[str, float]]) -> None:
    d = record(cands)
    names = {f"10.0.0.{i}:8000": f"sim-{i}" for i in range(len(cands))}
    why = explain(d, names)
    assert why is not None
    entries = d["profiles"]["default"]["candidates"]
    pick = next(e for e in entries if e["endpoint"] == d["pick"])
    others = [e for e in entries if e is not pick]
    assert why.pick == names[pick["endpoint"]] and why.candidates == len(cands)
    assert math.isclose(why.margin, pick["total"] - others[0]["total"], abs_tol=1e-9)
    assert [w for _n, w in why.contributions] == sorted((s["weighted"] for s in pick["scorers"].values()), reverse=True)
    if why.tied > 1:
        assert why.reason().startswith(f"tie at {why.total:.2f} among {why.tied}")
        assert why.margin <= 1e-9
    elif why.margin > 1e-6:
        # The gains over the runner-up sum to the margin, so the largest is at least their mean.
        assert why.decisive and why.decisive_gain >= why.margin / len(SCORERS) - 1e-9
        assert why.runner_up == names[others[0]["endpoint"]]
        assert f"{short_scorer(why.decisive)} +{why.decisive_gain:.2f} over {why.runner_up}" in why.reason()


def test_explanation_of_a_prefix_hit_names_the_prefix_scorer() -> None:
    hot = {"prefix-cache-scorer": 2.85, "queue-scorer": 2.0, "kv-cache-utilization-scorer": 1.9,
           "running-requests-scorer": 0.5}
    cold = {"prefix-cache-scorer": 0.0, "queue-scorer": 2.0, "kv-cache-utilization-scorer": 2.0,
            "running-requests-scorer": 1.0}
    why = explain(record([cold, hot, cold]), {"10.0.0.1:8000": "sim-1", "10.0.0.0:8000": "sim-0"})
    assert why is not None
    assert why.pick == "sim-1" and why.decisive == "prefix-cache" and why.runner_up == "sim-0"
    assert why.reason() == "prefix-cache +2.85 over sim-0 (total +2.25)"
    assert why.scores() == "prefix-cache 2.85 queue 2.00 kv-cache 1.90 running-requests 0.50"


def test_explanation_edge_cases() -> None:
    one = explain(record([{"queue-scorer": 1.0}], filtered={"by-label": ["10.0.0.9:8000", "10.0.0.8:8000"]}))
    assert one is not None and one.reason() == "the only candidate" and one.filtered == {"by-label": 2}
    assert one.pick == "10.0.0.0:8000"  # no name known: the key
    tie = explain(record([{"queue-scorer": 1.0}] * 3, pick=2))
    assert tie is not None and tie.tied == 3 and tie.reason() == "tie at 1.00 among 3, broken at random"
    assert explain({"request_id": "x", "pick": "a", "profiles": {}}) is None
    assert explain({"request_id": "x", "pick": "a", "primary_profile": "p", "profiles": {"p": None}}) is None


def test_plan_is_seeded_and_mixes_everything() -> None:
    a, b = plan(80, seed=1), plan(80, seed=1)
    assert a == b and a != plan(80, seed=2)
    assert len(a) == 80 and len({r.request_id for r in a}) == 80
    assert all(x.at <= y.at for x, y in zip(a, a[1:]))
    assert {r.kind for r in a} == set(KINDS) and {r.stream for r in a} == {True, False}
    assert {r.api for r in a} == {"chat", "completions"}
    for r in a:
        if r.kind == "adapter":
            assert r.model == r.group and r.group in ADAPTERS
        elif r.kind == "chat":
            assert r.group in TENANTS and r.messages[0]["role"] == "system"
        else:
            assert r.prompt and not r.messages
    # Requests of one tenant share the system prompt (the prefix the EPP can route on).
    by_tenant: dict[str, set[str]] = {}
    for r in a:
        if r.kind == "chat":
            by_tenant.setdefault(r.group, set()).add(r.messages[0]["content"])
    assert by_tenant and all(len(prompts) == 1 for prompts in by_tenant.values())
    with pytest.raises(ValueError, match="at least one request"):
        plan(0)
    with pytest.raises(ValueError, match="rate"):
        plan(5, rate=0)


def outcome(req: DemoRequest, server: str = "", ok: bool = True, cached: int = 0, ttft: float | None = None,
            error: str = "") -> Outcome:
    return Outcome(req, ok=ok, error=error, server=server, latency=0.5, ttft=ttft, prompt_tokens=1000,
                   cached_tokens=cached, completion_tokens=10)


def test_summary_counts_per_endpoint_and_keeps_idle_ones() -> None:
    reqs = plan(5, seed=4)
    outs = [outcome(reqs[0], "sim-0", cached=900, ttft=0.1), outcome(reqs[1], "sim-0", cached=PREFIX_HIT_TOKENS - 1),
            outcome(reqs[2], "sim-1", ttft=0.3), outcome(reqs[3], ok=False, error="boom"), outcome(reqs[4], "sim-9")]
    whys = {reqs[0].request_id: explain(record([{"q": 1.0}, {"q": 0.0}])), reqs[1].request_id: None}
    s = summarize(outs, whys, [("sim-0", "a:1", 1.0), ("sim-1", "a:2", 1.0), ("sim-2", "a:3", 0.5)])
    assert [e.name for e in s.endpoints] == ["sim-0", "sim-1", "sim-2"]
    e0, e1, e2 = s.endpoints
    assert (e0.requests, e0.prefix_hits, e0.cached_share) == (2, 1, (900 + PREFIX_HIT_TOKENS - 1) / 2000)
    assert e0.mean_client_ttft == pytest.approx(0.1) and e1.mean_client_ttft == pytest.approx(0.3)
    assert (e2.requests, e2.mean_latency, e2.mean_client_ttft) == (0, None, None)
    assert (s.ok, len(s.failed), s.total, s.unknown_server) == (4, 1, 5, 1)
    assert s.decided_by["q"] == 1 and s.decided_by["unknown"] == 3


SIM_PAGE = """\
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{model_name="base",engine="0",le="0.1"} 1.0
vllm:time_to_first_token_seconds_bucket{model_name="base",engine="0",le="+Inf"} 2.0
vllm:time_to_first_token_seconds_count{model_name="base",engine="0"} 2.0
vllm:time_to_first_token_seconds_sum{model_name="base",engine="0"} 0.5
vllm:time_to_first_token_seconds_bucket{model_name="sql-lora",engine="0",le="+Inf"} 2.0
vllm:time_to_first_token_seconds_count{model_name="sql-lora",engine="0"} 2.0
vllm:time_to_first_token_seconds_sum{model_name="sql-lora",engine="0"} 0.3
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="base",engine="0"} 3.0
"""


def test_histogram_mean_over_every_series() -> None:
    assert histogram_mean(SIM_PAGE) == pytest.approx(0.8 / 4)
    assert histogram_mean("# TYPE x gauge\nx 1\n") is None
    with pytest.raises(ValueError):
        histogram_mean("vllm:time_to_first_token_seconds_sum{ garbage\n")


@pytest.fixture
async def decisions_server() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A real HTTP server answering /debug/decisions from a mutable list."""
    state: dict[str, Any] = {"decisions": [], "fetches": 0, "status": 200}

    async def handler(req: web.Request) -> web.Response:
        state["fetches"] += 1
        await asyncio.sleep(0.05)  # long enough for concurrent lookups to pile up
        if state["status"] != 200:
            return web.Response(status=state["status"], text="nope")
        n = int(req.query["n"])
        return web.json_response({"decisions": state["decisions"][:n]})

    app = web.Application()
    app.router.add_get("/debug/decisions", handler)
    runner, port = await serve_app(app)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        await runner.cleanup()


async def test_feed_fetches_once_for_concurrent_lookups(decisions_server: tuple[str, dict[str, Any]]) -> None:
    url, state = decisions_server
    state["decisions"] = [record([{"q": 1.0}], request_id=f"r{i}") for i in range(10)]
    async with aiohttp.ClientSession() as http:
        feed = DecisionFeed(http, url)
        found = await asyncio.gather(*(feed.get(f"r{i}") for i in range(10)))
        assert [d["request_id"] for d in found if d] == [f"r{i}" for i in range(10)]
        assert state["fetches"] == 1
        assert await feed.get("r3") is found[3] and state["fetches"] == 1  # cached
        assert await feed.get("missing") is None and state["fetches"] == 3  # two tries, then give up
        state["status"] = 500
        assert await feed.get("also-missing") is None and feed.errors == 2

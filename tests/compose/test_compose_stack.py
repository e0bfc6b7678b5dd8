"""docker-compose.yml for real: built and started under a Docker engine, used as a user would.

OpenAI requests go through Envoy's published port; the EPP's /debug/decisions shows that it
picked the server that answered. A mock server is killed under steady traffic and restarted;
Prometheus (the observability profile, without Grafana) scrapes every service, and every query
of the shipped Grafana dashboard runs against it. See conftest.py for how the stack comes up.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from compose_project import REPORT, ROOT, Stack, docker

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LORA = "sql-lora"
KILLED = "vllm-mock-1"
# Issue 14's bound: a crash may cost the requests already on the server, no more. The traffic
# comes from as many back-to-back clients, so at most that many can be on it when it dies (the
# same short prompt makes the prefix scorer pile them onto one server: all of them can be).
MAX_FAILED_ON_KILL = 3
# A prompt many KV blocks long, repeated to exercise prefix-aware routing and the servers' cache.
LONG_PROMPT = " ".join(f"word{i}" for i in range(400))
TIMEOUT = aiohttp.ClientTimeout(total=60)


@dataclass
class Reply:
    request_id: str
    model: str
    status: int
    server: str | None  # x-sim-server: the mock that answered
    body: Any  # parsed JSON, or the list of SSE events of a stream


async def send(http: aiohttp.ClientSession, stack: Stack, path: str, payload: dict[str, Any]) -> Reply:
    request_id = f"compose-test-{uuid.uuid4()}"
    headers = {"x-request-id": request_id}
    async with http.post(stack.api + path, json=payload, headers=headers, timeout=TIMEOUT) as resp:
        if payload.get("stream"):
            body: Any = [line.decode().removeprefix("data: ").strip() async for line in resp.content
                         if line.startswith(b"data: ")]
        else:
            text = await resp.text()
            body = json.loads(text) if resp.content_type == "application/json" else text
        return Reply(request_id, payload["model"], resp.status, resp.headers.get("x-sim-server"), body)


def completion(model: str = MODEL, prompt: str = "Hello", max_tokens: int = 8) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens}


def chat(model: str = MODEL, content: str = "Hello", max_tokens: int = 8, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream}


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url, timeout=TIMEOUT) as resp:
        assert resp.status == 200, f"GET {url}: {resp.status}"
        return await resp.json(content_type=None)


async def decisions(http: aiohttp.ClientSession, stack: Stack) -> dict[str, dict[str, Any]]:
    data = await get_json(http, stack.epp + "/debug/decisions?n=500")
    return {d["request_id"]: d for d in data["decisions"]}


def assert_decided(stack: Stack, reply: Reply, decided: dict[str, dict[str, Any]]) -> None:
    d = decided.get(reply.request_id)
    assert d is not None, f"the EPP has no decision for {reply.request_id} ({reply.model})"
    assert d["model"] == reply.model
    assert stack.mock_of(d["pick"]) == reply.server, f"EPP picked {d['pick']}, {reply.server} answered"


async def test_openai_requests_through_envoy_are_decided_by_the_epp(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        plain = await send(http, stack, "/v1/completions", completion(max_tokens=6))
        chatted = await send(http, stack, "/v1/chat/completions", chat(max_tokens=6))
        streamed = await send(http, stack, "/v1/chat/completions", chat(max_tokens=6, stream=True))
        adapter = await send(http, stack, "/v1/completions", completion(LORA, "SELECT", max_tokens=6))
        unknown = await send(http, stack, "/v1/completions", completion("no-such-model"))
        decided = await decisions(http, stack)

    for reply in (plain, chatted, streamed, adapter):
        assert reply.status == 200, (reply.model, reply.status, reply.body)
        assert reply.server in stack.mock_ips
        assert_decided(stack, reply, decided)
    assert plain.body["object"] == "text_completion" and plain.body["usage"]["completion_tokens"] == 6
    assert plain.body["choices"][0]["text"]
    assert chatted.body["object"] == "chat.completion" and chatted.body["choices"][0]["message"]["content"]
    assert adapter.body["model"] == LORA and adapter.body["usage"]["completion_tokens"] == 6
    events = streamed.body
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 6 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    # A model nobody serves: scheduled like any other, and the server's 404 comes back unchanged.
    assert unknown.status == 404 and "does not exist" in unknown.body["error"]["message"]
    assert_decided(stack, unknown, decided)


async def test_a_repeated_long_prompt_stays_on_one_server_and_hits_its_prefix_cache(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        replies = [await send(http, stack, "/v1/completions", completion(prompt=LONG_PROMPT, max_tokens=2))
                   for _ in range(4)]
    assert all(r.status == 200 for r in replies)
    assert len({r.server for r in replies}) == 1, [r.server for r in replies]
    cached = [r.body["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies]
    assert cached[0] < cached[-1] and cached[-1] > 0, cached


async def steady_traffic(stack: Stack, stop: asyncio.Event, results: list[tuple[float, int | str, str | None]],
                         workers: int = MAX_FAILED_ON_KILL) -> None:
    """``workers`` clients, each sending short completions back to back until ``stop``."""
    async def client(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = await send(http, stack, "/v1/completions", completion(max_tokens=4))
                results.append((started, r.status, r.server))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                results.append((started, repr(e), None))

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(workers)))


async def test_killing_a_mock_under_steady_traffic_fails_only_the_requests_it_had(stack: Stack) -> None:
    container = stack.project.container(KILLED)
    stop = asyncio.Event()
    results: list[tuple[float, int | str, str | None]] = []
    traffic = asyncio.create_task(steady_traffic(stack, stop, results))
    try:
        await asyncio.sleep(3)
        served_before = {s for _, status, s in results if status == 200}
        killed_at = time.monotonic()
        await asyncio.to_thread(docker, "kill", container)
        await asyncio.sleep(10)
    finally:
        stop.set()
        await traffic
    failed = [(round(t - killed_at, 2), status) for t, status, _ in results if status != 200]
    after = Counter(s for t, status, s in results if status == 200 and t > killed_at + 3)
    REPORT.append(f"killing {KILLED}: {len(failed)} of {len(results)} requests failed "
                  f"(seconds after the kill, status): {failed}")
    assert KILLED in served_before, f"{KILLED} got no traffic before it was killed: {served_before}"
    assert len(failed) <= MAX_FAILED_ON_KILL, (
        f"{len(failed)} of {len(results)} requests failed when {KILLED} was killed "
        f"(seconds after the kill, status): {failed}")
    assert KILLED not in after and sum(after.values()) > 20, after


async def test_a_restarted_mock_gets_traffic_again(stack: Stack) -> None:
    container = stack.project.container(KILLED)
    if docker("inspect", "--format", "{{.State.Running}}", container).strip() == "true":
        await asyncio.to_thread(docker, "kill", container)  # the kill test did not run or got no further
    await asyncio.to_thread(docker, "start", container)
    started = time.monotonic()
    # What failures a crash may cost is the kill test's business; this one is about coming back.
    served: Counter[tuple[int, str | None]] = Counter()
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < started + 60:
            reply = await send(http, stack, "/v1/completions", completion(max_tokens=2))
            served[reply.status, reply.server] += 1
            if reply.status == 200 and reply.server == KILLED:
                assert_decided(stack, reply, await decisions(http, stack))
                REPORT.append(f"{KILLED} served again {time.monotonic() - started:.1f} s after its restart; "
                              f"replies meanwhile (status, server): {dict(served)}")
                return
            await asyncio.sleep(0.05)
    pytest.fail(f"{KILLED} got no traffic within 60 s of its restart; replies (status, server): {dict(served)}")


# --- observability ---------------------------------------------------------------------------
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "epp.json"
# Grafana's $__rate_interval is at least four scrape intervals (5 s here); one minute is safely above.
RATE_INTERVAL = "1m"
SCRAPE_JOBS = {"epp": 1, "vllm": 3, "envoy": 1}


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]


async def prometheus_targets(http: aiohttp.ClientSession, stack: Stack) -> list[dict[str, Any]]:
    return (await get_json(http, stack.prometheus + "/api/v1/targets"))["data"]["activeTargets"]


async def test_prometheus_scrapes_the_epp_the_mocks_and_envoy(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            targets = await prometheus_targets(http, stack)
            up = Counter(t["labels"]["job"] for t in targets if t["health"] == "up")
            if up == SCRAPE_JOBS:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"targets not all up after 60 s: "
                            f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}")
            await asyncio.sleep(1)


async def test_every_dashboard_query_parses_and_returns_data(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        # A minute's window of everything the panels show: plain, LoRA and unknown-model requests
        # (errors by code) and a repeated long prompt (cached tokens, prefix-index hits).
        t_end = time.monotonic() + 12
        while time.monotonic() < t_end:
            for payload in (completion(), completion(LORA, "SELECT"), completion(prompt=LONG_PROMPT, max_tokens=2),
                            completion("no-such-model")):
                await send(http, stack, "/v1/completions", payload)
        await asyncio.sleep(6)  # one more scrape after the traffic
        problems = []
        for title, expr in dashboard_queries():
            query = expr.replace("$__rate_interval", RATE_INTERVAL)
            url = stack.prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
            async with http.get(url, timeout=TIMEOUT) as resp:
                answer = await resp.json(content_type=None)
            if answer.get("status") != "success":
                problems.append(f"{title}: {query}: {answer.get('errorType')}: {answer.get('error')}")
            elif not answer["data"]["result"]:
                problems.append(f"{title}: {query}: no data")
    assert not problems, "dashboard queries that fail or return nothing:\n" + "\n".join(problems)

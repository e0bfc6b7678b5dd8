"""Open-loop load generator: replays a workload against one base URL with streaming requests.

Requests are sent at their scheduled times whatever happens to earlier ones (open loop), so a
slow router meets the same offered load as a fast one. Each request streams (SSE) so we can
time the first *token*: the first chunk with non-empty text; a chat stream's leading role-only
chunk does not count. Only the chunks up to the first token and the final usage chunk are
parsed as JSON; the rest are counted, which keeps the client cheap on a 2-core machine shared
with the system under test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from epp.bench.workloads import BenchRequest, Workload

# The sim names the server that answered (epp/sim/server.py); routers pass it through.
SERVER_ADDRESS_HEADER = "x-sim-address"
# The EPP's flow control (upstream's names): time queued, and why a request was refused.
QUEUE_DURATION_HEADER = "x-llm-d-flow-queue-duration-ms"
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
# Sent with every request so a router's decision log can be joined with the client's results.
REQUEST_ID_HEADER = "x-request-id"


def request_id(index: int) -> str:
    return f"bench-{index}"


@dataclass(slots=True)
class RequestResult:
    index: int
    group: str
    prompt_tokens: int
    scheduled: float  # wall seconds after the run started
    lag: float = 0.0  # how late the client sent it (a sign of a saturated client)
    status: int = 0
    ttft: float | None = None  # wall seconds, request sent -> first token
    e2e: float | None = None  # wall seconds, request sent -> stream end
    output_tokens: int = 0
    cached_tokens: int | None = None
    server: str = ""
    error: str = ""
    queue_ms: float | None = None  # time queued in the EPP's flow control (its response header)
    dropped: str = ""  # why the EPP answered itself (x-llm-d-request-dropped-reason)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.ttft is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _has_token(payload: bytes) -> bool:
    """Does an SSE JSON payload carry generated text (completions ``text`` or chat ``delta.content``)?"""
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    for choice in doc.get("choices") or ():
        if choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if delta.get("content"):
            return True
    return False


async def _one(session: aiohttp.ClientSession, url: str, req: BenchRequest, res: RequestResult,
               timeout: float) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=req.body(stream=True),
                                headers={REQUEST_ID_HEADER: request_id(req.index), **dict(req.headers)},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            res.status = resp.status
            res.server = resp.headers.get(SERVER_ADDRESS_HEADER, "")
            queued = resp.headers.get(QUEUE_DURATION_HEADER)
            if queued is not None:
                try:
                    res.queue_ms = float(queued)
                except ValueError:
                    pass
            res.dropped = resp.headers.get(DROPPED_REASON_HEADER, "")
            if resp.status != 200:
                res.error = (await resp.text())[:300]
                return
            chunks = 0
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    break
                if b'"prompt_tokens"' in payload:  # the usage chunk (include_usage)
                    usage = json.loads(payload).get("usage") or {}
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        res.cached_tokens = int(details["cached_tokens"])
                    continue
                if b'"error"' in payload:
                    res.error = payload.decode(errors="replace")[:300]
                    continue
                if res.ttft is None:
                    if _has_token(payload):
                        res.ttft = time.perf_counter() - t0
                        chunks += 1
                else:
                    chunks += 1
            res.e2e = time.perf_counter() - t0
            if not res.output_tokens:
                res.output_tokens = chunks
            if res.ttft is None and not res.error:
                res.error = "stream ended without a token"
    except asyncio.TimeoutError:
        res.error = f"timeout after {timeout:g}s"
    except aiohttp.ClientError as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]


async def run_workload(
    base_url: str | Sequence[str],
    workload: Workload,
    *,
    time_scale: float = 1.0,
    request_timeout: float = 300.0,
    progress: Callable[[int, int], None] | None = None,
    direct_urls: Sequence[str] = (),
    events: Sequence[tuple[float, Callable[[], Awaitable[None]]]] = (),
) -> list[RequestResult]:
    """Send every request of ``workload`` to ``base_url`` at ``at * time_scale`` wall seconds.

    Several base URLs (router replicas) take turns; a request with ``direct >= 0`` goes to
    ``direct_urls[direct]`` instead. ``events`` are ``(model seconds, coroutine function)`` run
    in the background at that time (e.g. restarting a server). Returns one result per request,
    in workload order. ``progress(done, total)`` is called as requests finish.
    """
    bases = [u.rstrip("/") for u in ([base_url] if isinstance(base_url, str) else base_url)]
    directs = [u.rstrip("/") for u in direct_urls]
    reqs = workload.requests
    results = [RequestResult(index=r.index, group=r.group, prompt_tokens=r.prompt_tokens,
                             scheduled=r.at * time_scale) for r in reqs]
    done = 0

    async def tracked(req: BenchRequest, res: RequestResult, base: str) -> None:
        nonlocal done
        await _one(session, base + req.path, req, res, request_timeout)
        done += 1
        if progress is not None:
            progress(done, len(reqs))

    # No connection cap: an open-loop client must never queue requests itself.
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()

        async def at(when: float, action: Callable[[], Awaitable[None]]) -> None:
            await asyncio.sleep(max(0.0, start + when * time_scale - time.perf_counter()))
            await action()

        try:
            tasks.extend(asyncio.create_task(at(when, action)) for when, action in events)
            routed = 0
            for req, res in zip(reqs, results):
                delay = start + res.scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                res.lag = max(0.0, time.perf_counter() - start - res.scheduled)
                if req.direct >= 0:
                    base = directs[req.direct]
                else:
                    base = bases[routed % len(bases)]
                    routed += 1
                tasks.append(asyncio.create_task(tracked(req, res, base)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return results

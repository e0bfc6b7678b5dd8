"""The paced load generator against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from local_servers import serve_app

from epp.bench.pacedload import paced


async def _server(handler) -> tuple[web.AppRunner, str, dict[str, int]]:
    seen = {"requests": 0, "connections": 0}

    async def counting(request: web.Request) -> web.StreamResponse:
        seen["requests"] += 1
        assert await request.read() == b'{"x": 1}'
        return await handler(request)

    app = web.Application()
    app.router.add_post("/p", counting)
    runner, port = await serve_app(app)
    return runner, f"http://127.0.0.1:{port}/p", seen


async def test_sends_the_scheduled_number_of_requests_and_times_each():
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    runner, url, seen = await _server(ok)
    try:
        res = await paced(url, b'{"x": 1}', rate=200, seconds=0.5)
    finally:
        await runner.cleanup()
    assert res.sent == 100 and res.ok == 100 and res.errors == 0
    assert seen["requests"] == 100
    assert len(res.latencies_ms) == 100 and all(x > 0 for x in res.latencies_ms)


async def test_a_slow_response_does_not_hold_back_later_sends():
    """Open loop: while one request hangs, the schedule goes on over new connections."""
    calls = 0

    async def first_slow(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.4)
        return web.Response(text="ok")

    runner, url, seen = await _server(first_slow)
    try:
        res = await paced(url, b'{"x": 1}', rate=100, seconds=0.3)
    finally:
        await runner.cleanup()
    assert res.sent == 30 and res.ok == 30
    assert res.connections >= 2
    assert max(res.latencies_ms) >= 350  # the slow one is timed, not hidden
    assert sorted(res.latencies_ms)[15] < 100


async def test_non_200_answers_count_as_errors():
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    runner, url, _ = await _server(fail)
    try:
        res = await paced(url, b'{"x": 1}', rate=100, seconds=0.1, arrivals="poisson")
    finally:
        await runner.cleanup()
    assert res.ok == 0 and res.errors == res.sent > 0


async def test_unknown_arrival_process_is_refused():
    with pytest.raises(ValueError, match="arrivals"):
        await paced("http://127.0.0.1:1/", b"", rate=1, seconds=0.1, arrivals="bursty")

"""The trivial model-server stand-in the overhead and streaming benchmarks run in a child process."""

from __future__ import annotations

from typing import Any, Awaitable, Callable


def serve_backend(name: str, port: int, post: Callable[[Any], Awaitable[Any]], metrics_page: Any) -> None:
    """Serve ``post`` for every POST path and ``metrics_page`` on GET /metrics; blocks.

    Prints ``<name> backend ready port=<port>`` once listening, which the parent waits for.
    """
    from aiohttp import web

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=metrics_page, content_type="text/plain")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/{tail:.*}", post)
    print(f"{name} backend ready port={port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)

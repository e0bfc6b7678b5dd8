"""The trivial model-server stand-in the overhead and streaming benchmarks run in a child process."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from epp.bench.procs import ProcessGroup


def start_backend(group: "ProcessGroup", module: str, name: str, timeout: float = 30.0) -> str:
    """Run ``python -m <module> --backend PORT`` (which calls ``serve_backend(name, ...)``) in
    ``group``; returns its ``127.0.0.1:PORT`` once it accepts connections."""
    from epp.bench.procs import free_port

    port = free_port()
    proc = group.start("backend", [sys.executable, "-m", module, "--backend", str(port)])
    group.wait_for_log(proc, rf"{name} backend ready", timeout=timeout)
    group.wait_for_tcp(proc, "127.0.0.1", port, timeout=timeout)  # the line is printed before binding
    return f"127.0.0.1:{port}"


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

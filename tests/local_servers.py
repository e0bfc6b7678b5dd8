"""Test servers on 127.0.0.1: an aiohttp application on a free port, for any test directory."""

from __future__ import annotations

import ssl

from aiohttp import web


async def serve_app(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Start ``app`` on a free 127.0.0.1 port (TLS with ``ssl_context``); returns (runner, port).
    The caller stops it with ``await runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

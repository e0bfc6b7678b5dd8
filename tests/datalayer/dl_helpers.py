"""Helpers of the data-layer tests: real model-server stand-ins (aiohttp servers on
127.0.0.1) and building plugins and collectors the way the config loader does."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any, Callable

from aiohttp import web
from waiting import wait_until  # noqa: F401  (re-exported)

from epp.bench.metric_pages import EngineState, sglang_page, vllm_page  # noqa: F401  (re-exported)
from epp.config.model import SourceWiring
from epp.datalayer.collector import Collector
from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.pool import EndpointPool
from epp.framework import decode_params, registry
from epp.observability.metrics import REGISTRY


class PageServer:
    """Serves ``/metrics`` (a settable page) and ``/v1/models``; counts requests per path.

    ``mode`` switches misbehaviour: ``ok``, ``status`` (HTTP ``status``), ``hang`` (never
    answers), ``cut`` (drops the connection mid-body), ``slow`` (answers after ``delay`` s).
    """

    def __init__(self, page: bytes, models: list[dict[str, Any]] | None = None) -> None:
        self.page = page
        self.models = models if models is not None else [{"id": "base-model", "parent": None}]
        self.hits: Counter[str] = Counter()
        self.mode = "ok"
        self.status = 500
        self.delay = 0.0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self, port: int = 0) -> "PageServer":
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _misbehave(self, request: web.Request) -> web.StreamResponse | None:
        if self.mode == "status":
            return web.Response(status=self.status, text="engine overloaded")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if self.mode == "cut":
            resp = web.StreamResponse(headers={"Content-Length": str(len(self.page))})
            await resp.prepare(request)
            await resp.write(self.page[: len(self.page) // 3])
            assert request.transport is not None
            request.transport.close()
            return resp
        return None

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.hits["/metrics"] += 1
        bad = await self._misbehave(request)
        if bad is not None:
            return bad
        return web.Response(body=self.page, content_type="text/plain", charset="utf-8")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.hits["/v1/models"] += 1
        bad = await self._misbehave(request)
        if bad is not None:
            return bad
        return web.Response(text=json.dumps({"object": "list", "data": self.models}), content_type="application/json")


def counter(metric: str, /, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


POLL_ERRORS = "llm_d_inference_scheduler_datalayer_poll_errors_total"
EXTRACT_ERRORS = "llm_d_inference_scheduler_datalayer_extract_errors_total"


def plugin(type_name: str, params: dict[str, Any] | None = None, name: str | None = None) -> Any:
    spec = registry.get(type_name)
    return spec.cls(name or type_name, decode_params(spec.params, params or {}))  # type: ignore[misc]


def wiring(source: Any, *extractors: Any) -> SourceWiring:
    return SourceWiring(source, tuple(extractors))


def meta(srv: Any, **kw: Any) -> EndpointMetadata:
    return EndpointMetadata(address="127.0.0.1", port=srv.port, **kw)


async def close_all(collector: Collector) -> None:
    await collector.stop()
    for w in collector.wirings:
        await w.source.close()
        for ex in w.extractors:
            await ex.close()


def pool_of(*metas: EndpointMetadata, name: str = "test-pool") -> EndpointPool:
    pool = EndpointPool(name)
    pool.sync(metas)
    return pool

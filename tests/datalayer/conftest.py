"""Fixtures of the data-layer tests (helpers live in dl_helpers.py)."""

from __future__ import annotations

from typing import Any

import pytest
from dl_helpers import PageServer

from epp.bench.metric_pages import vllm_page


@pytest.fixture
async def servers():
    """Factory of started PageServers; all are stopped at the end of the test."""
    started: list[PageServer] = []

    async def make(page: bytes | None = None, **kw: Any) -> PageServer:
        srv = await PageServer(page if page is not None else vllm_page(), **kw).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop()

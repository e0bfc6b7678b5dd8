"""Helpers of the Kubernetes discovery tests: an in-memory API server on the test's loop."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from epp.bench.kubeapi import KubeApiServer, KubeStore, write_kubeconfig
from epp.discovery.kubeclient import KubeClient

TOKEN = "test-token"


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def start_api(tmp_path, store: KubeStore | None = None, **kw) -> tuple[KubeApiServer, KubeClient]:
    api = await KubeApiServer(store, token=TOKEN, **kw).start()
    kc = write_kubeconfig(tmp_path / "kubeconfig", api.url, TOKEN)
    return api, KubeClient.from_options(kc, timeout=2.0)

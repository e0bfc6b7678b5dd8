"""Builders for scheduling tests: real endpoints, candidates, requests and registry-made plugins."""

from __future__ import annotations

from typing import Any

import plugins  # noqa: F401  (registers the built-ins)
from epp.datalayer.endpoint import Endpoint, EndpointMetadata, Metrics, now
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest
from epp.framework.handle import PluginHandle


def endpoint(address: str = "10.0.0.1", port: int = 8000, *, labels: dict[str, str] | None = None,
             name: str = "", fresh: bool = True, **metrics: Any) -> Endpoint:
    """An Endpoint whose metrics were (by default) just updated."""
    if fresh:
        metrics.setdefault("update_time", now())
    return Endpoint(EndpointMetadata(address, port, name=name, labels=labels or {}), Metrics(**metrics))


def cand(address: str = "10.0.0.1", port: int = 8000, **kw: Any) -> Candidate:
    return Candidate(endpoint(address, port, **kw))


def cands(n: int, **kw: Any) -> list[Candidate]:
    return [cand(f"10.0.0.{i + 1}", 8000, **kw) for i in range(n)]


def request(model: str = "m", prefix: bytes = b"", headers: dict[str, str] | None = None, rid: str = "r1",
            **kw: Any) -> InferenceRequest:
    return InferenceRequest(request_id=rid, headers=headers or {}, incoming_model=model, target_model=model,
                            prefix_input=prefix, **kw)


def cycle() -> CycleState:
    return CycleState()


def make(type_name: str, params: Any = None, name: str | None = None, h: PluginHandle | None = None) -> Any:
    """A plugin built by the registry's factory, as the config loader builds it."""
    return (h or PluginHandle()).create(type_name, name, params)

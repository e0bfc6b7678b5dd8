"""Value types that cross plugin boundaries: the request, the response, candidates, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from epp.datalayer.endpoint import Endpoint, EndpointMetadata, Metrics


DEFAULT_FAIRNESS_ID = "default-flow"  # upstream's flow when a request names no fairness id


@dataclass(slots=True)
class InferenceRequest:
    """One HTTP inference request as the plugins see it.

    ``payload`` is the parsed JSON body (None for non-JSON parsers). ``prefix_input`` is the
    text the prefix-cache producer hashes (prompt, or serialized chat messages), derived by
    the parser. ``headers`` may be extended by plugins: every header a plugin adds is sent
    upstream with the routing decision.
    """

    request_id: str
    headers: dict[str, str]
    body: bytes = b""
    payload: dict[str, Any] | None = None
    api: str = "completions"  # completions | chat/completions | responses | conversations | embeddings
    path: str = "/v1/completions"
    incoming_model: str = ""
    target_model: str = ""
    stream: bool = False
    priority: int = 0
    objective: str = ""
    fairness_id: str = DEFAULT_FAIRNESS_ID  # the tenant, for flow-control fairness
    slo_ttft_ms: float = 0.0  # latency objectives from the request's headers; 0 = none
    slo_tpot_ms: float = 0.0
    cache_salt: str = ""
    prefix_input: bytes = b""
    lora_adapter: str = ""
    added_headers: dict[str, str] = field(default_factory=dict)
    received_at: float = 0.0

    @property
    def size(self) -> int:
        return len(self.body)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class InferenceResponse:
    """What the EPP learned about the response so far (updated as chunks arrive)."""

    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    streaming: bool = False
    usage: Usage | None = None
    bytes: int = 0
    end_of_stream: bool = False
    # why the response ended: "complete", "client-disconnect", "error", "timeout"
    outcome: str = ""
    added_headers: dict[str, str] = field(default_factory=dict)
    # The proxy's dynamic metadata sent with the response headers (namespace -> values), when
    # its ext_proc filter forwards any (e.g. envoy.lb / x-gateway-destination-endpoint-served).
    metadata: Mapping[str, Any] | None = None


class Candidate:
    """An endpoint as one scheduling cycle sees it.

    ``metrics`` is read once when the cycle starts (a consistent snapshot). ``data`` holds
    per-request values written by data producers (e.g. prefix-match info), so concurrent
    requests never see each other's.
    """

    __slots__ = ("endpoint", "metadata", "metrics", "data", "key")

    def __init__(self, endpoint: "Endpoint") -> None:
        self.endpoint = endpoint
        self.metadata: EndpointMetadata = endpoint.metadata
        self.metrics: Metrics = endpoint.metrics
        self.data: dict[str, Any] = {}
        self.key: str = self.metadata.key  # ip:port, read in every scorer loop

    @property
    def attributes(self) -> Mapping[str, Any]:
        return self.endpoint.attributes

    def __repr__(self) -> str:
        return f"<Candidate {self.key}>"

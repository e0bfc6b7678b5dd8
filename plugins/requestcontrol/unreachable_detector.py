"""``unreachable-endpoint-detector``: when the proxy could not reach the picked endpoint, take
it out of scheduling at once, before any scrape notices (passive health checking).

What reaches the EPP when Envoy cannot connect to the endpoint (observed with Envoy 1.40, both
``envoy.yaml`` and ``envoy-buffered.yaml``): the router's local reply comes down the response
path of the same ext_proc stream, as response headers ``:status: 503``,
``content-type: text/plain``, ``content-length`` and nothing else (no ``date``, no
``x-envoy-upstream-service-time``, which Envoy adds to every answer an upstream gave), then,
in full duplex only, the body ``upstream connect error or disconnect/reset before headers.
reset reason: remote connection failure`` (``connection termination`` when the server died
with the request in flight, ``connection timeout``, ``overflow``...). The ``envoy.lb``
metadata still holds the EPP's own pick; stock Envoy adds no served-endpoint key.

If the ext_proc filter is configured with ``response_attributes`` (ours are), the same
message carries ``upstream.address`` (the endpoint Envoy tried), ``response.flags`` (``UF``
connection failure = 0x20, ``UC`` termination = 0x40, ``UR`` remote reset = 0x10,
``UO`` overflow = 0x80) and ``response.code_details`` (e.g.
``upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}``),
which this plugin prefers: they are exact. Without them it recognises the local reply by its
headers, which a model server's own 503 cannot be confused with while the router adds
``x-envoy-upstream-service-time`` (its default; with ``suppress_envoy_headers`` configure the
attributes).

Not counted: circuit-breaker overflow (``UO``, ``x-envoy-overloaded``: the proxy is busy, not
the endpoint), timeouts (504), and any answer the endpoint itself gave. The endpoint returns
with the first good scrape (``EndpointPool.exclude``); a successful response from it resets
the hold that repeated exclusions build up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from epp.datalayer.pool import EndpointPool
from epp.extproc.messages import LB_NAMESPACE
from epp.framework import Plugin, ResponseReceived, register
from epp.framework.plugin import Handle
from epp.framework.types import InferenceRequest, InferenceResponse
from epp.observability.metrics import ENDPOINT_EXCLUSIONS

UPSTREAM_SERVICE_TIME = "x-envoy-upstream-service-time"
OVERLOADED = "x-envoy-overloaded"
SERVED_KEY = "x-gateway-destination-endpoint-served"

# Envoy's response flags (StreamInfo::CoreResponseFlag bit positions).
UPSTREAM_REMOTE_RESET = 1 << 4  # UR
UPSTREAM_CONNECTION_FAILURE = 1 << 5  # UF
UPSTREAM_CONNECTION_TERMINATION = 1 << 6  # UC
UPSTREAM_OVERFLOW = 1 << 7  # UO
_UNREACHABLE_FLAGS = UPSTREAM_REMOTE_RESET | UPSTREAM_CONNECTION_FAILURE | UPSTREAM_CONNECTION_TERMINATION
_RESET_DETAILS = "upstream_reset_before_response_started"


def proxy_could_not_reach(status: int, headers: Mapping[str, str], attributes: Mapping[str, Any]) -> str | None:
    """Why this response says the proxy could not reach the endpoint, or None if it does not."""
    if status != 503:
        return None
    if "response.flags" in attributes or "response.code_details" in attributes:
        try:
            flags = int(attributes.get("response.flags") or 0)
        except (TypeError, ValueError):
            flags = 0
        details = str(attributes.get("response.code_details") or "")
        if flags & UPSTREAM_OVERFLOW:
            return None
        if flags & _UNREACHABLE_FLAGS or details.startswith(_RESET_DETAILS):
            return details or f"response flags {flags:#x}"
        return None
    if UPSTREAM_SERVICE_TIME in headers or OVERLOADED in headers or "date" in headers:
        return None  # the endpoint answered (or the proxy was overloaded)
    return "the proxy answered 503 itself (connection failure or reset before the response)"


def tried_endpoint(response: InferenceResponse, attributes: Mapping[str, Any], target: str) -> str:
    """The endpoint the proxy tried: its own report if it gave one, else the EPP's first pick."""
    address = attributes.get("upstream.address")
    if isinstance(address, str) and address:
        return address
    metadata = response.metadata
    if metadata is not None:
        lb = metadata.get(LB_NAMESPACE)
        if isinstance(lb, dict) and isinstance(lb.get(SERVED_KEY), str) and lb[SERVED_KEY]:
            return lb[SERVED_KEY]
    return target.split(",", 1)[0]


@dataclass
class DetectorParams:
    enabled: bool = True  # every config gets this plugin by default; false turns it off


@register("unreachable-endpoint-detector")
class UnreachableEndpointDetector(Plugin, ResponseReceived):
    Params = DetectorParams

    def __init__(self, name: str | None = None, params: Any = None) -> None:
        super().__init__(name, params)
        self.pool: EndpointPool | None = None

    @classmethod
    def create(cls, name: str, params: DetectorParams, handle: Handle) -> "UnreachableEndpointDetector":
        detector = cls(name, params)
        detector.pool = handle.pool if params.enabled else None
        return detector

    async def start(self, handle: Handle) -> None:
        if self.params.enabled and handle.pool is not None:
            self.pool = handle.pool

    def response_received(self, request: InferenceRequest, response: InferenceResponse, target: str) -> None:
        pool = self.pool
        if pool is None:
            return
        status = response.status
        if status < 500:  # the hot path: one comparison, and a lookup only after an exclusion
            ep = pool.get(target)
            if ep is None and "," in target:  # a list with fallbacks: the one that answered
                ep = pool.get(tried_endpoint(response, getattr(response.metadata, "attributes", None) or {}, target))
            if ep is not None and ep.strikes:
                pool.response_succeeded(ep)
            return
        attributes = getattr(response.metadata, "attributes", None) or {}
        why = proxy_could_not_reach(status, response.headers, attributes)
        if why is None:
            return
        ep = pool.get(tried_endpoint(response, attributes, target))
        if ep is not None and pool.exclude(ep, f"the proxy could not reach it ({why})"):
            ENDPOINT_EXCLUSIONS.labels(pool.name, ep.metadata.name, "proxy-connect-failure").inc()

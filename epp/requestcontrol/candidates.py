"""Which endpoints a request may go to: the schedulable pool, narrowed by the subset hint.

The proxy may restrict a request to a subset of the pool with the
``envoy.lb.subset_hint`` / ``x-gateway-destination-endpoint-subset`` metadata. Upstream
accepts only a list and matches entries by IP; we also accept a comma-separated string
(as the lightweight upstream EPP does) and match an ``ip:port`` entry exactly, a bare ``ip``
entry against every port of that IP. The reason: outside Kubernetes several model servers
commonly share one IP (one host, several ports), where IP-only matching would make the hint
meaningless. A present-but-empty hint (or one matching nothing) yields no candidates: 503.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from epp.datalayer.endpoint import Endpoint

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"


def subset_hint(metadata: Mapping[str, Any] | None) -> list[str] | None:
    """The hint's entries, or None when there is no hint (all endpoints allowed)."""
    if not metadata:
        return None
    ns = metadata.get(SUBSET_NAMESPACE)
    if not isinstance(ns, Mapping) or SUBSET_KEY not in ns:
        return None
    raw = ns[SUBSET_KEY]
    if isinstance(raw, str):
        items: Iterable[Any] = raw.split(",")
    elif isinstance(raw, (list, tuple)):
        items = raw
    else:
        return []  # present but unusable: treat as an empty subset rather than "anything goes"
    return [s.strip() for s in items if isinstance(s, str) and s.strip()]


def _split(entry: str) -> tuple[str, int | None]:
    """``ip:port`` / ``[v6]:port`` / ``ip`` / ``v6`` -> (ip, port or None)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None  # bare IPv4, or bare IPv6 (several colons, no brackets)


def filter_by_subset(endpoints: Sequence[Endpoint], entries: list[str]) -> list[Endpoint]:
    exact: set[tuple[str, int]] = set()
    hosts: set[str] = set()
    for entry in entries:
        host, port = _split(entry)
        if port is None:
            hosts.add(host)
        else:
            exact.add((host, port))
    return [ep for ep in endpoints
            if ep.metadata.address in hosts or (ep.metadata.address, ep.metadata.port) in exact]

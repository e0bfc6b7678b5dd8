"""The data layer: endpoints, the pool, the collector, data sources and discovery."""

from epp.datalayer.endpoint import EMPTY_METRICS, Endpoint, EndpointMetadata, Metrics, join_host_port, now

__all__ = ["EMPTY_METRICS", "Endpoint", "EndpointMetadata", "Metrics", "join_host_port", "now"]

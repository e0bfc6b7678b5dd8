"""The data layer: endpoints, the pool, the collector, data sources and discovery."""

from epp.datalayer.endpoint import EMPTY_METRICS, Endpoint, EndpointMetadata, Metrics, join_host_port, now
from epp.datalayer.pool import EndpointPool, schedulable_endpoints

__all__ = [
    "EMPTY_METRICS", "Endpoint", "EndpointMetadata", "EndpointPool", "Metrics", "join_host_port", "now",
    "schedulable_endpoints",
]

"""Data-layer extension points: the hose (DataSource), the filters (Extractor), discovery.

A DataSource fetches one raw payload per endpoint per collector tick; every Extractor wired
to it receives that same payload. Payload types are declared on both sides
(``DataSource.output_type`` and ``Extractor.input_type``) and checked when the config is
loaded: the source's output type must be the extractor's input type or a subclass of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from epp.framework.plugin import Plugin

if TYPE_CHECKING:
    from epp.datalayer.endpoint import Endpoint, EndpointMetadata
    from epp.datalayer.pool import EndpointPool


class DataSource(Plugin, ABC):
    """Fetches one payload per endpoint per tick (e.g. a ``/metrics`` scrape)."""

    output_type: ClassVar[type] = object

    def bind(self, extractors: Sequence["Extractor"]) -> None:
        """Told once, at wiring time, which extractors read this source.

        A source may use it to fetch or parse only what they need (e.g. only the metric
        families some extractor asked for).
        """

    @abstractmethod
    async def collect(self, endpoint: "EndpointMetadata") -> Any:
        """Fetch and decode one payload of ``output_type``; raise on failure."""


class Extractor(Plugin, ABC):
    """Turns a source's payload into endpoint data (metrics, custom metrics, attributes)."""

    input_type: ClassVar[type] = object

    @abstractmethod
    def extract(self, data: Any, endpoint: "Endpoint") -> None:
        """Write what this extractor knows into ``endpoint``; raise on bad data.

        Runs on the collector's loop for every tick, so it must be cheap and must not
        block; it writes by swapping snapshots (``endpoint.update_metrics`` etc.).
        """


class Discovery(Plugin, ABC):
    """Keeps the endpoint pool in sync with the outside world (files, flags, Kubernetes)."""

    @abstractmethod
    async def run(self, pool: "EndpointPool") -> None:
        """Populate ``pool`` (``pool.sync``), then keep it current until cancelled."""


def type_label(tp: type) -> str:
    """How a payload type is named in error messages."""
    return getattr(tp, "__payload_name__", None) or f"{tp.__module__}.{tp.__qualname__}".replace("builtins.", "")

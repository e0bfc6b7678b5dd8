"""Errors of the data layer. The collector counts and logs them per endpoint; none is fatal."""

from __future__ import annotations


class DataSourceError(Exception):
    """A source could not produce a payload for one endpoint (HTTP error, bad body, ...)."""


class EndpointUnreachable(DataSourceError):
    """Nobody answers at the endpoint's address: connection refused, no route, unknown host, or
    no TCP handshake within the connect timeout. Unlike a slow or broken answer, this takes the
    endpoint out of scheduling at once (the collector then re-probes it quickly)."""


class ExtractError(Exception):
    """An extractor could not read what it needs from a payload (missing metric, NaN, ...)."""

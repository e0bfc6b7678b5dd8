"""Errors of the data layer. The collector counts and logs them per endpoint; none is fatal."""

from __future__ import annotations


class DataSourceError(Exception):
    """A source could not produce a payload for one endpoint (HTTP error, bad body, ...)."""


class ExtractError(Exception):
    """An extractor could not read what it needs from a payload (missing metric, NaN, ...)."""

"""``file-data-source``: a non-HTTP source reading one local file per endpoint.

For tests, sidecars that drop metrics into files, or node exporters' textfile directories.
``path`` is a template with ``{name}``, ``{namespace}``, ``{address}``, ``{port}`` and
``{metricsPort}``. ``format`` decides the output type: ``prometheus`` ->
PrometheusFamilies (parsed selectively, like the HTTP source), ``json`` -> JSONDocument,
``raw`` -> RawBytes. Files are read in a worker thread so a slow disk never blocks the loop.
"""

from __future__ import annotations

import asyncio
import json
import string
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.errors import DataSourceError
from epp.datalayer.payloads import JSONDocument, PrometheusFamilies, RawBytes
from epp.datalayer.promparse import PromParseError, families_wanted_by, parse
from epp.framework import register
from epp.framework.datalayer import DataSource, Extractor

_FIELDS = {"name", "namespace", "address", "port", "metricsPort"}
_OUTPUT = {"prometheus": PrometheusFamilies, "json": JSONDocument, "raw": RawBytes}


@dataclass
class FileSourceParams:
    path: str
    format: Literal["prometheus", "json", "raw"] = "prometheus"
    maxBytes: int = 16 * 1024 * 1024

    def validate(self) -> None:
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(self.path) if f is not None}
        except ValueError as e:
            raise ValueError(f"'path' {self.path!r} is not a valid template: {e}") from None
        unknown = used - _FIELDS
        if unknown:
            raise ValueError(f"'path' uses unknown field(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(_FIELDS))})")
        if self.maxBytes <= 0:
            raise ValueError("'maxBytes' must be > 0")


@register("file-data-source")
class FileDataSource(DataSource):
    Params = FileSourceParams

    def __init__(self, name: str | None = None, params: FileSourceParams | None = None) -> None:
        super().__init__(name, params)
        self.output_type = _OUTPUT[self.params.format]  # per instance: depends on `format`
        self.wanted: frozenset[str] | None = None

    def bind(self, extractors: Sequence[Extractor]) -> None:
        self.wanted = families_wanted_by(extractors)

    def path_for(self, ep: EndpointMetadata) -> str:
        return self.params.path.format(name=ep.name, namespace=ep.namespace, address=ep.address, port=ep.port,
                                       metricsPort=ep.metrics_port)

    async def collect(self, endpoint: EndpointMetadata) -> Any:
        path = self.path_for(endpoint)
        body = await asyncio.to_thread(_read, path, self.params.maxBytes)
        fmt = self.params.format
        try:
            if fmt == "prometheus":
                return parse(body, self.wanted)
            if fmt == "json":
                return JSONDocument(json.loads(body))
        except (PromParseError, ValueError) as e:
            raise DataSourceError(f"{path}: {e}") from None
        return RawBytes(body)


def _read(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise DataSourceError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise DataSourceError(f"{path}: larger than the {limit}-byte limit")
    return data

"""Payload types that data sources produce and extractors consume.

The config loader wires a source to an extractor only if
``issubclass(source.output_type, extractor.input_type)``; ``__payload_name__`` is how a
type is named in the error. ``Payload`` is the common base, so an extractor declaring
``input_type = Payload`` accepts anything a built-in source produces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple


class Payload:
    """Base of every data-layer payload type."""

    __payload_name__ = "Payload"


class Sample(NamedTuple):
    """One exposition line: ``name{labels} value [timestamp_ms]``."""

    name: str
    labels: Mapping[str, str]
    value: float
    timestamp_ms: int | None = None


# Series-name suffixes that belong to a family of the given type (text format 0.0.4 plus
# the OpenMetrics spellings some exporters use in text format).
FAMILY_SUFFIXES: dict[str, tuple[str, ...]] = {
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("_sum", "_count", "_created"),
    "counter": ("_total", "_created"),
    "info": ("_info",),
}
ALL_SUFFIXES: tuple[str, ...] = tuple(sorted({s for v in FAMILY_SUFFIXES.values() for s in v}))


@dataclass(slots=True)
class MetricFamily:
    """All series of one metric family; ``type`` is the ``# TYPE`` word or ``untyped``."""

    name: str
    type: str = "untyped"
    help: str = ""
    samples: list[Sample] = field(default_factory=list)


class PrometheusFamilies(dict, Payload):
    """Parsed Prometheus text: family name -> MetricFamily.

    ``complete`` is False when the parser was told to keep only some families (the ones
    the wired extractors asked for); absent families are then simply not wanted.
    """

    __payload_name__ = "PrometheusFamilies"

    def __init__(self, families: Mapping[str, MetricFamily] | None = None, *, complete: bool = True) -> None:
        super().__init__(families or {})
        self.complete = complete

    def series(self, name: str) -> tuple[MetricFamily, list[Sample]] | None:
        """The family holding series ``name`` and its samples called exactly ``name``.

        ``x_count`` of histogram ``x`` is found in family ``x``; a counter declared as
        ``# TYPE x counter`` is also found as ``x_total`` and vice versa.
        """
        fam = self.get(name)
        if fam is not None:
            own = _named(fam, name)
            if not own and fam.type == "counter":  # `# TYPE x counter` exposing `x_total` lines
                own = _named(fam, name + "_total")
            return fam, own
        for suffix in ALL_SUFFIXES:
            if name.endswith(suffix):
                stem = self.get(name[: -len(suffix)])
                if stem is not None and suffix in FAMILY_SUFFIXES.get(stem.type, ()):
                    own = _named(stem, name)
                    if not own and suffix == "_total" and stem.type == "counter":  # `x` lines, asked as `x_total`
                        own = _named(stem, stem.name)
                    return stem, own
        fam = self.get(name + "_total")
        if fam is not None and fam.type == "counter":
            return fam, _named(fam, fam.name)
        return None

    def __repr__(self) -> str:
        return f"PrometheusFamilies({sorted(self)!r}, complete={self.complete})"


def _named(fam: MetricFamily, name: str) -> list[Sample]:
    return [s for s in fam.samples if s.name == name]


class RawBytes(bytes, Payload):
    """An undecoded payload (e.g. a file's or a socket's bytes)."""

    __payload_name__ = "RawBytes"


class JSONDocument(Payload):
    """A decoded JSON value (``data``), e.g. the body of an HTTP API."""

    __payload_name__ = "JSONDocument"
    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JSONDocument) and other.data == self.data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.data!r})"


class ModelInfo(NamedTuple):
    """One entry of an OpenAI ``/v1/models`` list: a base model (parent None) or an adapter."""

    id: str
    parent: str | None = None


class ModelList(JSONDocument):
    """The decoded ``/v1/models`` response; ``models`` holds the entries in server order."""

    __payload_name__ = "ModelList"
    __slots__ = ("models",)

    def __init__(self, data: Any, models: tuple[ModelInfo, ...]) -> None:
        super().__init__(data)
        self.models = models

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self.models)


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))

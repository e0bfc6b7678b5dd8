"""PromQL-style instant selectors (``name{label="v",other!~"re"}``) over parsed families.

Upstream's engine tables use ``name{label=value}`` with optional quotes and only ``=``;
we also accept ``!=``, ``=~`` and ``!~`` (regexes are fully anchored, as in PromQL).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

from epp.datalayer.errors import ExtractError
from epp.datalayer.payloads import PrometheusFamilies, Sample

_SELECTOR_RE = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*", re.S)
_MATCHER_RE = re.compile(
    r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'|([^,}"\']*?))\s*(,|$)',
    re.S,
)
SCALAR_TYPES = frozenset({"gauge", "counter", "untyped"})
_VALUE_TYPES = frozenset({"gauge", "counter", "untyped", "summary", "histogram", "gaugehistogram", "info", "stateset"})

Op = Literal["=", "!=", "=~", "!~"]


class MetricNotFound(ExtractError):
    """The selected metric family is not on the page."""


@dataclass(frozen=True)
class Matcher:
    label: str
    op: Op
    value: str
    pattern: re.Pattern[str] | None = None

    def __call__(self, labels: Mapping[str, str]) -> bool:
        v = labels.get(self.label, "")
        if self.op == "=":
            return v == self.value
        if self.op == "!=":
            return v != self.value
        hit = self.pattern.fullmatch(v) is not None  # type: ignore[union-attr]
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.label}{self.op}"{escaped}"'


@dataclass(frozen=True)
class MetricSelector:
    name: str
    matchers: tuple[Matcher, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "MetricSelector":
        """Raise ValueError naming what is wrong with ``text``."""
        m = _SELECTOR_RE.fullmatch(text or "")
        if m is None:
            raise ValueError(f"invalid metric selector {text!r}: expected name or name{{label=\"value\",...}}")
        name, body = m.group(1), m.group(2)
        matchers: list[Matcher] = []
        pos = 0
        body = body or ""
        while body[pos:].strip():
            mm = _MATCHER_RE.match(body, pos)
            if mm is None:
                raise ValueError(f"invalid label matcher in selector {text!r} at {body[pos:].strip()!r}")
            label, op, dq, sq, bare, _comma = mm.groups()
            raw = dq if dq is not None else sq if sq is not None else bare.strip()
            value = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), raw)
            pattern = None
            if op in ("=~", "!~"):
                try:
                    pattern = re.compile(value)
                except re.error as e:
                    raise ValueError(f"invalid regex {value!r} in selector {text!r}: {e}") from None
            matchers.append(Matcher(label, op, value, pattern))  # type: ignore[arg-type]
            pos = mm.end()
        return cls(name, tuple(matchers))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m(labels) for m in self.matchers)

    def select(self, families: PrometheusFamilies, types: frozenset[str] = _VALUE_TYPES) -> list[Sample]:
        """Matching samples; raises ExtractError if the metric is absent, of a type not in
        ``types``, or has no matching series."""
        found = families.series(self.name)
        if found is None:
            raise MetricNotFound(f"metric {self.name} not found")
        family, samples = found
        if family.type not in types:
            raise ExtractError(f"metric {self.name} is a {family.type}; expected {' or '.join(sorted(types))}")
        if not samples and family.type in ("histogram", "gaugehistogram") and family.name == self.name:
            raise ExtractError(
                f"metric {self.name} is a {family.type}; select {self.name}_sum, {self.name}_count "
                f"or {self.name}_bucket{{le=\"...\"}}"
            )
        hits = [s for s in samples if self.matches(s.labels)] if self.matchers else samples
        if not hits:
            where = f" matching {{{', '.join(map(str, self.matchers))}}}" if self.matchers else ""
            raise ExtractError(f"metric {self.name} has no series{where}")
        return hits

    def __str__(self) -> str:
        return f"{self.name}{{{','.join(map(str, self.matchers))}}}" if self.matchers else self.name


def finite(value: float, what: str) -> float:
    if math.isnan(value) or math.isinf(value):
        raise ExtractError(f"{what} is {value}")
    return value


def latest(samples: Sequence[Sample]) -> Sample:
    """Upstream's choice among several series: largest timestamp, else the first one."""
    best = samples[0]
    for s in samples[1:]:
        if s.timestamp_ms is not None and (best.timestamp_ms is None or s.timestamp_ms > best.timestamp_ms):
            best = s
    return best


def aggregate(samples: Iterable[Sample], how: str, what: str) -> float:
    """Combine several series' values: ``max``, ``min``, ``sum`` or ``last`` (latest timestamp, else last)."""
    values = list(samples)
    if how == "last":
        stamped = [s for s in values if s.timestamp_ms is not None]
        chosen = max(stamped, key=lambda s: s.timestamp_ms) if stamped else values[-1]  # type: ignore[arg-type, return-value]
        return finite(chosen.value, what)
    nums = [finite(s.value, what) for s in values]
    if how == "sum":
        return math.fsum(nums)
    if how == "min":
        return min(nums)
    return max(nums)

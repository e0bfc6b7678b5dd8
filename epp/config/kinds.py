"""Which extension points a plugin implements, for wiring and for error messages."""

from __future__ import annotations

from epp.framework.datalayer import DataSource, Discovery, Extractor
from epp.framework.flowcontrol import FairnessPolicy, OrderingPolicy, UsageLimitPolicy
from epp.framework.requestcontrol import (
    Admitter,
    DataProducer,
    Parser,
    PreRequest,
    ResponseComplete,
    ResponseReceived,
    ResponseStreaming,
    SaturationDetector,
)
from epp.framework.scheduling import Filter, Picker, ProfileHandler, Scorer

KINDS: tuple[tuple[type, str], ...] = (
    (Filter, "filter"),
    (Scorer, "scorer"),
    (Picker, "picker"),
    (ProfileHandler, "profile handler"),
    (Parser, "parser"),
    (DataSource, "data source"),
    (Extractor, "extractor"),
    (Discovery, "discovery"),
    (DataProducer, "data producer"),
    (SaturationDetector, "saturation detector"),
    (Admitter, "admitter"),
    (PreRequest, "pre-request hook"),
    (ResponseReceived, "response-received hook"),
    (ResponseStreaming, "response-streaming hook"),
    (ResponseComplete, "response-complete hook"),
    (FairnessPolicy, "flow-control fairness policy"),
    (OrderingPolicy, "flow-control ordering policy"),
    (UsageLimitPolicy, "flow-control usage limit policy"),
)

SCHEDULING_KINDS = (Filter, Scorer, Picker)


def kinds_of(plugin: object) -> list[str]:
    return [label for cls, label in KINDS if isinstance(plugin, cls)]


def describe_kinds(plugin: object) -> str:
    """'a scorer', 'a filter and a saturation detector', 'no known extension point'."""
    kinds = kinds_of(plugin)
    if not kinds:
        return "implements no known extension point"
    article = "an" if kinds[0][0] in "aeiou" else "a"
    text = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
    return f"is {article} {text}"

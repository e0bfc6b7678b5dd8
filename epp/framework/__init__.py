"""The plugin framework: interfaces for every extension point and the type registry.

Everything a plugin author needs is importable from here::

    from epp.framework import Scorer, register

    @register("my-scorer")
    class MyScorer(Scorer):
        def score(self, cycle, request, candidates):
            return [1.0 for _ in candidates]
"""

from epp.framework.datalayer import DataSource, Discovery, Extractor, type_label
from epp.framework.durations import format_duration, parse_duration
from epp.framework.flowcontrol import FairnessPolicy, FlowKey, OrderingPolicy, QueueItem, UsageLimitPolicy
from epp.framework.params import Duration, NoParams, ParameterError, decode_params
from epp.framework.plugin import Handle, Plugin, RuntimeSettings
from epp.framework.registry import ENTRY_POINT_GROUP, Registry, register, registry
from epp.framework.requestcontrol import (
    AdmissionDenied,
    Admitter,
    AsyncDataProducer,
    DataProducer,
    ParseError,
    Parser,
    PreRequest,
    ResponseComplete,
    ResponseReceived,
    ResponseStreaming,
    SaturationDetector,
    UsageReader,
)
from epp.framework.scheduling import (
    CycleState,
    Filter,
    Picker,
    ProfileHandler,
    ProfileResult,
    SchedulingResult,
    ScoreBreakdown,
    ScoredCandidate,
    Scorer,
    clamp01,
)
from epp.framework.types import Candidate, InferenceRequest, InferenceResponse, Usage

__all__ = [
    "ENTRY_POINT_GROUP", "AdmissionDenied", "Admitter", "AsyncDataProducer", "Candidate", "CycleState", "DataProducer",
    "DataSource", "Discovery", "Duration", "Extractor", "FairnessPolicy", "Filter", "FlowKey", "Handle",
    "InferenceRequest", "OrderingPolicy", "QueueItem", "UsageLimitPolicy",
    "InferenceResponse", "NoParams", "ParameterError", "ParseError", "Parser", "Picker", "Plugin",
    "PreRequest", "ProfileHandler", "ProfileResult", "Registry", "ResponseComplete", "ResponseReceived",
    "ResponseStreaming", "RuntimeSettings", "SaturationDetector", "SchedulingResult", "ScoreBreakdown",
    "ScoredCandidate", "Scorer", "UsageReader", "clamp01", "decode_params", "format_duration",
    "parse_duration", "register", "registry", "type_label",
]

"""The result of loading an EndpointPickerConfig: live plugin objects, wired together.

The loader (``epp.config.loader``) builds this; the server, the collector and the director
only ever consume it. It is immutable once built, so a config reload builds a new one and
swaps it in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epp.flowcontrol.settings import FlowControlSettings
from epp.framework.datalayer import DataSource, Discovery, Extractor
from epp.framework.plugin import Plugin
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
from epp.framework.scheduling import ProfileHandler
from epp.scheduling.profile import SchedulingProfile

API_VERSIONS = ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1")
KIND = "EndpointPickerConfig"


@dataclass(frozen=True)
class SourceWiring:
    """One data source and the extractors it feeds (each tick: one fetch, N extracts)."""

    source: DataSource
    extractors: tuple[Extractor, ...]


@dataclass(frozen=True)
class InferenceObjective:
    """Our non-Kubernetes stand-in for the InferenceObjective CRD: header value -> priority."""

    name: str
    priority: int = 0


@dataclass(frozen=True)
class ModelRewriteTarget:
    model: str
    weight: int = 1


@dataclass(frozen=True)
class ModelRewrite:
    """Stand-in for the InferenceModelRewrite CRD: requests for ``match`` go to weighted targets."""

    match: str
    targets: tuple[ModelRewriteTarget, ...]


@dataclass
class LoadedConfig:
    """Everything the EPP runs with, built from one config document."""

    document: dict[str, Any]  # the effective config (defaults filled in), as `epp check-config` prints it
    plugins: dict[str, Plugin]  # by name, in config order (defaults appended)
    profiles: dict[str, SchedulingProfile]
    profile_handler: ProfileHandler
    parser: Parser
    saturation_detector: SaturationDetector
    sources: list[SourceWiring] = field(default_factory=list)
    producers: list[DataProducer] = field(default_factory=list)  # in dependency order
    admitters: list[Admitter] = field(default_factory=list)
    pre_request: list[PreRequest] = field(default_factory=list)
    response_received: list[ResponseReceived] = field(default_factory=list)
    response_streaming: list[ResponseStreaming] = field(default_factory=list)
    response_complete: list[ResponseComplete] = field(default_factory=list)
    feature_gates: list[str] = field(default_factory=list)
    # The flowControl section resolved (policies, detector); None when the feature gate is off.
    flow_control: FlowControlSettings | None = None
    objectives: dict[str, InferenceObjective] = field(default_factory=dict)
    model_rewrites: dict[str, ModelRewrite] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    discovery: Discovery | None = None  # dataLayer.discovery / discovery: None = flags decide (--endpoint, --endpoints-file)

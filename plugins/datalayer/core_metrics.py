"""``core-metrics-extractor``: the standard endpoint metrics from an engine's ``/metrics``.

Fills ``waiting_queue_size``, ``running_requests``, ``kv_cache_usage`` (a 0..1 fraction),
the LoRA fields and the cache geometry, using per-engine metric names (upstream §4.4). The
engine is chosen per endpoint from its label ``engineLabelKey`` (fallback label
``inference.networking.k8s.io/engine-type``), else ``defaultEngine``. ``engineConfigs``
add engines or replace a built-in one of the same name entirely (upstream semantics: a
spec left empty disables that metric). A spec may be a list of selectors: the first one
present on the page is used (the built-in vLLM table reads ``vllm:kv_cache_usage_perc``
and falls back to the pre-0.9 ``vllm:gpu_cache_usage_perc``).

Differences from upstream, on purpose:
- untyped series are read as their value (upstream reads them as 0);
- LoRA and cache-info metrics are optional: a page without them (LoRA disabled) is not an
  error; the LoRA fields are then empty;
- NaN/Inf values are errors for that field only.
Whatever was read is written in one snapshot swap. ``update_time`` is refreshed only when at
least one of queue / running / KV usage was read; otherwise the previous values of those
(and their old ``update_time``) stay, so consumers see the data as stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from epp.datalayer.endpoint import Endpoint
from epp.datalayer.errors import ExtractError
from epp.datalayer.payloads import PrometheusFamilies, Sample
from epp.datalayer.selector import SCALAR_TYPES, MetricNotFound, MetricSelector, finite, latest
from epp.framework import register
from epp.framework.datalayer import Extractor

FALLBACK_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"

Spec = str | list[str]


@dataclass
class EngineConfig:
    name: str
    queuedRequestsSpec: Spec = ""
    runningRequestsSpec: Spec = ""
    kvUsageSpec: Spec = ""
    loraSpec: Spec = ""
    cacheInfoSpec: Spec = ""
    cacheBlockSizeLabelName: str = ""
    cacheNumBlocksLabelName: str = ""
    cacheBlockSizeSpec: Spec = ""
    cacheNumBlocksSpec: Spec = ""


BUILTIN_ENGINES: tuple[EngineConfig, ...] = (
    EngineConfig(
        name="vllm",
        queuedRequestsSpec="vllm:num_requests_waiting",
        runningRequestsSpec="vllm:num_requests_running",
        kvUsageSpec=["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        loraSpec="vllm:lora_requests_info",
        cacheInfoSpec="vllm:cache_config_info",
        cacheBlockSizeLabelName="block_size",
        cacheNumBlocksLabelName="num_gpu_blocks",
    ),
    EngineConfig(
        name="sglang",
        queuedRequestsSpec="sglang:num_queue_reqs",
        runningRequestsSpec="sglang:num_running_reqs",
        kvUsageSpec="sglang:token_usage",
        cacheInfoSpec="sglang:cache_config_info",
        cacheBlockSizeLabelName="page_size",
        cacheNumBlocksLabelName="num_pages",
    ),
    EngineConfig(
        name="trtllm-serve",
        queuedRequestsSpec="trtllm_num_requests_waiting",
        runningRequestsSpec="trtllm_num_requests_running",
        kvUsageSpec="trtllm_kv_cache_utilization",
        cacheBlockSizeSpec="trtllm_kv_cache_tokens_per_block",
        cacheNumBlocksSpec="trtllm_kv_cache_max_blocks",
    ),
    EngineConfig(
        name="triton-tensorrt-llm",
        queuedRequestsSpec='nv_trt_llm_request_metrics{request_type="waiting"}',
        runningRequestsSpec='nv_trt_llm_request_metrics{request_type="scheduled"}',
        kvUsageSpec='nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}',
        cacheBlockSizeSpec='nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per"}',
        cacheNumBlocksSpec='nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"}',
    ),
)


def _selectors(spec: Spec, where: str) -> tuple[MetricSelector, ...]:
    items = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for i, text in enumerate(items):
        if not text:
            continue
        try:
            out.append(MetricSelector.parse(text))
        except ValueError as e:
            raise ValueError(f"{where}{'' if isinstance(spec, str) else f'[{i}]'}: {e}") from None
    return tuple(out)


@dataclass(frozen=True)
class _Engine:
    """An engine config compiled to selectors."""

    name: str
    queued: tuple[MetricSelector, ...]
    running: tuple[MetricSelector, ...]
    kv: tuple[MetricSelector, ...]
    lora: tuple[MetricSelector, ...]
    cache_info: tuple[MetricSelector, ...]
    block_size_label: str
    num_blocks_label: str
    block_size: tuple[MetricSelector, ...]
    num_blocks: tuple[MetricSelector, ...]

    @classmethod
    def compile(cls, cfg: EngineConfig, where: str) -> "_Engine":
        def sel(attr: str) -> tuple[MetricSelector, ...]:
            return _selectors(getattr(cfg, attr), f"{where}.{attr}")

        return cls(cfg.name, sel("queuedRequestsSpec"), sel("runningRequestsSpec"), sel("kvUsageSpec"),
                   sel("loraSpec"), sel("cacheInfoSpec"), cfg.cacheBlockSizeLabelName, cfg.cacheNumBlocksLabelName,
                   sel("cacheBlockSizeSpec"), sel("cacheNumBlocksSpec"))

    def selectors(self) -> tuple[MetricSelector, ...]:
        return (*self.queued, *self.running, *self.kv, *self.lora, *self.cache_info, *self.block_size,
                *self.num_blocks)


@dataclass
class CoreMetricsParams:
    engineLabelKey: str = "llm-d.ai/engine-type"
    defaultEngine: str = "vllm"
    engineConfigs: list[EngineConfig] = field(default_factory=list)

    def validate(self) -> None:
        names = set()
        for i, cfg in enumerate(self.engineConfigs):
            if not cfg.name:
                raise ValueError(f"engineConfigs[{i}].name must not be empty")
            if cfg.name == "default":
                raise ValueError(f"engineConfigs[{i}].name 'default' is reserved")
            if cfg.name in names:
                raise ValueError(f"engineConfigs[{i}].name {cfg.name!r} is listed twice")
            names.add(cfg.name)
            _Engine.compile(cfg, f"engineConfigs[{i}]")
        known = names | {e.name for e in BUILTIN_ENGINES}
        if self.defaultEngine not in known:
            raise ValueError(f"defaultEngine {self.defaultEngine!r} is not an engine config "
                             f"(known: {', '.join(sorted(known))})")


@register("core-metrics-extractor")
class CoreMetricsExtractor(Extractor):
    Params = CoreMetricsParams
    input_type = PrometheusFamilies

    def __init__(self, name: str | None = None, params: CoreMetricsParams | None = None) -> None:
        super().__init__(name, params)
        p: CoreMetricsParams = self.params
        engines: dict[str, _Engine] = {}
        for i, cfg in enumerate(p.engineConfigs):
            engines[cfg.name] = _Engine.compile(cfg, f"engineConfigs[{i}]")
        for cfg in BUILTIN_ENGINES:
            engines.setdefault(cfg.name, _Engine.compile(cfg, cfg.name))
        self.engines: Mapping[str, _Engine] = MappingProxyType(engines)
        self.default = engines[p.defaultEngine]

    def wanted_families(self) -> frozenset[str]:
        return frozenset(s.name for e in self.engines.values() for s in e.selectors())

    def engine_for(self, labels: Mapping[str, str]) -> _Engine:
        name = labels.get(self.params.engineLabelKey) or labels.get(FALLBACK_ENGINE_LABEL)
        return self.engines.get(name, self.default) if name else self.default

    def extract(self, data: PrometheusFamilies, endpoint: Endpoint) -> None:
        engine = self.engine_for(endpoint.metadata.labels)
        updates: dict[str, Any] = {}
        errors: list[str] = []
        core = configured = 0
        for field_name, selectors, convert in (
            ("waiting_queue_size", engine.queued, _count),
            ("running_requests", engine.running, _count),
            ("kv_cache_usage", engine.kv, _fraction),
        ):
            if not selectors:
                continue
            configured += 1
            try:
                updates[field_name] = convert(_scalar(data, selectors))
                core += 1
            except ExtractError as e:
                errors.append(f"{field_name}: {e}")
        extra = _guard(errors, "lora", lambda: _lora(data, engine.lora, updates)) if engine.lora else 0
        extra += _guard(errors, "cache", lambda: _cache(data, engine, updates))
        # update_time says "the load signals are fresh": only the core fields may refresh
        # it (unless an engine config has none of them).
        if core or (not configured and extra):
            endpoint.update_metrics(**updates)
        elif updates:
            endpoint.update_metrics(update_time=endpoint.metrics.update_time, **updates)
        if errors:
            raise ExtractError(f"engine {engine.name}: " + "; ".join(errors))


def _guard(errors: list[str], what: str, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except ExtractError as e:
        errors.append(f"{what}: {e}")
        return 0


def _first_present(data: PrometheusFamilies, selectors: Sequence[MetricSelector],
                   types: frozenset[str] = SCALAR_TYPES) -> list[Sample]:
    missing: MetricNotFound | None = None
    for sel in selectors:
        try:
            return sel.select(data, types)
        except MetricNotFound as e:
            missing = missing or e
    if len(selectors) > 1:
        raise MetricNotFound(f"none of {', '.join(s.name for s in selectors)} found")
    raise missing or MetricNotFound("no metric configured")


def _scalar(data: PrometheusFamilies, selectors: Sequence[MetricSelector]) -> float:
    sample = latest(_first_present(data, selectors))
    return finite(sample.value, sample.name)


def _count(v: float) -> int:
    if v < 0:
        raise ExtractError(f"negative count {v}")
    return int(v)


def _fraction(v: float) -> float:
    if v < 0:
        raise ExtractError(f"negative usage {v}")
    return v


def _lora(data: PrometheusFamilies, selectors: Sequence[MetricSelector], updates: dict[str, Any]) -> int:
    try:
        samples = _first_present(data, selectors)
    except MetricNotFound:
        # LoRA disabled on this server: no adapters, no slots.
        updates.update(active_models=_EMPTY, waiting_models=_EMPTY, max_active_models=0)
        return 0
    # vLLM keeps old label combinations; the current one has the newest timestamp as value.
    current = max(samples, key=lambda s: s.value if s.value == s.value else float("-inf"))
    labels = current.labels
    updates["active_models"] = _adapters(labels.get("running_lora_adapters", ""))
    updates["waiting_models"] = _adapters(labels.get("waiting_lora_adapters", ""))
    raw_max = labels.get("max_lora", "")
    if raw_max:
        updates["max_active_models"] = _int_label("max_lora", raw_max)
    return 1


_EMPTY: Mapping[str, int] = MappingProxyType({})


def _adapters(text: str) -> Mapping[str, int]:
    names = [n.strip() for n in text.split(",")]
    return MappingProxyType({n: 0 for n in names if n}) if any(names) else _EMPTY


def _int_label(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        try:
            value = float(raw)
        except ValueError:
            raise ExtractError(f"label {name}={raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ExtractError(f"label {name}={raw!r} is not a finite number")
        return int(value)


def _cache(data: PrometheusFamilies, engine: _Engine, updates: dict[str, Any]) -> int:
    read = 0
    if engine.cache_info:
        try:
            labels = latest(_first_present(data, engine.cache_info)).labels
        except MetricNotFound:
            labels = None  # optional: older engines do not export it
        if labels is not None:
            for field_name, label in (("cache_block_size", engine.block_size_label),
                                      ("cache_num_blocks", engine.num_blocks_label)):
                if label and labels.get(label):
                    updates[field_name] = _int_label(label, labels[label])
                    read = 1
    for field_name, selectors in (("cache_block_size", engine.block_size), ("cache_num_blocks", engine.num_blocks)):
        if selectors:
            try:
                updates[field_name] = _count(_scalar(data, selectors))
                read = 1
            except MetricNotFound:
                pass
    return read

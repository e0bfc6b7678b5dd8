"""Config-test kit: test-only plugin types in an isolated registry (no built-ins, no entry points).

Like upstream's loader tests (test-scorer, test-picker, ...), plus stand-ins registered
under the names of the system defaults (max-score-picker, single-profile-handler,
openai-parser, utilization-detector, metrics-data-source, core-metrics-extractor) and of
the seed pipeline (prometheus-data-source, prometheus-metric, metric-scorer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from epp.framework import (
    Admitter,
    DataProducer,
    DataSource,
    Discovery,
    Duration,
    Extractor,
    FairnessPolicy,
    Filter,
    OrderingPolicy,
    Parser,
    Picker,
    Plugin,
    PreRequest,
    ProfileHandler,
    ResponseComplete,
    SaturationDetector,
    Scorer,
    UsageLimitPolicy,
)
from epp.framework.registry import Registry


class IsolatedRegistry(Registry):
    """A registry holding only what a test registers: no built-ins, no entry points."""

    def load(self) -> None:
        return None


class PromFamilies:
    """Payload: parsed Prometheus text."""


class RawText:
    """Payload: raw bytes of some file."""


class JsonDoc:
    """Payload: a JSON document."""


# --- scheduling


class TestFilter(Filter):
    @dataclass
    class Params:
        threshold: int = 0

    def filter(self, cycle, request, candidates):
        return candidates


class TestScorer(Scorer):
    @dataclass
    class Params:
        blockSize: int = 16
        window: Duration = Duration(1.0)
        labels: dict[str, str] = field(default_factory=dict)

    def score(self, cycle, request, candidates):
        return [0.5] * len(candidates)


class ConsumerScorer(TestScorer):
    consumes = frozenset({"test.match-info"})


class OrphanConsumerScorer(TestScorer):
    consumes = frozenset({"test.nobody-makes-this"})


class TestPicker(Picker):
    @dataclass
    class Params:
        maxNumOfEndpoints: int = 1

    def pick(self, cycle, request, scored):
        return [s.candidate for s in scored[:1]]


class TestProfileHandler(ProfileHandler):
    def pick_profiles(self, cycle, request, profiles, results):
        return {} if results else dict(profiles)

    def process_results(self, cycle, request, results):
        raise NotImplementedError


class SingleProfileHandler(TestProfileHandler):
    max_profiles = 1


class TestParser(Parser):
    def parse_request(self, body: bytes, headers: Mapping[str, str]):
        raise NotImplementedError

    def usage_reader(self, response_headers):
        raise NotImplementedError


class TestDetector(SaturationDetector, Filter):
    @dataclass
    class Params:
        queueDepthThreshold: int = 5
        kvCacheUtilThreshold: float = 0.8

    def saturation(self, candidates: Sequence[Any]) -> float:
        return 0.0

    def filter(self, cycle, request, candidates):
        return candidates


# --- data layer


class _Source(DataSource):
    bound: tuple = ()

    def bind(self, extractors):
        self.bound = tuple(extractors)

    async def collect(self, endpoint):
        return None


class PromSource(_Source):
    output_type = PromFamilies

    @dataclass
    class Params:
        path: str = "/metrics"
        scheme: str = "http"


class TextSource(_Source):
    output_type = RawText


class JsonSource(_Source):
    output_type = JsonDoc


class PromExtractor(Extractor):
    input_type = PromFamilies

    @dataclass
    class Params:
        metric: str = ""
        name: str = ""

    def extract(self, data, endpoint):
        return None


class TextExtractor(Extractor):
    input_type = RawText

    def extract(self, data, endpoint):
        return None


class AnyExtractor(Extractor):
    input_type = object

    def extract(self, data, endpoint):
        return None


class TestDiscovery(Discovery):
    async def run(self, pool):
        return None


# --- request control


class MatchProducer(DataProducer):
    produces = frozenset({"test.match-info"})

    def produce(self, cycle, request, candidates):
        return None


class CycleA(DataProducer):
    produces = frozenset({"test.a"})
    consumes = frozenset({"test.b"})

    def produce(self, cycle, request, candidates):
        return None


class CycleB(DataProducer):
    produces = frozenset({"test.b"})
    consumes = frozenset({"test.a"})

    def produce(self, cycle, request, candidates):
        return None


class ChainTail(DataProducer):
    produces = frozenset({"test.tail"})
    consumes = frozenset({"test.match-info"})

    def produce(self, cycle, request, candidates):
        return None


class Hooks(Plugin, PreRequest, ResponseComplete):
    def pre_request(self, request, result):
        return None

    def response_complete(self, request, response, target):
        return None


class TestAdmitter(Admitter):
    def admit(self, request, candidates):
        return None


class Inert(Plugin):
    """Implements no extension point (upstream's test-one)."""


class Exploding(Plugin):
    @classmethod
    def create(cls, name, params, handle):
        raise RuntimeError("cannot reach the tokenizer service")


class FlowPolicy(OrderingPolicy):
    """An ordering policy (FCFS)."""

    def sort_key(self, item):
        return item.enqueued_at


class TestFairness(FairnessPolicy):
    def pick(self, band, state):
        flows = band.flows()
        return flows[0] if flows else None


class TestUsageLimit(UsageLimitPolicy):
    def ceilings(self, saturation, priorities):
        return [1.0] * len(priorities)


TEST_TYPES: dict[str, type] = {
    "test-plugin": TestFilter,
    "test-filter": TestFilter,
    "test-scorer": TestScorer,
    "test-consumer-scorer": ConsumerScorer,
    "test-orphan-consumer": OrphanConsumerScorer,
    "test-picker": TestPicker,
    "test-profile-handler": TestProfileHandler,
    "test-parser": TestParser,
    "test-detector": TestDetector,
    "test-source": TextSource,
    "test-json-source": JsonSource,
    "test-extractor": TextExtractor,
    "test-any-extractor": AnyExtractor,
    "test-discovery": TestDiscovery,
    "test-producer": MatchProducer,
    "test-chain-tail": ChainTail,
    "test-cycle-a": CycleA,
    "test-cycle-b": CycleB,
    "test-hooks": Hooks,
    "test-admitter": TestAdmitter,
    "test-one": Inert,
    "test-exploding": Exploding,
    "test-flow-policy": FlowPolicy,
    "test-fairness-policy": TestFairness,
    "test-usage-limit": TestUsageLimit,
    # stand-ins for the system defaults
    "max-score-picker": TestPicker,
    "single-profile-handler": SingleProfileHandler,
    "openai-parser": TestParser,
    "utilization-detector": TestDetector,
    "metrics-data-source": PromSource,
    "core-metrics-extractor": PromExtractor,
    "fcfs-ordering-policy": FlowPolicy,
    "global-strict-fairness-policy": TestFairness,
    "static-usage-limit-policy": TestUsageLimit,
    # stand-ins for the seed pipeline of our docs
    "prometheus-metric": PromExtractor,
    "metric-scorer": TestScorer,
}


SYSTEM_DEFAULT_TYPES = (
    "max-score-picker", "single-profile-handler", "openai-parser", "utilization-detector",
    "metrics-data-source", "core-metrics-extractor",
)


def make_registry(*, exclude: Sequence[str] = ()) -> IsolatedRegistry:
    reg = IsolatedRegistry()
    for type_name, cls in TEST_TYPES.items():
        if type_name in exclude:
            continue
        # Each registration gets its own subclass so that aliases of one class stay distinct types.
        reg.register_class(type(cls.__name__, (cls,), {"plugin_type": type_name}), type_name)
    if "metrics-data-source" not in exclude:
        # prometheus-data-source is an alias of metrics-data-source, as the real built-in is.
        spec = reg.get("metrics-data-source")
        reg.register("prometheus-data-source", spec.factory, cls=spec.cls)
    reg.register_default_producer("test.match-info", "test-producer")
    return reg

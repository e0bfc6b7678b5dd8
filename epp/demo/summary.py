"""Per-endpoint totals of a demo run: what the client saw, plus each server's own TTFT.

Client-side numbers come from the responses (``x-sim-server``, ``usage.cached_tokens``, the
time to the first streamed token); the server-side mean TTFT comes from each sim server's
``vllm:time_to_first_token_seconds`` histogram, which covers non-streamed requests too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from epp.demo.explain import Why
from epp.demo.traffic import Outcome

TTFT_METRIC = "vllm:time_to_first_token_seconds"


@dataclass
class EndpointStats:
    name: str
    address: str
    speed: float = 1.0
    requests: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    latency_sum: float = 0.0
    client_ttft: list[float] = field(default_factory=list)  # streamed requests
    server_ttft_mean: float | None = None  # from the server's histogram, all requests

    def add(self, o: Outcome) -> None:
        self.requests += 1
        self.prefix_hits += o.prefix_hit
        self.prompt_tokens += o.prompt_tokens
        self.cached_tokens += o.cached_tokens
        self.latency_sum += o.latency
        if o.ttft is not None:
            self.client_ttft.append(o.ttft)

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def mean_latency(self) -> float | None:
        return self.latency_sum / self.requests if self.requests else None

    @property
    def mean_client_ttft(self) -> float | None:
        return sum(self.client_ttft) / len(self.client_ttft) if self.client_ttft else None


@dataclass
class Summary:
    endpoints: list[EndpointStats]
    ok: int = 0
    failed: list[Outcome] = field(default_factory=list)
    unknown_server: int = 0  # succeeded, but without an x-sim-server header we know
    decided_by: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + len(self.failed)

    @property
    def prefix_hits(self) -> int:
        return sum(e.prefix_hits for e in self.endpoints)


def decided_by(why: Why | None) -> str:
    """The bucket a decision counts under in the "decided by" tally."""
    if why is None:
        return "unknown"
    if why.candidates <= 1:
        return "only candidate"
    if why.tied > 1:
        return "tie (random)"
    return why.decisive or "total score"


def summarize(outcomes: Iterable[Outcome], whys: Mapping[str, Why | None],
              servers: Sequence[tuple[str, str, float]]) -> Summary:
    """``servers`` lists (name, address, speed) of every endpoint, so idle ones show up too."""
    by_name = {name: EndpointStats(name, addr, speed) for name, addr, speed in servers}
    s = Summary(list(by_name.values()))
    for o in outcomes:
        if not o.ok:
            s.failed.append(o)
            continue
        s.ok += 1
        s.decided_by[decided_by(whys.get(o.request.request_id))] += 1
        stats = by_name.get(o.server)
        if stats is None:
            s.unknown_server += 1
        else:
            stats.add(o)
    return s


def histogram_mean(metrics_text: str, metric: str = TTFT_METRIC) -> float | None:
    """Mean of a Prometheus histogram (sum / count over all its series), None when it is empty."""
    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name == f"{metric}_sum":
                total += sample.value
            elif sample.name == f"{metric}_count":
                count += sample.value
    return total / count if count else None

"""Request-control extension points: parsing, data producers, admission, lifecycle hooks.

Lifecycle hooks, in order, for each request that was scheduled:
``PreRequest`` (after the pick), ``ResponseReceived`` (response headers),
``ResponseStreaming`` (each body chunk, only when a plugin implements it),
``ResponseComplete`` (exactly once, also when the client disconnects or the stream fails:
``response.outcome`` says which).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Mapping, Sequence

from epp.framework.plugin import Plugin
from epp.framework.types import Candidate, InferenceRequest, InferenceResponse, Usage

if TYPE_CHECKING:
    from epp.framework.scheduling import CycleState, SchedulingResult


class ParseError(ValueError):
    """The request body is not valid for its API; becomes a 400 with this message."""


class Parser(Plugin, ABC):
    """Understands the request body (e.g. OpenAI JSON) and the response usage."""

    @abstractmethod
    def parse_request(self, body: bytes, headers: Mapping[str, str]) -> InferenceRequest:
        """Build the request; raise ParseError for a body this parser rejects."""

    @abstractmethod
    def usage_reader(self, response_headers: Mapping[str, str]) -> "UsageReader":
        """A fresh incremental reader of usage for one response."""


class UsageReader(ABC):
    """Fed every response body chunk; finds token usage without re-reading everything."""

    @abstractmethod
    def feed(self, chunk: bytes, end_of_stream: bool) -> Usage | None:
        """Return usage once it is known (usually on the last chunk), else None."""


class DataProducer(Plugin, ABC):
    """Computes per-request data for scorers before scheduling (e.g. prefix matches).

    Runs on the request path: it must not do I/O. ``produces``/``consumes`` are data keys;
    producers run in dependency order.
    """

    produces: ClassVar[frozenset[str]] = frozenset()
    consumes: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def produce(self, cycle: "CycleState", request: InferenceRequest, candidates: Sequence[Candidate]) -> None:
        ...


class AsyncDataProducer(DataProducer, ABC):
    """A data producer that may wait for I/O, e.g. token IDs from a model server's render
    endpoint. It runs in the same dependency order as the others; the request's ext_proc
    stream is parked while it waits (other requests go on) and the wait ends early with
    ``asyncio.CancelledError`` if the client goes away or the EPP's deadline passes.

    Routing is driven without an event-loop hop while nothing waits, outside any asyncio
    Task. So ``produce`` must only await futures: start real I/O as a task of its own
    (``asyncio.get_running_loop().create_task(fetch())``, where ``asyncio.timeout`` and
    client libraries work as usual) and await that task. Returning without awaiting
    anything pending costs nothing. A failure loses this producer's data, never the request.
    """

    @abstractmethod
    async def produce(self, cycle: "CycleState", request: InferenceRequest,  # type: ignore[override]
                      candidates: Sequence[Candidate]) -> None:
        ...


class SaturationDetector(Plugin, ABC):
    @abstractmethod
    def saturation(self, candidates: Sequence[Candidate]) -> float:
        """0 = idle, >= 1.0 = saturated."""

    def saturation_with_pending(self, candidates: Sequence[Candidate], pending: Mapping[str, int]) -> float:
        """Saturation counting ``pending[key]`` more requests on endpoint ``key``.

        Flow control passes the requests this EPP sent to each endpoint after its metrics were
        last scraped, which scraped gauges cannot show yet. A detector reading scraped metrics
        should count them (as queued work); one that counts the EPP's in-flight requests itself
        already sees them: the default ignores ``pending``.
        """
        return self.saturation(candidates)


@dataclass(frozen=True, slots=True)
class AdmissionDenied:
    status: int
    reason: str


class Admitter(Plugin, ABC):
    @abstractmethod
    def admit(self, request: InferenceRequest, candidates: Sequence[Candidate]) -> AdmissionDenied | None:
        """None to admit."""


class PreRequest(ABC):
    @abstractmethod
    def pre_request(self, request: InferenceRequest, result: "SchedulingResult") -> None:
        ...


class ResponseReceived(ABC):
    @abstractmethod
    def response_received(self, request: InferenceRequest, response: InferenceResponse, target: str) -> None:
        ...


class ResponseStreaming(ABC):
    @abstractmethod
    def response_streaming(self, request: InferenceRequest, response: InferenceResponse, chunk: bytes, target: str) -> None:
        ...


class ResponseComplete(ABC):
    @abstractmethod
    def response_complete(self, request: InferenceRequest, response: InferenceResponse, target: str) -> None:
        ...

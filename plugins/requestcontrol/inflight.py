"""In-flight load: requests and estimated tokens this EPP has sent to each endpoint.

``InflightTracker`` books a request on its target endpoint(s) at PreRequest and releases
it at ResponseComplete. Booking is keyed by request id and released by popping it, so a
release happens exactly once whatever the outcome (complete, error, disconnect) and a
release for a request never booked is a no-op. Entries whose release never came (a bug
elsewhere) are swept after ``request_timeout`` so counts cannot leak forever.

``inflight-load-producer`` exposes the counts to scorers through ``Candidate.data``;
``prefill-backlog-producer`` uses a second tracker whose bookings end at the first generated
token, so it counts prefill work still queued rather than requests still running.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from epp.framework import (
    DataProducer,
    Duration,
    PreRequest,
    ResponseComplete,
    ResponseStreaming,
    register,
    registry,
)
from epp.framework.plugin import Handle
from epp.framework.scheduling import CycleState, SchedulingResult
from epp.framework.types import Candidate, InferenceRequest, InferenceResponse
from plugins.requestcontrol.data import (
    INFLIGHT_LOAD_KEY,
    NO_INFLIGHT,
    PREFILL_BACKLOG_KEY,
    PREFIX_CACHE_MATCH_INFO_KEY,
    InFlightLoad,
    PrefixCacheMatchInfo,
)

CHARS_PER_TOKEN = 4
_SWEEP_EVERY = 1024  # bookings between checks for leaked entries


def estimate_tokens(request: InferenceRequest, target: Candidate | None = None) -> int:
    """Prompt tokens the target still has to compute: prompt chars / 4, minus its cached prefix."""
    text = request.prefix_input or request.body
    tokens = (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
    if target is not None:
        info = target.data.get(PREFIX_CACHE_MATCH_INFO_KEY)
        if isinstance(info, PrefixCacheMatchInfo):
            tokens -= info.matched_tokens
    return max(tokens, 1)


class InflightTracker:
    """Per-endpoint counters of booked requests and tokens."""

    __slots__ = ("_requests", "_tokens", "_booked", "_timeout", "_since_sweep")

    def __init__(self, request_timeout: float = 600.0) -> None:
        self._requests: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        # request id -> (booked at, ((endpoint, tokens), ...))
        self._booked: dict[str, tuple[float, tuple[tuple[str, int], ...]]] = {}
        self._timeout = request_timeout
        self._since_sweep = 0

    def load(self, endpoint: str) -> InFlightLoad:
        r = self._requests.get(endpoint)
        if not r:
            return NO_INFLIGHT
        return InFlightLoad(r, self._tokens.get(endpoint, 0))

    def requests(self, endpoint: str) -> int:
        return self._requests.get(endpoint, 0)

    def tokens(self, endpoint: str) -> int:
        return self._tokens.get(endpoint, 0)

    def total(self) -> tuple[int, int]:
        return sum(self._requests.values()), sum(self._tokens.values())

    def in_flight(self) -> int:
        """Number of booked requests."""
        return len(self._booked)

    def is_booked(self, request_id: str) -> bool:
        return request_id in self._booked

    def book(self, request_id: str, bookings: Sequence[tuple[str, int]]) -> None:
        if not bookings:
            return
        if request_id in self._booked:  # a request is booked once; a repeat would double count
            self.release(request_id)
        req, tok = self._requests, self._tokens
        for ep, tokens in bookings:
            req[ep] = req.get(ep, 0) + 1
            tok[ep] = tok.get(ep, 0) + tokens
        self._booked[request_id] = (time.monotonic(), tuple(bookings))
        self._since_sweep += 1
        if self._since_sweep >= _SWEEP_EVERY:
            self.sweep()

    def release(self, request_id: str) -> bool:
        entry = self._booked.pop(request_id, None)
        if entry is None:
            return False
        req, tok = self._requests, self._tokens
        for ep, tokens in entry[1]:
            r = req.get(ep, 0) - 1
            if r <= 0:
                req.pop(ep, None)
                tok.pop(ep, None)
            else:
                req[ep] = r
                tok[ep] = max(tok.get(ep, 0) - tokens, 0)
        return True

    def sweep(self, now: float | None = None) -> int:
        """Release bookings older than the timeout; returns how many."""
        self._since_sweep = 0
        cutoff = (time.monotonic() if now is None else now) - self._timeout
        stale = [rid for rid, (at, _) in self._booked.items() if at < cutoff]
        for rid in stale:
            self.release(rid)
        return len(stale)

    def forget_endpoint(self, endpoint: str) -> None:
        self._requests.pop(endpoint, None)
        self._tokens.pop(endpoint, None)


def scheduled_targets(result: SchedulingResult) -> list[Candidate]:
    """The first target of every profile that produced one (primary first)."""
    out: list[Candidate] = []
    primary = result.profile_results.get(result.primary_profile)
    if primary is not None and primary.targets:
        out.append(primary.targets[0])
    for name, res in result.profile_results.items():
        if name != result.primary_profile and res is not None and res.targets:
            out.append(res.targets[0])
    return out


class InflightHooks(PreRequest, ResponseComplete):
    """PreRequest/ResponseComplete wiring shared by every plugin that owns a tracker."""

    tracker: InflightTracker
    _pool = None

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        targets = scheduled_targets(result)
        self.tracker.book(request.request_id, [(t.key, estimate_tokens(request, t)) for t in targets])

    def response_complete(self, request: InferenceRequest, response: InferenceResponse, target: str) -> None:
        self.tracker.release(request.request_id)

    async def start(self, handle: Handle) -> None:
        pool = handle.pool
        if pool is not None and self._pool is None:
            self._pool = pool
            pool.subscribe(self._on_pool_event)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.unsubscribe(self._on_pool_event)
            self._pool = None

    def _on_pool_event(self, event: str, endpoint) -> None:
        if event == "removed":
            self.tracker.forget_endpoint(endpoint.key)


@dataclass
class InflightParams:
    # Bookings never released after this long are dropped (a missed ResponseComplete).
    requestTimeout: Duration = Duration(600.0)


@register("inflight-load-producer")
class InflightLoadProducer(InflightHooks, DataProducer):
    Params = InflightParams
    produces = frozenset({INFLIGHT_LOAD_KEY})
    data_key = INFLIGHT_LOAD_KEY  # where produce() publishes the loads; subclasses override both

    def __init__(self, name: str | None = None, params: InflightParams | None = None) -> None:
        super().__init__(name, params)
        self.tracker = InflightTracker(float(self.params.requestTimeout))

    def produce(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Candidate]) -> None:
        key = self.data_key
        if not self.tracker._requests:  # nothing booked anywhere: skip the per-endpoint lookups
            for c in candidates:
                c.data[key] = NO_INFLIGHT
            return
        load = self.tracker.load
        for c in candidates:
            c.data[key] = load(c.key)


registry.register_default_producer(INFLIGHT_LOAD_KEY, "inflight-load-producer")


# Markers of a streamed chunk that carries generated text: chat ``delta.content`` (also
# ``reasoning_content``) or completions ``text``. A chat stream opens with a role-only chunk
# whose content is "" (or null), which must not count as the first token.
_TEXT_MARKERS = (b'content":', b'"text":')


def carries_generated_text(chunk: bytes) -> bool:
    """Whether a response body chunk holds a non-empty generated string (cheap byte scan)."""
    find = chunk.find
    for marker in _TEXT_MARKERS:
        at = find(marker)
        while at >= 0:
            i = at + len(marker)
            while i < len(chunk) and chunk[i] == 0x20:  # tolerate `"content": "x"`
                i += 1
            # A non-empty JSON string: an opening quote not immediately closed.
            if chunk[i:i + 1] == b'"' and chunk[i + 1:i + 2] not in (b'"', b''):
                return True
            at = find(marker, i)
    return False


@register("prefill-backlog-producer")
class PrefillBacklogProducer(InflightLoadProducer, ResponseStreaming):
    """Per endpoint: requests this EPP routed there that have not produced a token yet, and
    their uncached prompt tokens -- the prefill work queued ahead of a new request.

    Booked at PreRequest (``estimate_tokens``: the prefix-cache match is already subtracted),
    released at the first chunk carrying generated text, or at ResponseComplete (non-streamed
    responses, errors, disconnects), whichever comes first; the tracker releases exactly once.
    After the release the per-chunk hook is one dict lookup.
    """

    plugin_type = "prefill-backlog-producer"  # @register keeps an inherited type name otherwise
    produces = frozenset({PREFILL_BACKLOG_KEY})
    data_key = PREFILL_BACKLOG_KEY

    def response_streaming(self, request: InferenceRequest, response: InferenceResponse, chunk: bytes,
                           target: str) -> None:
        rid = request.request_id
        if self.tracker.is_booked(rid) and carries_generated_text(chunk):
            self.tracker.release(rid)


registry.register_default_producer(PREFILL_BACKLOG_KEY, "prefill-backlog-producer")

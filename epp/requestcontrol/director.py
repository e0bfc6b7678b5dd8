"""The per-request pipeline: from a complete request to a routing decision, and back.

``Director.route`` runs, in order: parse the body (parser plugin), rewrite the model, read
the control headers (objective -> priority, fairness id, SLOs), narrow the schedulable
endpoints by the subset hint, run the data producers, admission (shed sheddable requests
when saturated), the admitter plugins, flow control (when enabled), the scheduler, and the
pre-request hooks. It returns a ``RequestContext`` that the transport (ext_proc) drives
through the response: ``response_headers`` -> ``response_chunk``* -> ``complete``.
``complete`` runs exactly once per scheduled request whatever happens (end of stream,
client disconnect, error, timeout), which is what keeps in-flight counts honest.

Plugins read snapshots and do no I/O on this path, with two exceptions that may make
routing wait: flow control holding a request, and ``AsyncDataProducer``s. ``route`` is a
coroutine for them, stepped by hand (``drive.py``) so that a request that waits for nothing
costs no event-loop hop. Errors are ``RequestError`` (code + message) that the transport
turns into an ImmediateResponse.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

from epp.config.model import LoadedConfig
from epp.datalayer.endpoint import Endpoint, now
from epp.datalayer.pool import EndpointPool, schedulable_endpoints
from epp.config.model import ModelRewrite
from epp.framework.headers import read_control_headers
from epp.framework.requestcontrol import AsyncDataProducer, ParseError, UsageReader
from epp.framework.scheduling import CycleState, SchedulingResult
from epp.framework.types import Candidate, InferenceRequest, InferenceResponse
from epp.observability import deferred
from epp.observability import metrics as m
from epp.observability.decisions import Decision, DecisionLog, debug_header_value, wall_time
from epp.requestcontrol import errors as E
from epp.requestcontrol.candidates import filter_by_subset, subset_hint
from epp.requestcontrol.drive import Driven
from epp.requestcontrol.rewrite import ModelRewriter, ResponseModelReverser, reserialize
from epp.scheduling.admission import LegacyAdmission
from epp.scheduling.fallbacks import destination_keys
from epp.scheduling.scheduler import Scheduler, SchedulingError

log = logging.getLogger(__name__)

DEST_HEADER = "x-gateway-destination-endpoint"
REQUEST_ID_HEADER = "x-request-id"
DEBUG_REQUEST_HEADER = "x-epp-debug"
DEBUG_RESPONSE_HEADER = "x-epp-decision"
QUEUE_DURATION_HEADER = "x-llm-d-flow-queue-duration-ms"

# Which responses the EPP wants to read the body of (issue 8: in a mode that allows it, the
# transport tells Envoy to stop sending bodies we do not need; token-usage metrics for
# those responses are then lost).
ResponseBodyPolicy = Literal["always", "non-streaming", "never"]


@dataclass
class DirectorOptions:
    disable_subset_filter: bool = False
    enable_debug_headers: bool = False
    response_body_policy: ResponseBodyPolicy = "always"
    decision_log_size: int = 200
    pool_name: str = ""
    # Up to this many fallback endpoints after the primary in the destination (the protocol's
    # comma-separated list; epp.scheduling.fallbacks). 0: one endpoint, what stock Envoy takes.
    destination_fallbacks: int = 0


class _Labelled:
    """Caches ``metric.labels(...)`` children: the lookup costs more than the observation."""

    __slots__ = ("_metric", "_cache")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._cache.get(labels)
        if child is None:
            child = self._cache[labels] = self._metric.labels(*labels)
        return child


TIMING_EVERY = 16

_REQ_TOTAL = _Labelled(m.REQUEST_TOTAL)
_REQ_ERRORS = _Labelled(m.REQUEST_ERROR_TOTAL)
_REQ_DURATION = _Labelled(m.REQUEST_DURATION)
_REQ_SIZES = _Labelled(m.REQUEST_SIZES)
_RESP_SIZES = _Labelled(m.RESPONSE_SIZES)
_IN_TOKENS = _Labelled(m.INPUT_TOKENS)
_OUT_TOKENS = _Labelled(m.OUTPUT_TOKENS)
_CACHED_TOKENS = _Labelled(m.PROMPT_CACHED_TOKENS)
_NTPOT = _Labelled(m.NTPOT)
_RUNNING = _Labelled(m.RUNNING_REQUESTS)
_PLUGIN_DURATION = _Labelled(m.PLUGIN_DURATION)
_REWRITES = _Labelled(m.MODEL_REWRITE_DECISIONS)


def _record_error(model: str, target: str, code: str) -> None:
    _REQ_ERRORS(model, target, code).inc()


class FlowTicket(Protocol):
    """A request flow control let through (``epp.flowcontrol.queue.FlowItem``)."""

    @property
    def waited(self) -> bool:
        """Whether it was queued (the pool may have changed meanwhile)."""

    @property
    def queue_time(self) -> float:
        """Seconds it spent queued."""

    def scheduled(self, targets: Sequence[str]) -> None:
        """It was scheduled onto these endpoints (keys): it is in flight there now."""

    def finish(self) -> None:
        """It is over (response complete, error, or scheduling failed); idempotent."""


class FlowGate(Protocol):
    """Flow control as the Director sees it (``epp.flowcontrol.controller.FlowController``):
    holds a request while the pool is saturated and lets it through in policy order, or
    raises ``RequestError`` (rejected, expired in the queue). Reads the fairness id, priority,
    size and ``x-llm-d-inference-ttl`` from the request. Cancelled (``CancelledError`` at its
    await) when the client goes away or the EPP's deadline passes."""

    async def wait_for_dispatch(self, request: InferenceRequest) -> FlowTicket:
        ...


@dataclass
class ClusterObjects:
    """Objectives and model rewrites that come from outside the config file (the
    InferenceObjective and InferenceModelRewrite resources of a Kubernetes cluster).
    On a name clash they win over the config's ``inferenceObjectives`` / ``modelRewrites``."""

    objectives: Mapping[str, int] | None = None  # objective name -> priority
    rewrites: Mapping[str, ModelRewrite] | None = None  # rule name -> rewrite


class _Runtime:
    """Everything derived from one LoadedConfig (and the cluster's objects); swapped whole
    on reload or when those objects change."""

    def __init__(self, config: LoadedConfig, rng: random.Random, cluster: ClusterObjects | None = None,
                 flow: FlowGate | None = None) -> None:
        cluster = cluster or ClusterObjects()
        self.config = config
        self.parser = config.parser
        self.scheduler = Scheduler(config.profile_handler, config.profiles)
        self.rewriter = ModelRewriter({**config.model_rewrites, **(cluster.rewrites or {})}, rng)
        self.objectives = {name: o.priority for name, o in config.objectives.items()}
        self.objectives.update(cluster.objectives or {})
        self.producers = list(config.producers)
        # Producers that may wait make routing wait-capable; without them it never awaits here.
        self.waiting_producers = any(isinstance(p, AsyncDataProducer) for p in self.producers)
        self.flow = flow
        self.may_wait = self.waiting_producers or flow is not None
        self.admitters = list(config.admitters)
        self.saturation = config.saturation_detector
        self.admission = LegacyAdmission(config.saturation_detector)
        self.pre_request = [(p, _PLUGIN_DURATION("PreRequest", _ptype(p), _pname(p))) for p in config.pre_request]
        self.received = [(p, _PLUGIN_DURATION("ResponseReceived", _ptype(p), _pname(p))) for p in config.response_received]
        self.streaming = list(config.response_streaming)
        self.complete = [(p, _PLUGIN_DURATION("ResponseComplete", _ptype(p), _pname(p))) for p in config.response_complete]


def _ptype(p: Any) -> str:
    return getattr(p, "plugin_type", "") or type(p).__name__


def _pname(p: Any) -> str:
    return getattr(p, "name", "") or type(p).__name__


class Director:
    def __init__(self, config: LoadedConfig, pool: EndpointPool, options: DirectorOptions | None = None,
                 *, rng: random.Random | None = None,
                 schedulable: Callable[[EndpointPool], Sequence[Endpoint]] | None = None) -> None:
        self.pool = pool
        self.options = options or DirectorOptions()
        self._rng = rng or random.Random()
        self._cluster = ClusterObjects()
        self._flow_override: FlowGate | None = None
        self._schedulable = schedulable or schedulable_endpoints
        self._fallbacks = self.options.destination_fallbacks
        self._rt = _Runtime(config, self._rng, flow=self._flow_for(config, None))
        self.decisions = DecisionLog(self.options.decision_log_size)
        self.in_flight = 0  # scheduled requests whose ``complete`` has not run yet
        self._tick = 0
        self._warned: set[tuple[str, str]] = set()
        # Flow control releases queued requests when capacity may be back: fresh endpoint
        # data, endpoints coming or going (and requests ending: RequestContext.complete).
        pool.watch_data(self._capacity_changed)
        pool.subscribe(self._pool_changed)

    # --- configuration ---------------------------------------------------------------------
    @property
    def config(self) -> LoadedConfig:
        return self._rt.config

    def swap_config(self, config: LoadedConfig) -> None:
        """Use a new config for new requests; requests in flight finish with the old one.
        Requests queued in flow control stay queued (the new flow controller adopts them)."""
        self._rt = _Runtime(config, self._rng, self._cluster, self._flow_for(config, self._rt.flow))

    def set_cluster_objects(self, objects: ClusterObjects) -> None:
        """Replace the objectives and rewrites that come from the cluster (for new requests)."""
        self._cluster = objects
        self.swap_config(self._rt.config)

    def set_flow_gate(self, flow: FlowGate | None) -> None:
        """Route new requests through ``flow`` instead of the flow control the config asks
        for (None: back to the config's)."""
        self._flow_override = flow
        self.swap_config(self._rt.config)

    @property
    def flow(self) -> FlowGate | None:
        return self._rt.flow

    def flow_snapshot(self) -> dict | None:
        """Flow control's queue state for /debug (None: flow control is off)."""
        snapshot = getattr(self._rt.flow, "snapshot", None)
        return snapshot() if snapshot is not None else None

    def close(self) -> None:
        """Shutting down: queued requests get upstream's 503 ``rejected-shutting-down``."""
        stop = getattr(self._rt.flow, "stop", None)
        if stop is not None:
            stop()

    def _flow_for(self, config: LoadedConfig, current: FlowGate | None) -> FlowGate | None:
        """The flow controller for ``config`` (its ``flowControl`` section; None with the gate
        off). A new one takes over the queue and the in-flight ledger of ``current``."""
        if self._flow_override is not None:
            return self._flow_override
        from epp.flowcontrol.controller import FlowController  # (import cycle: it raises our errors)

        old = current if isinstance(current, FlowController) else None
        settings = config.flow_control
        if settings is None:
            if old is not None:
                old.release_all()  # the gate was turned off: nothing holds them any more
            return None
        if old is not None and old.settings is settings:
            return old  # same config (e.g. new cluster objects): same controller
        new = FlowController(settings, lambda: self._schedulable(self.pool),
                             ledger=old.ledger if old is not None else None, pool_name=self.options.pool_name)
        if old is not None:
            new.adopt(old)
        return new

    def _capacity_changed(self) -> None:
        notify = getattr(self._rt.flow, "notify", None)
        if notify is not None:
            notify()

    def _pool_changed(self, _event: str, _endpoint: Endpoint) -> None:
        self._capacity_changed()

    def _sample(self) -> bool:
        """Whether this request's hooks are timed: one in TIMING_EVERY, as the scheduling
        profile samples its plugins (two clock reads and an observation per hook would
        otherwise cost more than most hooks)."""
        self._tick += 1
        return self._tick % TIMING_EVERY == 0

    # --- request path ----------------------------------------------------------------------
    @property
    def may_wait(self) -> bool:
        """Whether routing may wait (flow control, an asynchronous producer): then the
        transport must use ``route``; otherwise ``handle_request`` does the same, cheaper."""
        return self._rt.may_wait

    def handle_request(self, headers: dict[str, str], body: bytes,
                       metadata: Mapping[str, Any] | None = None) -> "RequestContext":
        """Pick an endpoint for a complete request; raises ``RequestError``. For a
        configuration where routing never waits; otherwise (tools, tests) it must not wait."""
        rt = self._rt
        if rt.may_wait:
            run = Driven(self.route(headers, body, metadata))
            if run.step():
                return run.result  # type: ignore[return-value]
            run.cancel()
            raise RuntimeError("routing waited (flow control or an asynchronous producer); use Director.route")
        t0 = time.perf_counter()
        req, candidates, cycle, strip = self._begin(rt, headers, body, metadata)
        self._run_producers(rt, cycle, req, candidates)
        return self._conclude(rt, req, candidates, cycle, headers, strip, t0)

    async def route(self, headers: dict[str, str], body: bytes,
                    metadata: Mapping[str, Any] | None = None) -> "RequestContext":
        """``handle_request`` where routing may wait: a coroutine the transport steps by hand
        (``epp.requestcontrol.drive``), so a request that waits for nothing still never
        touches the event loop."""
        t0 = time.perf_counter()
        rt = self._rt
        flow = rt.flow
        # With flow control an empty pool is not an error yet: the request waits for
        # endpoints (noEndpointRequestTTL), as upstream's scale-from-zero waiting room.
        req, candidates, cycle, strip = self._begin(rt, headers, body, metadata, may_be_empty=flow is not None)
        if rt.waiting_producers:
            await self._run_producers_async(rt, cycle, req, candidates)
        else:
            self._run_producers(rt, cycle, req, candidates)
        if flow is None:
            return self._conclude(rt, req, candidates, cycle, headers, strip, t0)
        try:
            # Admitter plugins first; flow control owns saturation (no legacy shedding).
            self._admit(rt, req, candidates, legacy=False)
            ticket = await flow.wait_for_dispatch(req)
        except E.RequestError as e:
            _record_error(req.incoming_model, req.target_model, e.code)
            raise
        try:
            if ticket.waited:  # the pool and its metrics moved on while it was queued
                candidates = self._refresh(rt, cycle, req, candidates, metadata)
            return self._conclude(rt, req, candidates, cycle, headers, strip, t0, admitted=True, ticket=ticket)
        except BaseException:
            ticket.finish()
            raise

    # --- pipeline steps --------------------------------------------------------------------
    def _begin(self, rt: _Runtime, headers: dict[str, str], body: bytes, metadata: Mapping[str, Any] | None,
               may_be_empty: bool = False) -> tuple[InferenceRequest, list[Candidate], CycleState, list[str]]:
        """Parse, rewrite, read the control headers, find the candidates."""
        model = target = ""
        try:
            try:
                req = rt.parser.parse_request(body, headers)
            except ParseError as e:
                raise E.bad_request(str(e)) from None
            except E.RequestError:
                raise
            except Exception as e:  # a parser bug must not take the stream down
                log.exception("parser %s failed", _pname(rt.parser))
                raise E.bad_request(f"cannot parse request body: {type(e).__name__}: {e}") from None
            req.request_id = headers.get(REQUEST_ID_HEADER) or req.request_id or str(uuid.uuid4())
            req.received_at = now()
            if not req.body:
                req.body = body
            payload = req.payload
            if payload is not None:
                incoming = payload.get("model")
                if not isinstance(incoming, str) or not incoming:
                    raise E.bad_request(E.MSG_MODEL_MISSING)
                req.incoming_model = model = incoming
            else:
                model = req.incoming_model
            target, rule = rt.rewriter.target(model, headers)
            req.target_model = target
            if rule is not None:
                _REWRITES(rule, model, target).inc()
            strip = read_control_headers(req, headers)
            if req.objective:
                req.priority = rt.objectives.get(req.objective, 0)
            candidates = self._candidates(metadata)
            if not candidates and not (may_be_empty and not self._schedulable(self.pool)):
                raise E.unavailable(E.MSG_NO_CANDIDATES)
        except E.RequestError as e:
            _record_error(model, target, e.code)
            raise
        return req, candidates, CycleState(), strip

    def _refresh(self, rt: _Runtime, cycle: CycleState, req: InferenceRequest, candidates: list[Candidate],
                 metadata: Mapping[str, Any] | None) -> list[Candidate]:
        """The candidates after a wait in flow control: the pool as it is now, with current
        metrics. Candidates still present keep what asynchronous producers gave them; the
        synchronous producers run again (they are cheap and their inputs moved on)."""
        before = {c.key: c for c in candidates}
        fresh = []
        for c in self._candidates(metadata):
            old = before.get(c.key)
            if old is not None and old.endpoint is c.endpoint:
                old.metadata, old.metrics = c.metadata, c.metrics
                c = old
            fresh.append(c)
        if not fresh:
            raise E.unavailable(E.MSG_NO_CANDIDATES)
        self._run_producers(rt, cycle, req, fresh, sync_only=True)
        return fresh

    def _conclude(self, rt: _Runtime, req: InferenceRequest, candidates: list[Candidate], cycle: CycleState,
                  headers: Mapping[str, str], strip: list[str], t0: float, admitted: bool = False,
                  ticket: FlowTicket | None = None) -> "RequestContext":
        """Admission (unless done before a wait), the scheduler, the pre-request hooks and the
        request's context."""
        model, target = req.incoming_model, req.target_model
        try:
            if not admitted:
                self._admit(rt, req, candidates)
            # The scheduler records scheduler_e2e_duration and scheduler_attempts itself.
            ts = time.perf_counter()
            try:
                result = rt.scheduler.schedule(req, candidates, cycle)
                targets = result.targets
            except (SchedulingError, LookupError) as e:
                raise E.exhausted(f"failed to find target endpoint: {e}") from None
            sched_s = time.perf_counter() - ts
            if not targets:
                raise E.exhausted("failed to find target endpoint: no target endpoint picked")
            if self._fallbacks:
                dest = ",".join(destination_keys(result.primary, self._fallbacks, self._rng))
            else:
                dest = targets[0].key if len(targets) == 1 else ",".join(c.key for c in targets)

            timed = self._sample()
            for plugin, hist in rt.pre_request:
                tp = time.perf_counter() if timed else 0.0
                try:
                    plugin.pre_request(req, result)
                except Exception:
                    self._warn_once(plugin, "pre_request")
                if timed:
                    deferred.observe(hist, time.perf_counter() - tp)
        except E.RequestError as e:
            _record_error(model, target, e.code)
            raise

        payload = req.payload
        body_out: bytes | None = None
        if target != model and payload is not None:
            body_out = reserialize(payload, target)
        ctx = RequestContext(self, rt, req, result, dest, body_out, t0, timed)
        ctx.strip = strip
        queue_s = 0.0
        if ticket is not None:
            ticket.scheduled((targets[0].key,))  # the primary target: where the request goes
            ctx.flow = ticket
            queue_s = ticket.queue_time
        total_s = time.perf_counter() - t0 - queue_s
        decision = Decision(wall_time(), req.request_id, model, target, req.priority, len(candidates), result,
                            dest, sched_s, total_s, queue_s)
        self.decisions.add(decision)
        if self.options.enable_debug_headers and headers.get(DEBUG_REQUEST_HEADER) == "1":
            ctx.debug_value = debug_header_value(decision)
        _REQ_TOTAL(model, target, str(req.priority)).inc()
        deferred.observe(_REQ_SIZES(model, target), len(req.body))
        _RUNNING(model).inc()
        self.in_flight += 1
        return ctx

    def handle_headers_only(self, headers: Mapping[str, str]) -> str:
        """A request without a body (e.g. GET /v1/models): any endpoint, uniformly at random.

        As upstream, the subset hint is not consulted and no hooks run (nothing was scheduled).
        With fallbacks on, as many more distinct endpoints, also at random.
        """
        endpoints = self._schedulable(self.pool) or self.pool.endpoints()
        if not endpoints:
            _record_error("", "", "Internal")
            raise E.internal(E.MSG_NO_PODS)
        if self._fallbacks and len(endpoints) > 1:
            return ",".join(ep.key for ep in self._rng.sample(endpoints, min(len(endpoints), 1 + self._fallbacks)))
        return self._rng.choice(endpoints).key

    def _candidates(self, metadata: Mapping[str, Any] | None) -> list[Candidate]:
        endpoints = self._schedulable(self.pool)
        if not self.options.disable_subset_filter:
            entries = subset_hint(metadata)
            if entries is not None:
                endpoints = filter_by_subset(endpoints, entries) if entries else []
        return [Candidate(ep) for ep in endpoints]

    def _run_producers(self, rt: _Runtime, cycle: CycleState, req: InferenceRequest, cands: list[Candidate],
                       sync_only: bool = False) -> None:
        for producer in rt.producers:
            if sync_only and isinstance(producer, AsyncDataProducer):
                continue
            try:
                producer.produce(cycle, req, cands)
            except Exception:
                # Upstream logs and goes on: a producer failing only loses its data.
                self._warn_once(producer, "produce")

    async def _run_producers_async(self, rt: _Runtime, cycle: CycleState, req: InferenceRequest,
                                   cands: list[Candidate]) -> None:
        for producer in rt.producers:
            try:
                if isinstance(producer, AsyncDataProducer):
                    await producer.produce(cycle, req, cands)
                else:
                    producer.produce(cycle, req, cands)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._warn_once(producer, "produce")

    def _admit(self, rt: _Runtime, req: InferenceRequest, cands: list[Candidate], legacy: bool = True) -> None:
        if legacy and req.priority < 0:  # only sheddable requests are checked (upstream legacy admission)
            try:
                denied = rt.admission.check(req, cands)
            except Exception:
                self._warn_once(rt.saturation, "saturation")
                denied = None
            if denied is not None:
                raise E.exhausted(denied.reason or E.MSG_SHED)
        for admitter in rt.admitters:
            try:
                denied = admitter.admit(req, cands)
            except Exception:
                self._warn_once(admitter, "admit")
                denied = None
            if denied is not None:
                raise E.RequestError.from_status(denied.status or 500, denied.reason or E.MSG_NOT_ADMITTED)

    def _warn_once(self, plugin: Any, where: str) -> None:
        key = (_pname(plugin), where)
        if key in self._warned:
            log.debug("plugin %s failed in %s again", key[0], where, exc_info=True)
            return
        self._warned.add(key)
        log.exception("plugin %s (%s) failed in %s; further failures are logged at debug level",
                      key[0], _ptype(plugin), where)


class RequestContext:
    """One scheduled request, from the pick to the end of its response."""

    __slots__ = ("director", "rt", "request", "result", "target", "body_out", "started", "response",
                 "debug_value", "done", "timed", "strip", "flow", "_reader", "_reverse", "_usage_done")

    def __init__(self, director: Director, rt: _Runtime, request: InferenceRequest, result: SchedulingResult,
                 target: str, body_out: bytes | None, started: float, timed: bool = False) -> None:
        self.timed = timed  # whether this request's hooks are timed (sampled)
        self.director = director
        self.rt = rt
        self.request = request
        self.result = result
        self.target = target
        self.body_out = body_out
        self.started = started
        self.response = InferenceResponse(request.request_id)
        self.debug_value: str | None = None
        self.strip: list[str] = []  # control headers to remove from the routed request
        self.flow: FlowTicket | None = None  # set when flow control let it through
        self.done = False
        self._reader: UsageReader | None = None
        self._reverse = (ResponseModelReverser(request.incoming_model, request.target_model)
                         if body_out is not None else None)
        self._usage_done = False

    # --- what the transport sends upstream -------------------------------------------------
    def request_headers_to_set(self) -> list[tuple[str, str]]:
        """Headers for the routed request: destination, Content-Length if the body changed,
        and any header a plugin added."""
        out = [(DEST_HEADER, self.target)]
        if self.body_out is not None:
            out.append(("content-length", str(len(self.body_out))))
        added = self.request.added_headers
        if added:
            out.extend(added.items())
        return out

    # --- response side ---------------------------------------------------------------------
    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False,
                         metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Response headers arrived (with the proxy's dynamic metadata, if it forwarded any);
        returns the headers to add to the client's response."""
        resp = self.response
        resp.headers = headers
        resp.metadata = metadata
        status = headers.get(":status", "")
        resp.status = int(status) if status.isdigit() else 0
        resp.streaming = "text/event-stream" in headers.get("content-type", "") or self.request.stream
        timed = self.timed
        for plugin, hist in self.rt.received:
            tp = time.perf_counter() if timed else 0.0
            try:
                plugin.response_received(self.request, resp, self.target)
            except Exception:
                self.director._warn_once(plugin, "response_received")
            if timed:
                deferred.observe(hist, time.perf_counter() - tp)
        added = dict(resp.added_headers)
        if self.debug_value is not None:
            added[DEBUG_RESPONSE_HEADER] = self.debug_value
        if self.flow is not None:  # upstream's header: integer milliseconds spent in flow control
            added[QUEUE_DURATION_HEADER] = str(int(self.flow.queue_time * 1000))
        if end_of_stream:
            resp.end_of_stream = True
            self.complete("complete")
        return added

    def wants_response_body(self) -> bool:
        policy = self.director.options.response_body_policy
        # Streaming hooks need the chunks; a rewritten model must be restored in the body.
        if policy == "always" or self.rt.streaming or self._reverse is not None:
            return True
        if policy == "never":
            return False
        return not self.response.streaming

    def response_chunk(self, chunk: bytes, end_of_stream: bool) -> bytes:
        """One response body chunk; returns the bytes to forward (model name restored)."""
        resp = self.response
        resp.bytes += len(chunk)
        if not self._usage_done:
            reader = self._reader
            if reader is None:
                reader = self._reader = self.rt.parser.usage_reader(resp.headers)
            try:
                usage = reader.feed(chunk, end_of_stream)
            except Exception:
                self.director._warn_once(self.rt.parser, "usage_reader")
                usage = None
                self._usage_done = True
            if usage is not None:
                # Keep feeding: servers that repeat cumulative usage in every chunk (vLLM
                # continuous_usage_stats) end with the final totals; the newest wins.
                resp.usage = usage
        if self.rt.streaming:
            for plugin in self.rt.streaming:
                try:
                    plugin.response_streaming(self.request, resp, chunk, self.target)
                except Exception:
                    self.director._warn_once(plugin, "response_streaming")
        if self._reverse is not None and chunk:
            chunk = self._reverse(chunk)
        if end_of_stream:
            resp.end_of_stream = True
            self.complete("complete")
        return chunk

    def complete(self, outcome: str) -> None:
        """Idempotent: the first call wins, later ones do nothing."""
        if self.done:
            return
        self.done = True
        director = self.director
        director.in_flight -= 1
        if self.flow is not None:
            self.flow.finish()  # capacity is back: flow control may release the next request
        req, resp = self.request, self.response
        resp.outcome = outcome
        model, target = req.incoming_model, req.target_model
        _RUNNING(model).dec()
        if outcome == "complete":
            elapsed = time.perf_counter() - self.started
            observe = deferred.observe
            observe(_REQ_DURATION(model, target), elapsed)
            if self._reader is not None:  # a body was seen (not: response body mode NONE)
                observe(_RESP_SIZES(model, target), resp.bytes)
            usage = resp.usage
            if usage is not None:
                if usage.prompt_tokens:
                    observe(_IN_TOKENS(model, target), usage.prompt_tokens)
                if usage.completion_tokens:
                    observe(_OUT_TOKENS(model, target), usage.completion_tokens)
                    observe(_NTPOT(model, target), elapsed / usage.completion_tokens)
                if usage.cached_tokens:
                    observe(_CACHED_TOKENS(model, target), usage.cached_tokens)
            if resp.status >= 400:
                _record_error(model, target, "ModelServerError")
        elif outcome == "error":
            _record_error(model, target, "ModelServerError")
        timed = self.timed
        for plugin, hist in self.rt.complete:
            tp = time.perf_counter() if timed else 0.0
            try:
                plugin.response_complete(req, resp, self.target)
            except Exception:
                director._warn_once(plugin, "response_complete")
            if timed:
                deferred.observe(hist, time.perf_counter() - tp)

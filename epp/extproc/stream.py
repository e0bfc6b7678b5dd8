"""The state machine of one ext_proc stream (= one HTTP request through Envoy).

Pure and synchronous: ``on_message`` takes one ``ProcessingRequest`` and returns the
``ProcessingResponse``s to send, in order; the transport (``service.py``) only moves
messages. That keeps the protocol logic testable without gRPC and the per-chunk path free
of awaits.

Routing may wait (flow control holds the request, a data producer fetches token IDs). Then
the stream is parked in state ``routing``: ``on_message`` returns nothing and ``parked`` is
set; the transport calls ``resume`` when ``parked`` can go on, which returns the routing
answers (or parks again). The stream ending (``finish``) or the deadline cancels a parked
route, so a client that goes away leaves any queue at once.

Request phase, by the body mode Envoy announces in ``protocol_config`` (first message):

- ``FULL_DUPLEX_STREAMED`` (upstream's only mode): the request-headers answer is held until
  the body ends (``end_of_stream`` on a body chunk, or request trailers). It then carries the
  pick (``x-gateway-destination-endpoint``, ``clear_route_cache``, ``envoy.lb`` metadata,
  Content-Length if the body changed); the (possibly rewritten) body follows as
  ``streamed_response`` chunks of at most 62000 bytes, the last with ``end_of_stream``.
- ``BUFFERED`` (and ``STREAMED``/``BUFFERED_PARTIAL``): request headers get an empty answer
  at once; the pick rides on the body answer as a header mutation Envoy applies to the
  headers it still holds.
- Header-only requests (``end_of_stream`` on the headers, e.g. GET) get a random endpoint
  in the headers answer.

Response phase: response headers get the headers plugins want added (and, with debugging
enabled, the decision summary); body chunks go through the request context (usage,
streaming hooks, model name restored) and are echoed one for one in duplex mode. In a mode
that allows it (request not duplex, response STREAMED/BUFFERED) and when the response-body
policy says the body is not needed, the headers answer carries a ``mode_override`` to
response body mode NONE, so Envoy stops sending chunks but keeps the stream open until the
response ends.

Anything out of protocol (a message in the wrong state, a body over the limit, a failing
pick) ends in one ImmediateResponse and ``closed``; the request context's ``complete`` runs
exactly once, from ``finish`` at the latest.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Union

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.extproc import messages as msg
from epp.framework.headers import present_control_headers
from epp.requestcontrol.director import Director, RequestContext
from epp.requestcontrol.drive import Driven
from epp.requestcontrol.errors import RequestError

log = logging.getLogger(__name__)

# States
EXPECT_HEADERS = 0
REQUEST_BODY = 1  # headers seen, collecting the body
ROUTING = 2  # the request is complete; routing waits (flow control, a producer's I/O)
ROUTED = 3  # request answered; waiting for the response
RESPONSE_BODY = 4  # response headers answered
RESPONSE_DONE = 5  # response end seen (trailers may still come)
CLOSED = 6  # an ImmediateResponse was sent; nothing more to do

STATE_NAMES = ("expect-headers", "request-body", "routing", "routed", "response-body", "response-done", "closed")

_OVERRIDABLE = (msg.STREAMED, msg.BUFFERED, msg.BUFFERED_PARTIAL)

# An answer is a ProcessingResponse or its serialised bytes (hot paths build bytes directly).
Out = Union[pb.ProcessingResponse, bytes]


class StreamSettings:
    __slots__ = ("max_body_bytes", "request_timeout", "default_request_mode", "default_response_mode")

    def __init__(self, max_body_bytes: int = 16 << 20, request_timeout: float = 30.0,
                 default_request_mode: int = msg.FULL_DUPLEX, default_response_mode: int = msg.FULL_DUPLEX) -> None:
        self.max_body_bytes = max_body_bytes
        # The request phase (headers to pick) must end within this many seconds; Envoy
        # enforces no message timeout in full-duplex mode, so we do.
        self.request_timeout = request_timeout
        # Used only when Envoy sends no protocol_config (older than 1.33).
        self.default_request_mode = default_request_mode
        self.default_response_mode = default_response_mode


class ExtProcStream:
    __slots__ = ("director", "settings", "state", "req_mode", "resp_mode", "headers", "metadata", "chunks",
                 "size", "ctx", "outcome", "body_overridden", "timed_out", "parked", "_routing")

    def __init__(self, director: Director, settings: StreamSettings) -> None:
        self.director = director
        self.settings = settings
        self.state = EXPECT_HEADERS
        self.req_mode = settings.default_request_mode
        self.resp_mode = settings.default_response_mode
        self.headers: dict[str, str] = {}
        self.metadata: Mapping[str, Any] | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.ctx: RequestContext | None = None
        self.outcome = ""  # set when the stream ends for a reason we know
        self.body_overridden = False  # Envoy was told to stop sending response bodies
        self.timed_out = False
        # While routing waits: the routing coroutine. The transport calls ``resume`` once
        # ``parked.wake_me`` calls back (or, from a task, after ``await parked.wait()``).
        self.parked: Driven[RequestContext] | None = None
        self._routing: tuple[bytes, bool] = (b"", False)  # body and trailers of the waiting route

    # --- properties the transport reads ----------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    @property
    def request_done(self) -> bool:
        return self.state >= ROUTED

    # --- events ----------------------------------------------------------------------------
    def on_message(self, req: pb.ProcessingRequest) -> list[Out]:
        kind = req.WhichOneof("request")
        state = self.state
        if state == CLOSED:
            return []
        try:  # (free in Python 3.11 unless something raises)
            # Hot path first: response chunks of a routed request.
            if kind == "response_body" and state == RESPONSE_BODY:
                return self._response_body(req.response_body)
            if kind == "request_headers" and state == EXPECT_HEADERS:
                return self._request_headers(req)
            if kind == "request_body" and state == REQUEST_BODY:
                return self._request_body(req.request_body)
            if kind == "request_trailers":
                if state == REQUEST_BODY:
                    return self._route(trailers=True)
                if state >= ROUTED:
                    return [msg.EMPTY_REQUEST_TRAILERS]
            elif kind == "response_headers" and state == ROUTED:
                return self._response_headers(req.response_headers, msg.forwarded_metadata(req))
            elif kind == "response_body" and state == ROUTED:
                # response_header_mode SKIP: the body comes without headers first.
                self.state = RESPONSE_BODY
                if self.ctx is not None:
                    self.ctx.response_headers({})
                return self._response_body(req.response_body)
            elif kind == "response_trailers" and state in (RESPONSE_BODY, RESPONSE_DONE):
                self.state = RESPONSE_DONE
                if self.ctx is not None:
                    self.ctx.complete("complete")
                return [msg.EMPTY_RESPONSE_TRAILERS]
            return self._fail(RequestError("Internal", f"unexpected ext_proc message {kind or 'empty'} "
                                                       f"in stream state {STATE_NAMES[state]}"), "protocol-error")
        except RequestError as e:
            return self._fail(e, "rejected")
        except Exception as e:  # a bug must cost one request, never the server
            log.exception("ext_proc stream failed on %s", kind)
            return self._fail(RequestError("Internal", f"{type(e).__name__}: {e}"), "internal-error")

    def duplex_chunk(self, data: bytes) -> bytes | list[Out]:
        """The per-token hot path: one response chunk that does not end the response, in
        full duplex with the response headers answered (the caller checks ``state ==
        RESPONSE_BODY and resp_mode == FULL_DUPLEX``). Returns the bytes to echo in
        ``streamed_response`` (model name restored) or, if handling the chunk failed, the
        answers that end the stream: what ``on_message`` does with such a ``response_body``,
        minus the message object and the dispatch."""
        ctx = self.ctx
        if ctx is None:
            return data
        try:
            return ctx.response_chunk(data, False)
        except Exception as e:  # a bug must cost one request, never the server
            log.exception("ext_proc stream failed on a response chunk")
            return self._fail(RequestError("Internal", f"{type(e).__name__}: {e}"), "internal-error")

    def resume(self) -> list[Out]:
        """Routing can go on (what it waited for is done): step it; the answers to send, or
        [] if it waits again (``parked`` is then set anew)."""
        run = self.parked
        if run is None or self.state != ROUTING:
            return []
        try:
            if not run.step():
                return []
            self.parked = None
            body, trailers = self._routing
            self._routing = (b"", False)
            return self._answer_route(run.result, body, trailers)  # type: ignore[arg-type]
        except RequestError as e:
            self.parked = None
            return self._fail(e, "rejected")
        except Exception as e:  # a bug must cost one request, never the server
            self.parked = None
            log.exception("ext_proc stream failed while routing")
            return self._fail(RequestError("Internal", f"{type(e).__name__}: {e}"), "internal-error")

    def on_deadline(self) -> list[Out]:
        """The request phase took too long (body never completed, or routing still waits):
        answer 504 if still open."""
        if self.state >= ROUTED:
            return []
        self.timed_out = True
        self._stop_routing()
        return self._fail(RequestError("DeadlineExceeded", f"request not complete within "
                                                           f"{self.settings.request_timeout:g}s"), "timeout")

    def finish(self) -> str:
        """The gRPC stream ended (normally, reset or cancelled). Returns the stream outcome."""
        if self.parked is not None:  # the client went away while its request waited
            self._stop_routing()
            self.outcome = self.outcome or "disconnected"
        ctx = self.ctx
        if ctx is not None and not ctx.done:
            if self.timed_out:
                ctx.complete("timeout")
            elif self.state == RESPONSE_BODY and (self.body_overridden or self.resp_mode == msg.NONE):
                # Envoy sends no body in these modes; the stream ending is the response ending.
                ctx.complete("complete")
            elif self.outcome in ("protocol-error", "internal-error"):
                ctx.complete("error")
            else:
                ctx.complete("client-disconnect")
        if not self.outcome:
            self.outcome = "complete" if self.state in (RESPONSE_BODY, RESPONSE_DONE) else "disconnected"
        return self.outcome

    # --- request phase ---------------------------------------------------------------------
    def _request_headers(self, req: pb.ProcessingRequest) -> list[Out]:
        if req.HasField("protocol_config"):
            pc = req.protocol_config
            self.req_mode = pc.request_body_mode
            self.resp_mode = pc.response_body_mode
        rh = req.request_headers
        self.headers = msg.headers_to_dict(rh)
        self.metadata = msg.forwarded_metadata(req)
        if rh.end_of_stream:
            dest = self.director.handle_headers_only(self.headers)
            self.state = ROUTED
            return [msg.route_in_headers([(msg.DEST_HEADER, dest)], dest, present_control_headers(self.headers))]
        self.state = REQUEST_BODY
        if self.req_mode == msg.FULL_DUPLEX:
            return []  # the answer carries the pick, so it waits for the body
        return [msg.EMPTY_REQUEST_HEADERS]

    def _request_body(self, body: pb.HttpBody) -> list[Out]:
        data = body.body
        if data:
            self.size += len(data)
            if self.size > self.settings.max_body_bytes:
                raise RequestError("RequestTooLarge", f"request body larger than {self.settings.max_body_bytes} bytes")
            self.chunks.append(data)
        if body.end_of_stream:
            return self._route(trailers=False)
        if self.req_mode in (msg.STREAMED, msg.BUFFERED_PARTIAL):
            return [msg.EMPTY_REQUEST_BODY_RAW]  # these modes want every chunk acknowledged
        return []

    def _route(self, trailers: bool) -> list[Out]:
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        director = self.director
        if not director.may_wait:
            return self._answer_route(director.handle_request(self.headers, body, self.metadata), body, trailers)
        run = Driven(director.route(self.headers, body, self.metadata))
        if run.step():
            return self._answer_route(run.result, body, trailers)  # type: ignore[arg-type]
        self.state = ROUTING
        self.parked = run
        self._routing = (body, trailers)
        return []

    def _stop_routing(self) -> None:
        run = self.parked
        if run is not None:
            self.parked = None
            self._routing = (b"", False)
            run.cancel()

    def _answer_route(self, ctx: RequestContext, body: bytes, trailers: bool) -> list[Out]:
        self.ctx = ctx
        self.state = ROUTED
        set_headers = ctx.request_headers_to_set()
        if self.req_mode == msg.FULL_DUPLEX:
            out = [msg.route_in_headers(set_headers, ctx.target, ctx.strip)]
            # With trailers still to come, the body must not claim the end of the stream.
            out.extend(msg.streamed_request_body(ctx.body_out if ctx.body_out is not None else body, not trailers))
        else:
            out = [msg.route_in_body(set_headers, ctx.target, ctx.body_out, ctx.strip)]
        if trailers:
            out.append(msg.EMPTY_REQUEST_TRAILERS)
        return out

    # --- response phase --------------------------------------------------------------------
    def _response_headers(self, rh: pb.HttpHeaders, metadata: Mapping[str, Any] | None) -> list[Out]:
        self.state = RESPONSE_BODY
        ctx = self.ctx
        if ctx is None:  # header-only request: nothing was scheduled, nothing to observe
            return [msg.EMPTY_RESPONSE_HEADERS]
        added = ctx.response_headers(msg.headers_to_dict(rh), rh.end_of_stream, metadata)
        if rh.end_of_stream:
            self.state = RESPONSE_DONE
            return [msg.response_headers(added)]
        override = None
        if (self.req_mode != msg.FULL_DUPLEX and self.resp_mode in _OVERRIDABLE
                and not ctx.wants_response_body()):
            override = msg.NONE
            self.body_overridden = True
        return [msg.response_headers(added, body_mode_override=override)]

    def _response_body(self, body: pb.HttpBody) -> list[Out]:
        data = body.body
        eos = body.end_of_stream
        ctx = self.ctx
        out = ctx.response_chunk(data, eos) if ctx is not None else data
        if eos:
            self.state = RESPONSE_DONE
        if self.resp_mode == msg.FULL_DUPLEX:
            return [msg.streamed_response_chunk(out, eos)]
        # A chunk after we asked for body mode NONE: Envoy ignored the override (its
        # allow_mode_override is off), so the stream's end is no longer the response's end.
        self.body_overridden = False
        if out is not data:
            return [msg.replaced_response_body(out)]
        return [msg.EMPTY_RESPONSE_BODY_RAW]

    # --- errors ----------------------------------------------------------------------------
    def _fail(self, err: RequestError, outcome: str) -> list[Out]:
        self._stop_routing()
        self.state = CLOSED
        self.outcome = outcome
        self.chunks = []
        ctx = self.ctx
        if ctx is not None and not ctx.done:
            ctx.complete("timeout" if outcome == "timeout" else "error")
        return [msg.immediate(err)]

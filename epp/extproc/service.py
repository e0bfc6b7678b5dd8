"""The gRPC transport of ``ExternalProcessor/Process``: moves messages, owns the deadline.

One RPC = one HTTP request. The handler reads with ``context.read()`` and writes with
``context.write()`` (no async generator: fewer event-loop hops per message) and feeds an
``ExtProcStream``; when routing waits, the handler awaits it and resumes the stream. A single timer per stream bounds the request phase; when it fires while
the body is still incomplete, the handler's pending read is cancelled and a 504
ImmediateResponse is written instead. The stream's ``finish`` always runs (``finally``), so
a client disconnect or an Envoy reset still completes the request exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.extproc import messages as msg
from epp.extproc.stream import ExtProcStream, StreamSettings
from epp.observability import metrics as m
from epp.requestcontrol.director import Director

log = logging.getLogger(__name__)

_EOF = grpc.aio.EOF


def serialize(message: Any) -> bytes:
    # Pre-serialised bytes pass straight through (lets hot paths skip message building).
    return message if type(message) is bytes else message.SerializeToString()


class _StreamOutcomes:
    """Cached counter children per outcome (label lookup costs more than the increment)."""

    def __init__(self) -> None:
        self._children: dict[str, Any] = {}

    def inc(self, outcome: str) -> None:
        child = self._children.get(outcome)
        if child is None:
            child = self._children[outcome] = m.EXTPROC_STREAMS.labels(outcome)
        child.inc()


class ExtProcService:
    def __init__(self, director: Director, settings: StreamSettings | None = None) -> None:
        self.director = director
        self.settings = settings or StreamSettings()
        self.active_streams = 0
        self._outcomes = _StreamOutcomes()

    def record_outcome(self, outcome: str) -> None:
        self._outcomes.inc(outcome)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(msg.SERVICE_NAME, {
            "Process": grpc.stream_stream_rpc_method_handler(
                self.process, request_deserializer=pb.ProcessingRequest.FromString, response_serializer=serialize),
        })

    async def process(self, _request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        stream = ExtProcStream(self.director, self.settings)
        task = asyncio.current_task()
        deadline_hit = False

        def on_deadline() -> None:
            nonlocal deadline_hit
            if not stream.request_done and not stream.closed:
                deadline_hit = True
                task.cancel()  # type: ignore[union-attr]

        timer = asyncio.get_running_loop().call_later(self.settings.request_timeout, on_deadline)
        self.active_streams += 1
        read = context.read
        write = context.write
        try:
            while True:
                req = await read()
                if req is _EOF:
                    return
                out = stream.on_message(req)
                while True:
                    if timer is not None and stream.request_done:
                        timer.cancel()
                        timer = None
                    for resp in out:
                        await write(resp)
                    parked = stream.parked
                    if parked is None:
                        break
                    await parked.wait()  # routing waits (flow control, a producer's I/O)
                    out = stream.resume()
                if stream.closed:
                    return
        except asyncio.CancelledError:
            if not deadline_hit:
                raise  # Envoy went away: finish() below records the disconnect
            task.uncancel()  # type: ignore[union-attr]
            for resp in stream.on_deadline():
                await write(resp)
        finally:
            if timer is not None:
                timer.cancel()
            self.active_streams -= 1
            self.record_outcome(stream.finish())

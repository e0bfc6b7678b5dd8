"""What the same request path costs warm, with caches evicted, and after the CPU sat idle.

Why this exists: through Envoy, the EPP's CPU per request at a fixed 500 req/s is about twice
what it is in a closed loop, with the same code. This measures the reason without sockets, Envoy
or other processes: one EPP (the default configuration, one endpoint) and one of our HTTP/2
connections fed with the exact frames Envoy sends for a full-duplex request (request headers +
body, response headers + body, the stream reset), timed per request in three conditions:

- ``warm``: requests back to back (what a saturated closed loop sees);
- ``evicted``: 16 MiB of other memory touched between requests (what other processes sharing
  the core do to the caches);
- ``after_idle``: a 2 ms sleep between requests (what a fixed rate of a few hundred req/s
  looks like to one process: on a VM the idle vCPU is halted and wakes up cold).

The same for one streamed response chunk (full-duplex echo).

    measure_idle_penalty(requests=2000)  -> {"request_us": {...}, "chunk_us": {...}}
"""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import time
from typing import Any, Callable

MODES = ("warm", "evicted", "after_idle")
_EVICT_BYTES = 16 << 20
_IDLE_SECONDS = 0.002


class _NullTransport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return None

    def close(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def _grpc(message: Any) -> bytes:
    raw = message.SerializeToString()
    return b"\x00" + len(raw).to_bytes(4, "big") + raw


class EnvoyWorkload:
    """One EPP (the default configuration, one endpoint) and one of our HTTP/2 connections
    (``conn``) on a null transport, and the frames Envoy sends: ``request_frames()`` for one
    full-duplex request (request headers + body, response headers + body, the stream reset),
    ``open_chunk_stream()`` for a streamed answer's chunks. Feed them to
    ``conn.data_received``. Also the workload of ``epp.bench.instructions``."""

    def __init__(self) -> None:
        import hpack
        from envoy.config.core.v3 import base_pb2
        from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

        from epp.bench.overhead import BODY
        from epp.datalayer.endpoint import EndpointMetadata
        from epp.datalayer.pool import EndpointPool
        from epp.extproc.fastserver import DATA, HEADERS, PREFACE, RST_STREAM, SETTINGS, WINDOW_UPDATE, \
            F_END_HEADERS, FastExtProcServer, _Connection, frame
        from epp.extproc.health import HealthService
        from epp.extproc.service import ExtProcService
        from epp.extproc.stream import StreamSettings
        from epp.options import ServeOptions
        from epp.requestcontrol.director import Director, DirectorOptions

        pool = EndpointPool("bench")
        pool.sync([EndpointMetadata("127.0.0.1", 8000)])
        self.director = Director(ServeOptions().load_config(pool), pool,
                                 DirectorOptions(response_body_policy="non-streaming"))
        server = FastExtProcServer(ExtProcService(self.director, StreamSettings()), HealthService(lambda: True))
        self.conn = conn = _Connection(server)
        self.transport = _NullTransport()
        conn.connection_made(self.transport)  # type: ignore[arg-type]
        big_window = 2**31 - 1
        # Envoy's preface: its SETTINGS, the ACK of ours (else the SETTINGS timeout ends a long
        # run) and a large connection window.
        conn.data_received(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, big_window)) + frame(SETTINGS, 1, 0)
                           + frame(WINDOW_UPDATE, 0, 0, (big_window - 65535).to_bytes(4, "big")))

        def headers(pairs: list[tuple[str, str]]) -> pb.HttpHeaders:
            return pb.HttpHeaders(headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]))

        duplex = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
        answer = json.dumps({"id": "c", "object": "text_completion", "model": "bench-model",
                             "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41}}).encode()
        request_msgs = _grpc(pb.ProcessingRequest(
            request_headers=headers([(":method", "POST"), (":path", "/v1/completions"), (":authority", "epp"),
                                     ("content-type", "application/json"), ("content-length", str(len(BODY)))]),
            protocol_config=pb.ProtocolConfiguration(request_body_mode=duplex, response_body_mode=duplex)))
        body_msg = _grpc(pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=True)))
        json_response = (_grpc(pb.ProcessingRequest(response_headers=headers([(":status", "200"),
                                                                               ("content-type", "application/json")]))),
                         _grpc(pb.ProcessingRequest(response_body=pb.HttpBody(body=answer, end_of_stream=True))))
        sse_headers = _grpc(pb.ProcessingRequest(response_headers=headers([(":status", "200"),
                                                                           ("content-type", "text/event-stream")])))
        chunk = _grpc(pb.ProcessingRequest(response_body=pb.HttpBody(
            body=b'data: {"id":"c","object":"text_completion","model":"bench-model","choices":[{"index":0,'
                 b'"text":" tok","finish_reason":null}]}\n\n')))
        encoder = hpack.Encoder()
        call_headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"epp"),
                        (b":path", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
                        (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        self._ids = itertools.count(1, 2)  # client-initiated HTTP/2 streams are odd

        def opening(sid: int) -> bytes:
            """A new ext_proc stream: call headers, request headers, request body (what Envoy sends first)."""
            return (frame(HEADERS, F_END_HEADERS, sid, encoder.encode(call_headers))
                    + frame(DATA, 0, sid, request_msgs) + frame(DATA, 0, sid, body_msg))

        def request_frames() -> tuple[bytes, bytes, bytes]:
            """The frames of the next full-duplex request with a JSON answer, in three reads:
            the stream opening, the response, the reset."""
            sid = next(self._ids)
            return (opening(sid), frame(DATA, 0, sid, json_response[0]) + frame(DATA, 0, sid, json_response[1]),
                    frame(RST_STREAM, 0, sid, b"\x00\x00\x00\x08"))

        def open_chunk_stream() -> bytes:
            """Open a stream whose answer streams (SSE); returns the frame of one chunk on it."""
            sid = next(self._ids)
            self.conn.data_received(opening(sid) + frame(DATA, 0, sid, sse_headers))
            return frame(DATA, 0, sid, chunk)

        self.request_frames = request_frames
        self.open_chunk_stream = open_chunk_stream


async def _measure(requests: int) -> dict[str, Any]:
    from epp.observability import deferred

    work = EnvoyWorkload()
    conn, director, transport = work.conn, work.director, work.transport

    # The Envoy-side frames are built before the clock starts; only the EPP's handling is timed.
    def request_step() -> float:
        first, response, reset = work.request_frames()
        t = time.perf_counter()
        conn.data_received(first)
        conn.data_received(response)
        conn.data_received(reset)
        return time.perf_counter() - t

    chunk_frame = b""

    def chunk_step() -> float:
        t = time.perf_counter()
        conn.data_received(chunk_frame)
        return time.perf_counter() - t

    evict = bytearray(_EVICT_BYTES)
    stride = bytes(_EVICT_BYTES // 64)

    def between(mode: str) -> None:
        if mode == "evicted":
            evict[::64] = stride
        elif mode == "after_idle":
            time.sleep(_IDLE_SECONDS)

    async def run(step: Callable[[], float], n: int) -> dict[str, float]:
        for _ in range(min(500, n)):
            step()  # warm-up: caches of our own (hpack blocks, echo heads, label children)
            await asyncio.sleep(0)
        out = {}
        for mode in MODES:
            total = 0.0
            for i in range(n):
                between(mode)
                total += step()
                # Untimed, as in the server: the loop's housekeeping (closing cancelled timers)
                # and the histogram flusher (every 100 ms there, ~50 requests at 500 req/s).
                await asyncio.sleep(0)
                if i % 50 == 0:
                    deferred.flush()
            out[mode] = round(total / n * 1e6, 1)
        return out

    result: dict[str, Any] = {"requests": requests, "idle_ms": _IDLE_SECONDS * 1e3,
                              "evicted_bytes": _EVICT_BYTES, "request_us": await run(request_step, requests)}
    chunk_frame = work.open_chunk_stream()
    result["chunk_us"] = await run(chunk_step, requests * 2)
    result["in_flight_after_requests"] = director.in_flight - 1  # minus the open streaming one
    result["bytes_written"] = transport.written
    return result


def measure_idle_penalty(requests: int = 2000) -> dict[str, Any]:
    """Run on a fresh uvloop (as the EPP does); see the module docstring."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(_measure(requests))
    return uvloop.run(_measure(requests))


def markdown(result: dict[str, Any]) -> str:
    from epp.bench.report import markdown_table

    rows = [("full-duplex request (JSON answer)", *(result["request_us"][m] for m in MODES)),
            ("one streamed response chunk", *(result["chunk_us"][m] for m in MODES))]
    return "\n".join([
        "## The same request path without sockets: warm, caches evicted, after idle",
        "",
        f"In-process (`epp/bench/idlecost.py`): one EPP with the default configuration and one of our HTTP/2 "
        f"connections fed the frames Envoy sends; µs of wall time per request or chunk, {result['requests']} "
        f"requests per column. `evicted`: {result['evicted_bytes'] >> 20} MiB of other memory touched between "
        f"requests; `after idle`: a {result['idle_ms']:g} ms sleep between requests (a fixed rate of a few hundred "
        f"req/s looks like this to one process; on this VM an idle vCPU is halted and wakes up cold). Compare "
        f"`warm` with EPP CPU per request in a closed loop, `after idle` with the fixed-rate rows.",
        "",
        markdown_table(["path", "warm µs", "evicted µs", "after idle µs"], rows),
        "",
    ])

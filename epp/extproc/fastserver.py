"""A small gRPC server for the ext_proc port, on our own HTTP/2 core (``epp.extproc.h2``).

Why: with grpcio's asyncio server every message crosses a completion-queue poller thread
and several event-loop hops; on the ext_proc path (about 11 messages per request in full
duplex) that machinery cost ~4x more CPU than the EPP's own work. Here a whole burst of
frames is parsed in one ``data_received`` call, fed synchronously to the stream state
machines (``ExtProcStream``), and every answer of the burst leaves in one ``write``.

Layers: ``epp.extproc.h2`` is HTTP/2 (framing, stream states, flow control, limits); this
module is gRPC over it (length-prefixed messages, status trailers) and the methods served:
``ExternalProcessor/Process`` and the ``grpc.health.v1.Health`` service (Check, List; Watch
sends the current status and stays open); anything else gets UNIMPLEMENTED. No message
compression. TLS (ALPN h2) with certificate files that are re-read when they change (the
listener is re-opened with the new certificate; open connections keep theirs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import struct
import tempfile
from typing import Any
from urllib.parse import quote

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from epp.extproc.h2.connection import H2Connection
from epp.extproc.h2.frames import (  # noqa: F401  (re-exported: tests and benchmarks build frames)
    CONTINUATION,
    DATA,
    F_END_HEADERS,
    F_END_STREAM,
    F_PADDED,
    F_PRIORITY,
    GOAWAY,
    HEADER,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from epp.extproc.h2.headers import Block, hpack_int, literal
from epp.extproc.h2.limits import Limits
from epp.extproc.h2.stream import H2Stream
from epp.extproc.health import HealthService
from epp.extproc.messages import FULL_DUPLEX, parse_response_body, streamed_chunk_head, streamed_response_chunk
from epp.extproc.service import ExtProcService, serialize
from epp.extproc.stream import RESPONSE_BODY, ExtProcStream
from epp.extproc.tls import CertificateReloader, self_signed_certificate

log = logging.getLogger(__name__)

PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK = b"/grpc.health.v1.Health/Check"
HEALTH_LIST = b"/grpc.health.v1.Health/List"
HEALTH_WATCH = b"/grpc.health.v1.Health/Watch"

GRPC_OK, GRPC_INVALID_ARGUMENT, GRPC_RESOURCE_EXHAUSTED, GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 0, 3, 8, 12, 13

_U32 = struct.Struct(">I")  # the gRPC message length
# Module-level names, not imported ones: CPython 3.11 compiles ``imported_name.pack(...)``
# to LOAD_ATTR + a bound method per call instead of LOAD_METHOD (~2% of a streamed chunk).
_HDR = HEADER


def _echo_head(n: int) -> bytes:
    """gRPC prefix + the ext_proc message bytes before the payload, for echoing an ``n``-byte
    response chunk (no end of stream)."""
    head, tail = streamed_chunk_head(n, False)
    return b"\x00" + (len(head) + n).to_bytes(4, "big") + head


# Echo headers by chunk length: token chunks are a few hundred distinct sizes.
_ECHO_HEADS: dict[int, bytes] = {}
_ECHO_HEADS_MAX = 8192
_ECHO_HEAD_MAX_LEN = 1 << 16

# :status 200 is static entry 8; content-type is static name 31.
RESPONSE_HEADERS = b"\x88" + hpack_int(31, 4) + hpack_int(16, 7) + b"application/grpc"
TRAILERS_OK = literal(b"grpc-status", b"0")


def _trailers(status: int, message: str = "") -> bytes:
    if status == GRPC_OK and not message:
        return TRAILERS_OK
    block = literal(b"grpc-status", str(status).encode())
    if message:
        block += literal(b"grpc-message", quote(message, safe=" !#$&'()*+,/:;=?@[]~").encode())
    return block


class _Stream(H2Stream):
    """One HTTP/2 stream carrying one gRPC call: length-prefixed messages in, answers out."""

    __slots__ = ("buf",)
    conn: "_Connection"

    def __init__(self, conn: "_Connection", sid: int) -> None:
        super().__init__(conn, sid)
        self.buf = bytearray()  # a message that has not fully arrived yet

    # --- input -----------------------------------------------------------------------------
    def on_data(self, data: bytes, end_stream: bool) -> None:
        if data and not self.local_closed:
            if not self.buf and len(data) >= 5 and data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5:
                self.on_message(data[5:])  # the common case: one whole message per DATA frame
            else:
                self.buf += data
                self._messages()
        if end_stream and not self.local_closed:
            if self.buf:
                self.error(GRPC_INTERNAL, f"the request ended inside a message ({len(self.buf)} bytes of it)",
                           "protocol-error")
            else:
                self.on_half_close()

    def _messages(self) -> None:
        """Deliver the whole messages in ``buf``; ask for window for a large one still coming."""
        buf = self.buf
        conn = self.conn
        while len(buf) >= 5 and not self.local_closed:
            if buf[0] != 0:
                self.error(GRPC_UNIMPLEMENTED, "compressed messages are not supported", "protocol-error")
                break
            n = int.from_bytes(buf[1:5], "big")
            if n > conn.max_message:
                self.error(GRPC_RESOURCE_EXHAUSTED, f"message of {n} bytes is larger than the maximum "
                                                    f"{conn.max_message}", "rejected")
                break
            if len(buf) < 5 + n:
                if 5 + n > conn.stream_window:
                    self.held = len(buf)
                    conn.grant(self, 5 + n)
                break
            msg = bytes(buf[5:5 + n])
            del buf[:5 + n]
            if self.granted:
                conn.release(self)
            self.held = len(buf)
            self.on_message(msg)
        if self.local_closed:
            buf.clear()
        self.held = len(buf)

    def on_message(self, raw: bytes) -> None:
        raise NotImplementedError

    def on_half_close(self) -> None:
        if not self.local_closed:
            self.finish(GRPC_OK)

    def fail(self, exc: BaseException) -> None:
        if self.local_closed:
            super().fail(exc)
        else:
            self.error(GRPC_INTERNAL, f"internal error: {type(exc).__name__}", "internal-error")

    def error(self, status: int, message: str, outcome: str) -> None:
        """End the call with an error status; ``outcome`` names it in the stream metrics."""
        self.finish(status, message)

    # --- output ----------------------------------------------------------------------------
    def send_message(self, payload: bytes) -> None:
        conn = self.conn
        if not self.headers_sent:
            self.headers_sent = True
            conn.send_headers(self, RESPONSE_HEADERS, False)
        conn.send_data(self, b"\x00" + len(payload).to_bytes(4, "big") + payload)

    def finish(self, status: int = GRPC_OK, message: str = "") -> None:
        """End our side: trailers (or trailers-only) with END_STREAM."""
        if self.local_closed:
            return
        self.local_closed = True
        self.fast = False
        block = _trailers(status, message)
        if not self.headers_sent:
            self.headers_sent = True
            block = RESPONSE_HEADERS + block  # trailers-only response
        conn = self.conn
        conn.send_headers(self, block, True)
        if self.buf:
            self.buf.clear()
        self.held = 0
        if self.granted:
            conn.release(self)
        self.on_local_close()
        conn.maybe_drop(self)

    def on_local_close(self) -> None:
        pass


class _ProcessStream(_Stream):
    __slots__ = ("machine", "service", "timer", "finalised")

    def __init__(self, conn: "_Connection", sid: int, service: ExtProcService) -> None:
        super().__init__(conn, sid)
        self.service = service
        self.machine = ExtProcStream(service.director, service.settings)
        self.finalised = False
        service.active_streams += 1
        self.timer: asyncio.TimerHandle | None = conn.loop.call_later(service.settings.request_timeout, self._deadline)

    def fast_data(self, payload: bytes) -> bool:
        """The per-token hot path: one DATA frame (no flags) holding one whole gRPC message
        with one response chunk, in full duplex. Decodes it by hand, lets the state machine
        see the chunk and queues the echo as one DATA frame from a cached header. Returns
        False, having done nothing, for anything else (the general path then takes it):
        compressed or partial messages, other message kinds, the end of the response, and a
        frame beyond a flow-control window."""
        n = len(payload)
        # struct (warm: the frame loop just used it) rather than int.from_bytes on a slice: on
        # the per-token path every C function touched costs microseconds when caches are cold.
        if n <= 5 or payload[0] or _U32.unpack_from(payload, 1)[0] != n - 5 or self.buf:
            return False
        conn = self.conn
        window = self.recv_window - n
        conn_window = conn.recv_window - n
        if window < 0 or conn_window < 0:
            return False  # the general path raises the flow-control error
        parsed = parse_response_body(payload, 5)
        if parsed is None or parsed[1]:
            return False
        # Credit is due for what we consume; returned in batches (FlowControl.replenish).
        self.recv_window = window
        if window < conn.stream_low:
            conn.replenish(self)
        conn.recv_window = conn_window
        if conn_window < conn.connection_low:
            conn.replenish_connection()
        out = self.machine.duplex_chunk(parsed[0])
        if out.__class__ is not bytes:  # the chunk failed the stream: send its answers, end
            self.fast = False
            for resp in out:  # type: ignore[union-attr]
                self.send_message(serialize(resp))
            self.finish(GRPC_OK)
            return True
        size = len(out)  # type: ignore[arg-type]
        head = _ECHO_HEADS.get(size)
        if head is None:
            if size > _ECHO_HEAD_MAX_LEN or len(_ECHO_HEADS) >= _ECHO_HEADS_MAX:
                self.send_message(streamed_response_chunk(out, False))  # type: ignore[arg-type]
                return True
            head = _ECHO_HEADS[size] = _echo_head(size)
        size += len(head)
        if not self.pending and size <= self.send_window and size <= conn.send_conn_window and size <= conn.peer_max_frame:
            self.send_window -= size
            conn.send_conn_window -= size
            conn.out += (_HDR.pack(size >> 16, size & 0xFFFF, DATA, 0, self.sid), head, out)
        else:
            self.send_message(streamed_response_chunk(out, False))  # type: ignore[arg-type]
        return True

    def on_message(self, raw: bytes) -> None:
        try:
            req = pb.ProcessingRequest.FromString(raw)
        except DecodeError as e:
            self.error(GRPC_INVALID_ARGUMENT, f"cannot decode ProcessingRequest: {e}", "protocol-error")
            return
        machine = self.machine
        self._send(machine.on_message(req))
        if machine.parked is not None:
            machine.parked.wake_me(self._resume)

    def _send(self, out: list) -> None:
        machine = self.machine
        if self.timer is not None and machine.request_done:
            self.timer.cancel()
            self.timer = None
        for resp in out:
            self.send_message(serialize(resp))
        if machine.closed:
            self.finish(GRPC_OK)  # like returning from the handler after an ImmediateResponse
        self.fast = (machine.state == RESPONSE_BODY and machine.resp_mode == FULL_DUPLEX and self.headers_sent
                     and not self.local_closed and not self.remote_closed and self.content_length is None)

    def error(self, status: int, message: str, outcome: str) -> None:
        if not self.machine.outcome:
            self.machine.outcome = outcome
        self.finish(status, message)

    def _resume(self) -> None:
        """Routing that waited can go on (called from the event loop, not from a frame)."""
        if not self.local_closed and not self.finalised:
            self.conn.call_stream(self, self._resumed)  # a failure costs this stream; then flush

    def _resumed(self) -> None:
        machine = self.machine
        self._send(machine.resume())
        if machine.parked is not None:
            machine.parked.wake_me(self._resume)
        elif self.remote_closed:
            self.finish(GRPC_OK)  # the half-close that came while routing waited

    def on_half_close(self) -> None:
        # A client may half-close right after the request body; a request whose routing
        # waits is answered first.
        if self.machine.parked is None:
            super().on_half_close()

    def _deadline(self) -> None:
        self.timer = None
        if not self.local_closed:
            self.conn.call_stream(self, self._on_deadline)

    def _on_deadline(self) -> None:
        for resp in self.machine.on_deadline():
            self.send_message(serialize(resp))
        if self.machine.closed:
            self.finish(GRPC_OK)

    def on_local_close(self) -> None:
        self._finalise()

    def on_reset(self) -> None:
        self._finalise()

    def _finalise(self) -> None:
        if self.finalised:
            return
        self.finalised = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.service.active_streams -= 1
        self.service.record_outcome(self.machine.finish())


class _HealthStream(_Stream):
    __slots__ = ("health", "method")

    def __init__(self, conn: "_Connection", sid: int, health: HealthService, method: bytes) -> None:
        super().__init__(conn, sid)
        self.health = health
        self.method = method

    def on_message(self, raw: bytes) -> None:
        if self.method == HEALTH_LIST:
            self.send_message(self.health.list_response().SerializeToString())
            self.finish(GRPC_OK)
            return
        try:
            service = health_pb2.HealthCheckRequest.FromString(raw).service
        except Exception:  # protobuf DecodeError: a garbled request
            self.finish(GRPC_INTERNAL, "undecodable HealthCheckRequest")
            return
        self.send_message(health_pb2.HealthCheckResponse(status=self.health.status(service)).SerializeToString())
        if self.method == HEALTH_CHECK:
            self.finish(GRPC_OK)
        # Watch: the current status, then the stream stays open until the client leaves.

    def on_half_close(self) -> None:
        if self.method != HEALTH_WATCH and not self.local_closed:
            self.finish(GRPC_INTERNAL, "no request message")


class _UnknownMethod(_Stream):
    __slots__ = ()

    def on_message(self, raw: bytes) -> None:
        pass  # already finished: nothing is delivered


class _Connection(H2Connection):
    """The gRPC layer of one connection: streams by method."""

    __slots__ = ("server", "max_message")

    def __init__(self, server: "FastExtProcServer") -> None:
        super().__init__(server.limits, server.connections)
        self.server = server
        self.max_message = server.max_message

    def open_stream(self, sid: int, block: Block) -> H2Stream:
        path = block.path
        server = self.server
        if path == PROCESS_PATH:
            return _ProcessStream(self, sid, server.service)
        if path in (HEALTH_CHECK, HEALTH_LIST, HEALTH_WATCH):
            return _HealthStream(self, sid, server.health, path)
        st = _UnknownMethod(self, sid)
        st.finish(GRPC_UNIMPLEMENTED, f"unknown method {path.decode('latin-1')}")
        return st


def _ssl_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as d:  # the ssl module loads certificates from files only
        cert, key = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
        with open(cert, "wb") as f:
            f.write(cert_pem)
        with open(key, "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert, key)
    return ctx


class FastExtProcServer:
    """The ext_proc port: ``Process`` + health, plaintext or TLS."""

    def __init__(self, service: ExtProcService, health: HealthService, *, secure: bool = False,
                 cert_path: str | None = None, max_message: int = 17 << 20, limits: Limits | None = None) -> None:
        self.service = service
        self.limits = limits or Limits()
        self.max_message = max_message  # largest gRPC message accepted (BUFFERED sends the body whole)
        self.health = health
        self.connections: set[_Connection] = set()
        self.reloader: CertificateReloader | None = None
        self._ssl: ssl.SSLContext | None = None
        if secure:
            if cert_path:
                self.reloader = CertificateReloader(cert_path)
                self._ssl = _ssl_context(*self.reloader.pair)
            else:
                self._ssl = _ssl_context(*self_signed_certificate())
        self._server: asyncio.AbstractServer | None = None
        self._host = ""
        self.port = 0
        self._watch: asyncio.Task | None = None

    async def bind(self, host: str, port: int) -> int:
        self._host = host
        await self._listen(port)
        return self.port

    async def _listen(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self._host or None, port,
                                                ssl=self._ssl, reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        if self.reloader is not None:
            self._watch = asyncio.create_task(self._watch_certificates(), name="tls-reload")

    async def _watch_certificates(self) -> None:
        assert self.reloader is not None
        while True:
            await asyncio.sleep(self.reloader.check_interval)
            pair = self.reloader.poll()
            if pair is None:
                continue
            try:
                self._ssl = _ssl_context(*pair)
            except (ssl.SSLError, OSError) as e:
                log.warning("new TLS certificate rejected, keeping the old one: %s", e)
                continue
            old = self._server
            if old is not None:
                old.close()  # stops listening; open connections keep their certificate
            await self._listen(self.port)

    async def stop(self, grace: float = 1.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while any(c.streams for c in self.connections) and loop.time() < end:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()

"""A small HTTP/2 + gRPC server for the ext_proc port, built on one asyncio Protocol.

Why: with grpcio's asyncio server every message crosses a completion-queue poller thread
and several event-loop hops; on the ext_proc path (about 11 messages per request in full
duplex) that machinery cost ~4x more CPU than the EPP's own work. Here a whole burst of
frames is parsed in one ``data_received`` call, fed synchronously to the stream state
machines (``ExtProcStream``), and every answer of the burst leaves in one ``write``.

Scope: exactly what gRPC over HTTP/2 needs from Envoy's (or any gRPC client's) side:
the client preface and SETTINGS, HEADERS/CONTINUATION (HPACK decoding via ``hpack``),
DATA with length-prefixed gRPC messages (no compression), flow control in both directions,
PING, RST_STREAM and GOAWAY. Methods: ``ExternalProcessor/Process`` and the
``grpc.health.v1.Health`` service (Check, List; Watch sends the current status and stays
open); anything else gets UNIMPLEMENTED. TLS (ALPN h2) with certificate files that are
re-read when they change (the listener is re-opened with the new certificate; open
connections keep theirs).
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
from hpack import Decoder
from hpack.exceptions import HPACKError

from epp.extproc.health import HealthService
from epp.extproc.messages import FULL_DUPLEX, parse_response_body, streamed_chunk_head, streamed_response_chunk
from epp.extproc.service import ExtProcService, serialize
from epp.extproc.stream import RESPONSE_BODY, ExtProcStream
from epp.extproc.tls import CertificateReloader, self_signed_certificate

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

MAX_WINDOW = 2**31 - 1
_HALF_WINDOW = MAX_WINDOW // 2
DEFAULT_WINDOW = 65535
OUR_MAX_FRAME = 1 << 20  # we accept 1 MiB frames: fewer frames for large bodies
MAX_STREAMS = 100_000
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR = 0x1, 0x3, 0x6, 0x9
CANCEL = 0x8

PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK = b"/grpc.health.v1.Health/Check"
HEALTH_LIST = b"/grpc.health.v1.Health/List"
HEALTH_WATCH = b"/grpc.health.v1.Health/Watch"

GRPC_OK, GRPC_INVALID_ARGUMENT, GRPC_RESOURCE_EXHAUSTED, GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 0, 3, 8, 12, 13

_HDR = struct.Struct(">BHBBI")  # 24-bit length as (high byte, low 16 bits), type, flags, stream id
_U32 = struct.Struct(">I")  # the gRPC message length


def _echo_head(n: int) -> bytes:
    """gRPC prefix + the ext_proc message bytes before the payload, for echoing an ``n``-byte
    response chunk (no end of stream)."""
    head, tail = streamed_chunk_head(n, False)
    return b"\x00" + (len(head) + n).to_bytes(4, "big") + head


# Echo headers by chunk length: token chunks are a few hundred distinct sizes.
_ECHO_HEADS: dict[int, bytes] = {}
_ECHO_HEADS_MAX = 8192
_ECHO_HEAD_MAX_LEN = 1 << 16


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# :status 200 is static entry 8; content-type is static name 31.
RESPONSE_HEADERS = b"\x88" + _hpack_int(31, 4) + _hpack_int(16, 7) + b"application/grpc"
TRAILERS_OK = _literal(b"grpc-status", b"0")


def _trailers(status: int, message: str = "") -> bytes:
    if status == GRPC_OK and not message:
        return TRAILERS_OK
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", quote(message, safe=" !#$&'()*+,/:;=?@[]~").encode())
    return block


class _CountingTable:
    """Counts insertions into an hpack HeaderTable (evictions only follow an insertion or a
    resize), so "the dynamic table did not change" is an exact test."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.inserts = 0
        add = table.add

        def counting_add(name: bytes, value: bytes) -> Any:
            self.inserts += 1
            return add(name, value)

        table.add = counting_add

    def state(self) -> tuple[int, int]:
        return (self.inserts, self.table.maxsize)


class _H2Error(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    """One HTTP/2 stream carrying one gRPC call."""

    __slots__ = ("conn", "sid", "buf", "send_window", "pending", "pending_trailers", "headers_sent",
                 "local_closed", "remote_closed", "recv_unacked", "echo")

    def __init__(self, conn: "_Connection", sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.buf = bytearray()
        self.send_window = conn.peer_initial_window
        self.pending = bytearray()  # DATA waiting for flow-control window
        self.pending_trailers: bytes | None = None
        self.headers_sent = False
        self.local_closed = False
        self.remote_closed = False
        self.recv_unacked = 0
        # True while every DATA frame is expected to be one response chunk to echo (full
        # duplex, response headers answered): the frame loop then calls ``echo_frame``.
        self.echo = False

    # --- input -----------------------------------------------------------------------------
    def on_data(self, data: bytes, end_stream: bool) -> None:
        if data and not self.local_closed:
            buf = self.buf
            if not buf and len(data) >= 5 and data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5:
                self.on_message(data[5:])  # the common case: one whole message per DATA frame
            else:
                buf += data
                while len(buf) >= 5 and not self.local_closed:
                    if buf[0] != 0:
                        self.finish(GRPC_UNIMPLEMENTED, "compressed messages are not supported")
                        break
                    n = int.from_bytes(buf[1:5], "big")
                    if n > self.conn.server.max_message:
                        buf.clear()
                        self.finish(GRPC_RESOURCE_EXHAUSTED, f"message of {n} bytes is larger than the "
                                                             f"maximum {self.conn.server.max_message}")
                        break
                    if len(buf) < 5 + n:
                        break
                    msg = bytes(buf[5:5 + n])
                    del buf[:5 + n]
                    self.on_message(msg)
        if end_stream:
            self.remote_closed = True
            self.on_half_close()
            self.conn.maybe_drop(self)

    def on_message(self, raw: bytes) -> None:
        raise NotImplementedError

    def on_half_close(self) -> None:
        if not self.local_closed:
            self.finish(GRPC_OK)

    def on_reset(self) -> None:
        """The peer reset the stream or the connection went away."""

    # --- output ----------------------------------------------------------------------------
    def send_message(self, payload: bytes) -> None:
        conn = self.conn
        if not self.headers_sent:
            self.headers_sent = True
            conn.out.append(frame(HEADERS, F_END_HEADERS, self.sid, RESPONSE_HEADERS))
        conn.send_data(self, b"\x00" + len(payload).to_bytes(4, "big") + payload)

    def finish(self, status: int = GRPC_OK, message: str = "") -> None:
        """End our side: trailers (or trailers-only) with END_STREAM."""
        if self.local_closed:
            return
        self.local_closed = True
        self.echo = False
        block = _trailers(status, message)
        if not self.headers_sent:
            self.headers_sent = True
            block = RESPONSE_HEADERS + block  # trailers-only response
        if self.pending:
            self.pending_trailers = block
        else:
            self.conn.out.append(frame(HEADERS, F_END_HEADERS | F_END_STREAM, self.sid, block))
        self.on_local_close()
        self.conn.maybe_drop(self)

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

    def echo_frame(self, payload: bytes) -> bool:
        """The per-token hot path: one DATA frame (no flags) holding one whole gRPC message
        with one response chunk, in full duplex. Decodes it by hand, lets the state machine
        see the chunk and queues the echo as one DATA frame from a cached header. Returns
        False, having done nothing, for anything else (the general path then takes it):
        compressed or partial messages, other message kinds, the end of the response."""
        n = len(payload)
        # struct (warm: the frame loop just used it) rather than int.from_bytes on a slice: on
        # the per-token path every C function touched costs microseconds when caches are cold.
        if n <= 5 or payload[0] or _U32.unpack_from(payload, 1)[0] != n - 5 or self.buf:
            return False
        parsed = parse_response_body(payload, 5)
        if parsed is None or parsed[1]:
            return False
        conn = self.conn
        # Flow control: we advertised huge windows; give credit back once half is used.
        conn.recv_conn_unacked += n
        if conn.recv_conn_unacked > _HALF_WINDOW:
            conn.out.append(frame(WINDOW_UPDATE, 0, 0, conn.recv_conn_unacked.to_bytes(4, "big")))
            conn.recv_conn_unacked = 0
        self.recv_unacked += n
        if self.recv_unacked > _HALF_WINDOW:
            conn.out.append(frame(WINDOW_UPDATE, 0, self.sid, self.recv_unacked.to_bytes(4, "big")))
            self.recv_unacked = 0
        out = self.machine.duplex_chunk(parsed[0])
        if out.__class__ is not bytes:  # the chunk failed the stream: send its answers, end
            self.echo = False
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
            self.finish(GRPC_INVALID_ARGUMENT, f"cannot decode ProcessingRequest: {e}")
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
        self.echo = (machine.state == RESPONSE_BODY and machine.resp_mode == FULL_DUPLEX
                     and self.headers_sent and not self.local_closed)

    def _resume(self) -> None:
        """Routing that waited can go on (called from the event loop, not from a frame)."""
        if self.local_closed or self.finalised:
            return
        machine = self.machine
        self._send(machine.resume())
        if machine.parked is not None:
            machine.parked.wake_me(self._resume)
        elif self.remote_closed:
            self.finish(GRPC_OK)  # the half-close that came while routing waited
        self.conn.flush()

    def on_half_close(self) -> None:
        # A client may half-close right after the request body; a request whose routing
        # waits is answered first.
        if self.machine.parked is None:
            super().on_half_close()

    def _deadline(self) -> None:
        self.timer = None
        if self.local_closed:
            return
        for resp in self.machine.on_deadline():
            self.send_message(serialize(resp))
        if self.machine.closed:
            self.finish(GRPC_OK)
        self.conn.flush()

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


class _Connection(asyncio.Protocol):
    def __init__(self, server: "FastExtProcServer") -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface_seen = False
        self.decoder = Decoder()
        self.hpack_cache: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.hpack_state: tuple = ()
        self.hpack_table = _CountingTable(self.decoder.header_table)
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.send_conn_window = DEFAULT_WINDOW
        self.recv_conn_unacked = 0
        self.header_sid = 0
        self.header_flags = 0
        self.header_block: bytearray | None = None
        self.out: list[bytes] = []
        self.closing = False
        self.blocked: dict[int, _Stream] = {}  # streams with DATA waiting for window

    # --- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        settings = struct.pack(">HIHIHI", 0x3, MAX_STREAMS, 0x4, MAX_WINDOW, 0x5, OUR_MAX_FRAME)
        self.out.append(frame(SETTINGS, 0, 0, settings))
        self.out.append(frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")))
        self.flush()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        # Frames are parsed straight from ``data`` unless a partial frame (or the preface) is
        # pending: a streamed token is one small DATA frame per read, not worth two copies.
        src: bytes | bytearray
        if buf or not self.preface_seen:
            buf += data
            src = buf
        else:
            src = data
        try:
            pos = 0
            if not self.preface_seen:
                if len(buf) < len(PREFACE):
                    return
                if buf[:len(PREFACE)] != PREFACE:
                    raise _H2Error(PROTOCOL_ERROR, "not an HTTP/2 client (bad preface)")
                self.preface_seen = True
                pos = len(PREFACE)
            end = len(src)
            unpack = _HDR.unpack_from
            streams = self.streams
            copy = src is buf  # slices of the bytearray must not alias it
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(src, pos)
                length = hi << 16 | lo
                if length > OUR_MAX_FRAME:
                    raise _H2Error(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds our maximum")
                if end - pos - 9 < length:
                    break
                payload = bytes(src[pos + 9:pos + 9 + length]) if copy else src[pos + 9:pos + 9 + length]
                pos += 9 + length
                if ftype == DATA and self.header_block is None:
                    sid &= 0x7FFFFFFF
                    if not flags:
                        st = streams.get(sid)
                        if st is not None and st.echo and st.echo_frame(payload):  # type: ignore[attr-defined]
                            continue
                    self._data(flags, sid, payload)
                else:
                    self._frame(ftype, flags, sid & 0x7FFFFFFF, payload)
            if copy:
                if pos:
                    del buf[:pos]
            elif pos < end:
                buf += src[pos:]  # the start of a frame that continues in the next read
        except _H2Error as e:
            log.warning("HTTP/2 connection error from %s: %s", self._peer(), e)
            self._goaway(e.code, str(e))
        except Exception:
            log.exception("ext_proc connection failed")
            self._goaway(PROTOCOL_ERROR, "internal error")
        finally:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for st in streams:
            st.on_reset()

    # --- frames ------------------------------------------------------------------------------
    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.header_block is not None and ftype != CONTINUATION:
            raise _H2Error(PROTOCOL_ERROR, "expected CONTINUATION")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            if flags & F_PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if flags & F_PRIORITY:
                payload = payload[5:]
            if flags & F_END_HEADERS:
                self._headers(sid, flags, payload)
            else:
                self.header_sid, self.header_flags, self.header_block = sid, flags, bytearray(payload)
        elif ftype == CONTINUATION:
            if self.header_block is None or sid != self.header_sid:
                raise _H2Error(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self.header_block += payload
            if flags & F_END_HEADERS:
                block, self.header_block = bytes(self.header_block), None
                self._headers(sid, self.header_flags, block)
        elif ftype == RST_STREAM:
            st = self.streams.pop(sid, None)
            if st is not None:
                self.blocked.pop(sid, None)
                st.on_reset()
        elif ftype == SETTINGS:
            if not flags & F_ACK:
                self._settings(payload)
                self.out.append(frame(SETTINGS, F_ACK, 0))
        elif ftype == PING:
            if not flags & F_ACK:
                self.out.append(frame(PING, F_ACK, 0, payload))
        elif ftype == WINDOW_UPDATE:
            inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if sid == 0:
                self.send_conn_window += inc
                if self.blocked:
                    for st in list(self.blocked.values()):
                        self._drain(st)
            else:
                st = self.streams.get(sid)
                if st is not None:
                    st.send_window += inc
                    if st.pending:
                        self._drain(st)
        elif ftype == GOAWAY:
            self.closing = True
        # PRIORITY, PUSH_PROMISE (never sent by clients) and unknown types are ignored.

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        n = len(payload)
        if flags & F_PADDED:
            payload = payload[1:n - payload[0]]
        # Flow control: we advertised huge windows; give credit back once half is used.
        self.recv_conn_unacked += n
        if self.recv_conn_unacked > _HALF_WINDOW:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, self.recv_conn_unacked.to_bytes(4, "big")))
            self.recv_conn_unacked = 0
        st = self.streams.get(sid)
        if st is None:
            return  # a stream we already closed or reset: the data is dropped
        st.recv_unacked += n
        if st.recv_unacked > _HALF_WINDOW:
            self.out.append(frame(WINDOW_UPDATE, 0, sid, st.recv_unacked.to_bytes(4, "big")))
            st.recv_unacked = 0
        st.on_data(payload, bool(flags & F_END_STREAM))

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """HPACK-decode, remembering blocks that left the dynamic table untouched.

        Envoy sends the same bytes for every ext_proc stream's headers once its dynamic
        table holds them (indexed fields plus a Huffman-coded literal :path that is never
        indexed); decoding that in Python costs more than the rest of a request. A cached
        result is valid while the table does not change (insertions are counted).
        """
        state = self.hpack_table.state()
        if state != self.hpack_state:
            self.hpack_cache.clear()
            self.hpack_state = state
        cached = self.hpack_cache.get(block)
        if cached is not None:
            return cached
        try:
            headers = self.decoder.decode(block, raw=True)
        except HPACKError as e:
            raise _H2Error(COMPRESSION_ERROR, f"bad header block: {e}") from None
        if self.hpack_table.state() == state and len(self.hpack_cache) < 64:
            self.hpack_cache[block] = headers
        return headers

    def _headers(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)
        end_stream = bool(flags & F_END_STREAM)
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client
            st.on_data(b"", end_stream)
            return
        if sid % 2 == 0 or sid <= self.last_sid:
            return  # not a new client stream (or one we already forgot): ignore
        self.last_sid = sid
        path = b""
        for name, value in headers:
            if name == b":path":
                path = value
                break
        server = self.server
        if path == PROCESS_PATH:
            st = _ProcessStream(self, sid, server.service)
        elif path in (HEALTH_CHECK, HEALTH_LIST, HEALTH_WATCH):
            st = _HealthStream(self, sid, server.health, path)
        else:
            st = _Stream(self, sid)
            self.streams[sid] = st
            st.finish(GRPC_UNIMPLEMENTED, f"unknown method {path.decode('latin-1')}")
            return
        self.streams[sid] = st
        if end_stream:
            st.on_data(b"", True)

    def _settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from(">HI", payload, i)
            if ident == 0x4:
                if value > MAX_WINDOW:
                    raise _H2Error(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
                    if delta > 0 and st.pending:
                        self._drain(st)
            elif ident == 0x5:
                self.peer_max_frame = value

    # --- output ------------------------------------------------------------------------------
    def send_data(self, st: _Stream, data: bytes) -> None:
        n = len(data)
        if not st.pending and n <= st.send_window and n <= self.send_conn_window and n <= self.peer_max_frame:
            st.send_window -= n
            self.send_conn_window -= n
            self.out.append(frame(DATA, 0, st.sid, data))
            return
        st.pending += data
        self._drain(st)

    def _drain(self, st: _Stream) -> None:
        pending = st.pending
        while pending:
            n = min(len(pending), st.send_window, self.send_conn_window, self.peer_max_frame)
            if n <= 0:
                self.blocked[st.sid] = st
                return
            self.out.append(frame(DATA, 0, st.sid, bytes(pending[:n])))
            del pending[:n]
            st.send_window -= n
            self.send_conn_window -= n
        self.blocked.pop(st.sid, None)
        if st.pending_trailers is not None:
            block, st.pending_trailers = st.pending_trailers, None
            self.out.append(frame(HEADERS, F_END_HEADERS | F_END_STREAM, st.sid, block))
            self.maybe_drop(st)

    def maybe_drop(self, st: _Stream) -> None:
        """Forget a stream once both sides are done and nothing is left to send."""
        if st.local_closed and st.remote_closed and not st.pending and st.pending_trailers is None:
            self.streams.pop(st.sid, None)

    def flush(self) -> None:
        out = self.out
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _goaway(self, code: int, message: str) -> None:
        self.out.append(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_sid, code) + message.encode()[:200]))
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Graceful: no new streams (GOAWAY NO_ERROR); the connection closes when idle or at stop."""
        self.closing = True
        self.out.append(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_sid, 0)))
        self.flush()

    def _peer(self) -> Any:
        return self.transport.get_extra_info("peername") if self.transport is not None else None


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
                 cert_path: str | None = None, max_message: int = 17 << 20) -> None:
        self.service = service
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

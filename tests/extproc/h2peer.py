"""An independent HTTP/2 peer for the conformance tests, and a fast-core server to point it at.

The peer speaks raw frames over a real TCP socket. Valid frames are built and every frame the
server sends is parsed with ``hyperframe`` (python-hyper's framing layer), headers are coded
with ``hpack``; deliberately invalid frames (which hyperframe refuses to build) are packed by
hand here with ``struct``. Nothing comes from the server's own HTTP/2 code.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Any, Callable

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from epp.extproc.fastserver import FastExtProcServer
from epp.extproc.h2.limits import Limits
from epp.extproc.health import HealthService
from epp.extproc.service import ExtProcService
from epp.extproc.stream import StreamSettings

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"

# RFC 9113 §7 error codes, spelled out here rather than imported from the server.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT = 0x0, 0x1, 0x2, 0x3, 0x4
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB
# RFC 9113 §6 frame types and the flags the tests set, likewise.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, END_HEADERS, PADDED, PRIO = 0x1, 0x4, 0x8, 0x20


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def raw(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """Any frame, valid or not."""
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


class ServerThread:
    """FastExtProcServer with the given limits on 127.0.0.1, on its own event loop thread."""

    def __init__(self, director: Any, limits: Limits | None = None, max_message: int = 17 << 20) -> None:
        self.director = director
        self.service = ExtProcService(director, StreamSettings())
        self.limits = limits or Limits()
        self.max_message = max_message
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self.call(self._start)
        return self

    async def _start(self) -> None:
        self.server = FastExtProcServer(self.service, HealthService(lambda: True), limits=self.limits,
                                        max_message=self.max_message)
        self.port = await self.server.bind("127.0.0.1", 0)
        await self.server.start()

    def __exit__(self, *exc: Any) -> None:
        self.call(lambda: self.server.stop(0.2))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (sync or async) on the server's loop and return its result: the way to
        read server state without racing it."""
        async def run() -> Any:
            out = fn()
            return await out if asyncio.iscoroutine(out) else out
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def connections(self) -> list[Any]:
        return self.call(lambda: list(self.server.connections))

    def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.call(pred):
                return True
            time.sleep(0.01)
        return False


class ConnectionClosed(AssertionError):
    pass


class Peer:
    """One client connection speaking frames."""

    def __init__(self, port: int, timeout: float = 5.0, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.server_settings: dict[int, int] = {}
        self.closed = False
        self.frames: list[Frame] = []  # every frame received, in order
        self.conn_credit = 65535  # what we may still send on the connection (its window)

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()

    # --- sending ------------------------------------------------------------------------------
    def send(self, *frames: Frame | bytes) -> None:
        data = b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
        pos = len(PREFACE) if data.startswith(PREFACE) else 0
        while pos + 9 <= len(data):  # DATA we send uses connection credit
            hi, lo, ftype = struct.unpack_from(">BHB", data, pos)
            if ftype == 0:
                self.conn_credit -= hi << 16 | lo
            pos += 9 + (hi << 16 | lo)
        self.sock.sendall(data)

    def flood(self, data: bytes) -> int:
        """Send ``data`` from a second thread while this one reads frames until the server
        closes the connection; returns how many bytes the server let us send."""
        sent = [0]

        def push() -> None:
            view = memoryview(data)
            try:
                while sent[0] < len(view):
                    sent[0] += self.sock.send(view[sent[0]:sent[0] + (1 << 16)])
            except OSError:
                pass

        t = threading.Thread(target=push, daemon=True)
        t.start()
        try:
            self.expect_closed()
        finally:
            t.join(10)
        return sent[0]

    def handshake(self, settings: dict[int, int] | None = None) -> "Peer":
        """Preface + SETTINGS, then wait for the server's SETTINGS and ACK them, and for the ACK of ours."""
        s = SettingsFrame(0)
        for k, v in (settings or {}).items():
            s.settings[k] = v
        self.send(PREFACE, s)
        got_settings = got_ack = False
        while not (got_settings and got_ack):
            f = self.next()
            if isinstance(f, SettingsFrame):
                if "ACK" in f.flags:
                    got_ack = True
                else:
                    self.server_settings.update(f.settings)
                    self.send(SettingsFrame(0, flags=["ACK"]))
                    got_settings = True
        return self

    def headers(self, sid: int, path: str = HEALTH_CHECK, *, end_stream: bool = False,
                extra: list[tuple[str, str]] | None = None, fields: list[tuple[str, str]] | None = None) -> bytes:
        """A request HEADERS frame (gRPC call headers unless ``fields`` replaces them)."""
        hdrs = fields if fields is not None else [(":method", "POST"), (":scheme", "http"), (":path", path),
                                                  (":authority", "epp"), ("content-type", "application/grpc"),
                                                  ("te", "trailers"), *(extra or [])]
        f = HeadersFrame(sid, self.encoder.encode(hdrs), flags=["END_HEADERS"] + (["END_STREAM"] if end_stream else []))
        return f.serialize()

    def data(self, sid: int, payload: bytes, *, end_stream: bool = False, pad: int = 0) -> bytes:
        f = DataFrame(sid, payload, flags=(["END_STREAM"] if end_stream else []) + (["PADDED"] if pad else []))
        if pad:
            f.pad_length = pad
        return f.serialize()

    def send_flowing(self, sid: int, payload: bytes, chunk: int = 1 << 18) -> None:
        """DATA within the connection window, waiting for the server's credit as it goes
        (stream windows are the caller's business)."""
        pos = 0
        while pos < len(payload):
            while self.conn_credit <= 0:
                self.next()
            n = min(chunk, self.conn_credit, len(payload) - pos)
            self.send(raw(0, 0, sid, payload[pos:pos + n]))
            pos += n

    def ping(self, opaque: bytes = b"12345678") -> bytes:
        return PingFrame(0, opaque).serialize()

    # --- receiving ----------------------------------------------------------------------------
    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no frame from the server in time")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            raise ConnectionClosed("the server closed the connection")
        self.buf += chunk

    def next(self, timeout: float | None = None) -> Frame:
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.buf) < 9:
            self._fill(deadline)
        f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
        while len(self.buf) < 9 + length:
            self._fill(deadline)
        f.parse_body(memoryview(self.buf[9:9 + length]))
        self.buf = self.buf[9 + length:]
        self.frames.append(f)
        if isinstance(f, WindowUpdateFrame) and f.stream_id == 0:
            self.conn_credit += f.window_increment
        return f

    def until(self, pred: Callable[[Frame], bool], timeout: float | None = None) -> Frame:
        while True:
            f = self.next(timeout)
            if pred(f):
                return f

    def expect_goaway(self, code: int) -> GoAwayFrame:
        """A connection error: GOAWAY with ``code``, then the server closes the connection."""
        f = self.until(lambda f: isinstance(f, GoAwayFrame))
        assert f.error_code == code, f"GOAWAY {f.error_code:#x} ({f.additional_data!r}), expected {code:#x}"
        self.expect_closed()
        return f  # type: ignore[return-value]

    def expect_closed(self) -> None:
        try:
            while True:
                self.next()
        except ConnectionClosed:
            return

    def expect_rst(self, sid: int, code: int) -> None:
        """A stream error: RST_STREAM on ``sid`` with ``code``; the connection stays usable."""
        f = self.until(lambda f: isinstance(f, (RstStreamFrame, GoAwayFrame)) and (
            isinstance(f, GoAwayFrame) or f.stream_id == sid))
        assert isinstance(f, RstStreamFrame), f"GOAWAY {f.error_code:#x} ({f.additional_data!r}) instead of RST_STREAM"
        assert f.error_code == code, f"RST_STREAM {f.error_code:#x}, expected {code:#x}"
        self.expect_alive()

    def expect_alive(self, opaque: bytes = b"alive?!!") -> list[Frame]:
        """A PING is answered: the connection is still up. Returns the frames before the ACK."""
        start = len(self.frames)
        self.send(self.ping(opaque))
        self.until(lambda f: isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == opaque)
        before = self.frames[start:-1]
        assert not any(isinstance(f, GoAwayFrame) for f in before), before
        return before

    def response(self, sid: int) -> tuple[dict[str, str], bytes, dict[str, str]]:
        """Collect a whole gRPC response on ``sid``: (headers, DATA bytes, trailers). Credits
        the window for what it reads."""
        blocks: list[dict[str, str]] = []
        block = b""
        body = b""
        while True:
            f = self.until(lambda f: getattr(f, "stream_id", None) == sid or isinstance(f, GoAwayFrame))
            if isinstance(f, GoAwayFrame):
                raise AssertionError(f"GOAWAY {f.error_code:#x} while reading stream {sid}")
            if isinstance(f, RstStreamFrame):
                raise AssertionError(f"RST_STREAM {f.error_code:#x} on stream {sid}")
            if isinstance(f, (HeadersFrame, ContinuationFrame)):
                block += f.data
                if "END_HEADERS" in f.flags:
                    blocks.append({k.decode(): v.decode() for k, v in self.decoder.decode(block, raw=True)})
                    block = b""
            elif isinstance(f, DataFrame):
                body += f.data
                if f.flow_controlled_length:
                    self.send(WindowUpdateFrame(0, f.flow_controlled_length),
                              WindowUpdateFrame(sid, f.flow_controlled_length))
            if "END_STREAM" in f.flags and (not isinstance(f, HeadersFrame) or "END_HEADERS" in f.flags):
                break
            if isinstance(f, ContinuationFrame) and "END_HEADERS" in f.flags and self._ended(sid):
                break
        return blocks[0], body, blocks[-1] if len(blocks) > 1 else blocks[0]

    def _ended(self, sid: int) -> bool:
        for f in reversed(self.frames):
            if isinstance(f, HeadersFrame) and f.stream_id == sid:
                return "END_STREAM" in f.flags
        return False

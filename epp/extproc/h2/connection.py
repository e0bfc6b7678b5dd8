"""One server-side HTTP/2 connection on an asyncio Protocol (RFC 9113).

The frame loop parses every frame of a read in one ``data_received`` call and dispatches it
after checking it against the connection and stream state; replies (ACKs, WINDOW_UPDATEs,
the application's answers) collect in ``out`` and leave in one ``write`` at the end.

Errors follow §5.4: a connection error sends GOAWAY with the RFC's code and closes; a stream
error sends RST_STREAM and forgets the stream; an unexpected exception while a stream handles
a frame costs that stream (``H2Stream.fail``), never the connection.

Limits (``Limits``): concurrent streams (REFUSED_STREAM beyond), header block size and
CONTINUATION count, premature resets per second (GOAWAY ENHANCE_YOUR_CALM), write
backpressure (reading pauses while the socket's buffer is above the high-water mark), an
idle timeout, a SETTINGS-ack timeout and a connection count per server.

Subclasses implement ``open_stream`` (the application: here, the gRPC layer).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from epp.extproc.h2.errors import H2ConnectionError, H2StreamError
from epp.extproc.h2.flow import FlowControl
from epp.extproc.h2.frames import (
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    ENHANCE_YOUR_CALM,
    F_ACK,
    F_END_HEADERS,
    F_END_STREAM,
    F_PADDED,
    F_PRIORITY,
    FLOW_CONTROL_ERROR,
    FRAME_NAMES,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADER,
    HEADER_TABLE_SIZE,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    INTERNAL_ERROR,
    MAX_FRAME_SIZE,
    NO_ERROR,
    PING,
    PREFACE,
    PRIORITY,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_TIMEOUT,
    STREAM_CLOSED,
    STREAM_ID_MASK,
    WINDOW_UPDATE,
    frame,
    goaway,
    rst_stream,
    strip_padding,
    u32,
    window_update,
)
from epp.extproc.h2.headers import Block, HeaderDecoder, hpack_int
from epp.extproc.h2.limits import Limits, TokenBucket
from epp.extproc.h2.settings import local_settings, parse_settings
from epp.extproc.h2.stream import H2Stream

log = logging.getLogger(__name__)

# How a stream we no longer keep was closed: decides what a late frame on it gets (§5.1).
ENDED, RESET_BY_PEER, RESET_BY_US = 1, 2, 3
_RECENT = 128  # closed streams remembered per generation (two generations are kept)
_STREAMS_BEFORE_ACK = 1000
_DRAIN_NOTICE = 1.0  # seconds between the two GOAWAYs of a graceful close (§6.8)
DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE until the peer says otherwise


class H2Connection(FlowControl, asyncio.Protocol):
    # Slots: a dict-backed instance with this many attributes loses CPython's fast
    # attribute access, and the frame loop reads several per frame.
    __slots__ = ("blocked", "buf", "buffer_budget", "closed_older", "closed_recent", "connection_low",
                 "connection_window", "connections", "dead", "draining", "goaway_sent", "grant_waiters",
                 "granted_total", "header_block", "header_flags", "header_frames", "header_sid", "headers",
                 "idle_empty", "idle_sid", "idle_ticks", "last_sid", "limits", "loop", "max_frame", "out",
                 "peer_goaway", "peer_initial_window", "peer_max_frame", "pending_bytes", "preface_seen",
                 "recv_window", "refused_after_goaway", "resets", "send_conn_window", "stream_limit",
                 "stream_low", "stream_window", "streams", "table_size", "table_update", "timers", "transport",
                 "write_paused")

    def __init__(self, limits: Limits, connections: set) -> None:
        self.limits = limits
        self.connections = connections  # every open connection of the server (the limit counts them)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface_seen = False
        self.dead = False  # a connection error was sent: ignore everything else
        self.headers = HeaderDecoder(limits.max_header_list_size)
        self.streams: dict[int, H2Stream] = {}
        self.last_sid = 0  # highest stream id the peer opened
        self.closed_recent: dict[int, int] = {}  # sid -> ENDED | RESET_BY_PEER | RESET_BY_US
        self.closed_older: dict[int, int] = {}
        # header block being collected (HEADERS without END_HEADERS, then CONTINUATION)
        self.header_sid = 0
        self.header_flags = 0
        self.header_block: bytearray | None = None
        self.header_frames = 0
        self.out: list[bytes] = []
        # outbound flow control
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.send_conn_window = DEFAULT_WINDOW
        # Our HPACK encoder never inserts into its dynamic table, but when the peer lowers
        # SETTINGS_HEADER_TABLE_SIZE below the size its decoder assumes, the next block we
        # send must start with a table size update (RFC 7541 §4.2): ``table_update``.
        self.table_size = DEFAULT_TABLE_SIZE
        self.table_update = b""
        self.blocked: dict[int, H2Stream] = {}  # streams with DATA waiting for window
        self.pending_bytes = 0  # all of it
        # inbound flow control
        self.max_frame = limits.max_frame_size
        self.stream_window = limits.stream_window
        self.stream_low = limits.stream_window // 2
        self.connection_window = limits.connection_window
        self.connection_low = limits.connection_window // 2
        self.recv_window = DEFAULT_WINDOW  # until our WINDOW_UPDATE in connection_made
        self.buffer_budget = limits.buffer_budget
        self.granted_total = 0
        self.grant_waiters: dict[int, tuple[H2Stream, int]] = {}
        # Streams the peer may have open. Until it acknowledges our SETTINGS it may not know our
        # limit (RFC 9113 §5.1.2: it starts unlimited), and Envoy puts every request waiting for
        # a connection on a new one at once: that first burst is accepted up to 1000.
        self.stream_limit = max(limits.max_concurrent_streams, _STREAMS_BEFORE_ACK)
        # lifecycle
        self.goaway_sent = False  # no new streams: they get REFUSED_STREAM
        self.refused_after_goaway = 0
        self.draining = False
        self.peer_goaway = False
        self.write_paused = False
        self.resets = TokenBucket(limits.premature_reset_burst, limits.premature_resets_per_second, self.loop.time())
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.idle_empty = True  # no streams at the last idle tick
        self.idle_sid = 0  # last_sid at the last idle tick
        self.idle_ticks = 0

    # --- the application's part --------------------------------------------------------------
    def open_stream(self, sid: int, block: Block) -> H2Stream:
        """A new request stream (headers checked); return its stream object."""
        raise NotImplementedError

    # --- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        limits = self.limits
        self.out.append(local_settings(limits))
        if len(self.connections) >= limits.max_connections:
            log.warning("HTTP/2 connection from %s refused: %d connections open", self._peer(), len(self.connections))
            self._connection_error(H2ConnectionError(ENHANCE_YOUR_CALM, "too many connections"), quiet=True)
            return
        self.connections.add(self)
        transport.set_write_buffer_limits(limits.write_high_water, limits.write_low_water)  # type: ignore[attr-defined]
        self.out.append(window_update(0, limits.connection_window - DEFAULT_WINDOW))
        self.recv_window = limits.connection_window
        self._timer("settings", limits.settings_timeout, self._settings_timeout)
        if limits.idle_timeout > 0:
            self._timer("idle", limits.idle_timeout / 2, self._idle_tick)
        self.flush()

    def pause_writing(self) -> None:
        """The socket's buffer is above the high-water mark: stop reading until it drains."""
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

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
                    if not PREFACE.startswith(bytes(buf)):
                        raise H2ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client (bad preface)")
                    return
                if buf[:len(PREFACE)] != PREFACE:
                    raise H2ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client (bad preface)")
                self.preface_seen = True
                pos = len(PREFACE)
            end = len(src)
            unpack = HEADER.unpack_from
            streams = self.streams
            max_frame = self.max_frame
            copy = src is buf  # slices of the bytearray must not alias it
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(src, pos)
                length = hi << 16 | lo
                if length > max_frame:
                    raise H2ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds our maximum")
                if end - pos - 9 < length:
                    break
                payload = bytes(src[pos + 9:pos + 9 + length]) if copy else src[pos + 9:pos + 9 + length]
                pos += 9 + length
                sid &= STREAM_ID_MASK
                try:
                    if ftype == DATA and self.header_block is None:
                        if not flags:
                            st = streams.get(sid)
                            if st is not None and st.fast and st.fast_data(payload):
                                continue
                        self._data(flags, sid, payload)
                    else:
                        self._frame(ftype, flags, sid, payload)
                except H2StreamError as e:
                    log.info("HTTP/2 stream %d from %s reset: %s", e.sid, self._peer(), e)
                    self.reset_stream(e.sid, e.code)
                except H2ConnectionError:
                    raise
                except Exception as e:  # a bug while handling one stream costs that stream
                    self._stream_crashed(sid, e)
                if self.dead:
                    return
            if copy:
                if pos:
                    del buf[:pos]
            elif pos < end:
                buf += src[pos:]  # the start of a frame that continues in the next read
        except H2ConnectionError as e:
            self._connection_error(e)
        except Exception as e:
            log.exception("HTTP/2 connection from %s failed", self._peer())
            self._connection_error(H2ConnectionError(INTERNAL_ERROR, f"internal error: {type(e).__name__}"))
        finally:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        self.connections.discard(self)
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        self.grant_waiters.clear()
        for st in streams:
            st.local_closed = st.remote_closed = True
            st.on_reset()

    # --- frames ------------------------------------------------------------------------------
    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.header_block is not None and ftype != CONTINUATION:
            raise H2ConnectionError(PROTOCOL_ERROR, f"{_name(ftype)} inside a header block (expected CONTINUATION)")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers_frame(flags, sid, payload)
        elif ftype == CONTINUATION:
            self._continuation(flags, sid, payload)
        elif ftype == RST_STREAM:
            self._rst_stream(sid, payload)
        elif ftype == SETTINGS:
            self._settings(flags, sid, payload)
        elif ftype == PING:
            if sid:
                raise H2ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise H2ConnectionError(FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes")
            if not flags & F_ACK:
                self.out.append(frame(PING, F_ACK, 0, payload))
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == GOAWAY:
            if sid:
                raise H2ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise H2ConnectionError(FRAME_SIZE_ERROR, f"GOAWAY of {len(payload)} bytes")
            self.peer_goaway = True  # the client opens no more streams; open ones finish
        elif ftype == PRIORITY:
            self._priority(sid, payload)
        elif ftype == PUSH_PROMISE:
            raise H2ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # Unknown frame types are ignored (§4.1, §5.5).

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)  # flow control counts the whole payload, padding included
        window = self.recv_window - n
        if window < 0:
            raise H2ConnectionError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window = window
        if window < self.connection_low:
            self.replenish_connection()
        if flags & F_PADDED:
            payload = strip_padding(payload, DATA)
        st = self.streams.get(sid)
        if st is None:
            self.frame_without_stream(DATA, sid)
            return
        if st.remote_closed:
            raise H2StreamError(sid, STREAM_CLOSED, "DATA after END_STREAM")
        window = st.recv_window - n
        if window < 0:
            raise H2StreamError(sid, FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        st.recv_window = window
        end_stream = bool(flags & F_END_STREAM)
        if st.content_length is not None:
            left = st.content_length - len(payload)
            if left < 0 or (end_stream and left):
                raise H2StreamError(sid, PROTOCOL_ERROR, "DATA does not match content-length")
            st.content_length = left
        if end_stream:
            st.remote_closed = True
            st.fast = False
        st.on_data(payload, end_stream)
        if end_stream:
            self.maybe_drop(st)
        elif st.recv_window < self.stream_low:
            self.replenish(st)

    def _headers_frame(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & F_PADDED:
            payload = strip_padding(payload, HEADERS)
        if flags & F_PRIORITY:
            if len(payload) < 5:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            if u32(payload) & STREAM_ID_MASK == sid:
                flags |= _SELF_DEPENDENT
            payload = payload[5:]
        if flags & F_END_HEADERS:
            self._header_block(sid, flags, payload)
            return
        if len(payload) > self.limits.max_header_list_size:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, "header block larger than our SETTINGS_MAX_HEADER_LIST_SIZE")
        self.header_sid, self.header_flags, self.header_block, self.header_frames = sid, flags, bytearray(payload), 0

    def _continuation(self, flags: int, sid: int, payload: bytes) -> None:
        block = self.header_block
        if block is None or sid != self.header_sid:
            raise H2ConnectionError(PROTOCOL_ERROR, "CONTINUATION without a header block in progress on its stream")
        self.header_frames += 1
        if self.header_frames > self.limits.max_continuations:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, f"more than {self.limits.max_continuations} CONTINUATION frames")
        if len(block) + len(payload) > self.limits.max_header_list_size:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, "header block larger than our SETTINGS_MAX_HEADER_LIST_SIZE")
        block += payload
        if flags & F_END_HEADERS:
            self.header_block = None
            self._header_block(sid, self.header_flags, bytes(block))

    def _header_block(self, sid: int, flags: int, raw: bytes) -> None:
        if len(raw) > self.limits.max_header_list_size:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, "header block larger than our SETTINGS_MAX_HEADER_LIST_SIZE")
        # Decoded first, whatever happens to the stream: HPACK state is per connection.
        block = self.headers.decode(raw)
        end_stream = bool(flags & F_END_STREAM)
        st = self.streams.get(sid)
        if st is not None:  # trailers
            if st.remote_closed:
                raise H2StreamError(sid, STREAM_CLOSED, "HEADERS after END_STREAM")
            if not end_stream:
                raise H2StreamError(sid, PROTOCOL_ERROR, "second HEADERS without END_STREAM")
            if block.trailers_error:
                raise H2StreamError(sid, PROTOCOL_ERROR, f"malformed trailers: {block.trailers_error}")
            if st.content_length:
                raise H2StreamError(sid, PROTOCOL_ERROR, "DATA shorter than content-length")
            st.remote_closed = True
            st.fast = False
            st.on_trailers(block.headers)
            self.maybe_drop(st)
            return
        if sid % 2 == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, f"HEADERS opening even-numbered stream {sid}")
        if sid <= self.last_sid:
            self.frame_without_stream(HEADERS, sid)
            return
        self.last_sid = sid
        if flags & _SELF_DEPENDENT:
            raise H2StreamError(sid, PROTOCOL_ERROR, "stream depends on itself")
        if self.goaway_sent:
            self.refused_after_goaway += 1
            if self.refused_after_goaway > self.limits.max_streams_after_goaway:
                raise H2ConnectionError(ENHANCE_YOUR_CALM, "streams keep coming after GOAWAY")
            raise H2StreamError(sid, REFUSED_STREAM, "connection is going away")
        if len(self.streams) >= self.stream_limit:
            raise H2StreamError(sid, REFUSED_STREAM, "SETTINGS_MAX_CONCURRENT_STREAMS reached")
        if self.pending_bytes > self.limits.max_blocked_bytes:
            raise H2StreamError(sid, REFUSED_STREAM, "the peer is not reading what we send")
        if block.request_error:
            raise H2StreamError(sid, PROTOCOL_ERROR, f"malformed request: {block.request_error}")
        try:
            st = self.open_stream(sid, block)
        except Exception as e:  # a bug of the application's costs this stream; HPACK state is intact
            log.error("HTTP/2 stream %d: opening it failed", sid, exc_info=e)
            raise H2StreamError(sid, INTERNAL_ERROR, f"internal error: {type(e).__name__}") from e
        st.content_length = block.content_length
        self.streams[sid] = st
        if end_stream:
            if st.content_length:
                raise H2StreamError(sid, PROTOCOL_ERROR, "END_STREAM before content-length bytes")
            st.remote_closed = True
            st.on_data(b"", True)
            self.maybe_drop(st)

    def _rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise H2ConnectionError(FRAME_SIZE_ERROR, f"RST_STREAM of {len(payload)} bytes")
        st = self.streams.pop(sid, None)
        if st is None:
            self.frame_without_stream(RST_STREAM, sid)
            return
        self._remember(sid, RESET_BY_PEER)
        self.blocked.pop(sid, None)
        self.release(st)
        if st.pending:
            self.pending_bytes -= len(st.pending)
            st.pending.clear()
        st.local_closed = st.remote_closed = True
        st.fast = False
        st.on_reset()
        if not st.headers_sent and not self.resets.take(self.loop.time()):
            self._calm(f"more than {self.limits.premature_reset_burst} streams reset before an answer "
                       f"(then {self.limits.premature_resets_per_second:g}/s)")
        elif self.goaway_sent and not self.streams:
            self._close()

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & F_ACK:
            if payload:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            timer = self.timers.pop("settings", None)
            if timer is not None:
                timer.cancel()
            self.stream_limit = self.limits.max_concurrent_streams
            return
        for ident, value in parse_settings(payload):
            if ident == INITIAL_WINDOW_SIZE:
                self._peer_initial_window(value)
            elif ident == MAX_FRAME_SIZE:
                self.peer_max_frame = value
            elif ident == HEADER_TABLE_SIZE and value < self.table_size:
                self.table_size = value
                self.table_update = hpack_int(value, 5, 0x20)
        self.out.append(frame(SETTINGS, F_ACK, 0))

    def _priority(self, sid: int, payload: bytes) -> None:
        """Priority signals are ignored (RFC 9113 deprecates them), but the frame is checked."""
        if sid == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            if sid in self.streams:
                raise H2StreamError(sid, FRAME_SIZE_ERROR, f"PRIORITY of {len(payload)} bytes")
            raise H2ConnectionError(FRAME_SIZE_ERROR, f"PRIORITY of {len(payload)} bytes")
        if u32(payload) & STREAM_ID_MASK == sid:
            if sid in self.streams:
                raise H2StreamError(sid, PROTOCOL_ERROR, "stream depends on itself")
            raise H2ConnectionError(PROTOCOL_ERROR, f"stream {sid} depends on itself")

    def frame_without_stream(self, ftype: int, sid: int) -> None:
        """A frame for a stream we hold no object for: idle, or closed (§5.1)."""
        if sid % 2 == 0 or sid > self.last_sid:  # idle (we never open even-numbered streams)
            if ftype == PRIORITY:
                return
            raise H2ConnectionError(PROTOCOL_ERROR, f"{_name(ftype)} on idle stream {sid}")
        how = self.closed_recent.get(sid) or self.closed_older.get(sid)
        if how == RESET_BY_US or ftype in (PRIORITY, WINDOW_UPDATE, RST_STREAM):
            return  # frames the peer sent before it saw our reset, or harmless late ones
        if how == ENDED:  # both sides sent END_STREAM
            raise H2ConnectionError(STREAM_CLOSED, f"{_name(ftype)} on closed stream {sid}")
        if ftype == HEADERS and how is None:
            raise H2ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {sid}, not above the last one opened")
        raise H2StreamError(sid, STREAM_CLOSED, f"{_name(ftype)} on closed stream {sid}")

    # --- stream bookkeeping ------------------------------------------------------------------
    def maybe_drop(self, st: H2Stream) -> None:
        """Forget a stream once both sides are done and nothing is left to send."""
        if st.local_closed and st.remote_closed and not st.pending and st.pending_trailers is None:
            if self.streams.pop(st.sid, None) is not None:
                self._remember(st.sid, ENDED)
                if st.granted or self.grant_waiters:
                    self.release(st)
                if self.goaway_sent and not self.streams:
                    self._close()

    def _remember(self, sid: int, how: int) -> None:
        recent = self.closed_recent
        recent[sid] = how
        if len(recent) >= _RECENT:
            self.closed_older = recent
            self.closed_recent = {}

    def reset_stream(self, sid: int, code: int) -> None:
        """RST_STREAM from us: the stream is closed and forgotten."""
        self.out.append(rst_stream(sid, code))
        self._remember(sid, RESET_BY_US)
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self.blocked.pop(sid, None)
        self.release(st)
        if st.pending:
            self.pending_bytes -= len(st.pending)
            st.pending.clear()
        st.pending_trailers = None
        st.local_closed = st.remote_closed = True
        st.fast = False
        st.on_reset()
        if self.goaway_sent and not self.streams:
            self._close()

    def _stream_crashed(self, sid: int, exc: Exception) -> None:
        st = self.streams.get(sid)
        if st is None:
            if sid in self.closed_recent or sid in self.closed_older:
                # The stream's own code raised after the stream had ended: nothing left to fail.
                log.error("HTTP/2 stream %d failed after it ended", sid, exc_info=exc)
                return
            raise H2ConnectionError(INTERNAL_ERROR, f"internal error: {type(exc).__name__}") from exc
        log.error("HTTP/2 stream %d failed; resetting it", sid, exc_info=exc)
        try:
            st.fail(exc)
        except Exception:
            log.exception("HTTP/2 stream %d: failing it failed too", sid)
            self.reset_stream(sid, INTERNAL_ERROR)

    def call_stream(self, st: H2Stream, fn: Any, *args: Any) -> None:
        """Run a stream's callback from outside the frame loop (a timer, a resumed task) with
        the frame loop's error handling, then send what it produced."""
        if self.dead:
            return
        try:
            fn(*args)
        except H2StreamError as e:
            self.reset_stream(e.sid, e.code)
        except H2ConnectionError as e:
            self._connection_error(e)
        except Exception as e:
            try:
                self._stream_crashed(st.sid, e)
            except H2ConnectionError as ce:
                self._connection_error(ce)
        finally:
            self.flush()

    # --- output and lifecycle ----------------------------------------------------------------
    def flush(self) -> None:
        out = self.out
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _connection_error(self, e: H2ConnectionError, quiet: bool = False) -> None:
        if not quiet:
            log.warning("HTTP/2 connection error from %s: %s", self._peer(), e)
        self.out.append(goaway(self.last_sid, e.code, str(e).encode()))
        self.dead = True
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _calm(self, reason: str) -> None:
        """The peer is abusive: no new streams (GOAWAY ENHANCE_YOUR_CALM); open ones finish."""
        log.warning("HTTP/2 connection from %s: %s; sending GOAWAY ENHANCE_YOUR_CALM", self._peer(), reason)
        self.goaway_sent = True
        self.out.append(goaway(self.last_sid, ENHANCE_YOUR_CALM, reason.encode()))
        self._timer("drain", self.limits.drain_timeout, self._close)
        if not self.streams:
            self._close()

    def drain(self, reason: str = "") -> None:
        """Graceful close (§6.8): a first GOAWAY with the largest stream id tells the peer to
        open no more streams while the ones in flight still count; one round trip later the
        real last stream id; the connection closes when its streams have ended."""
        if self.draining or self.dead:
            return
        self.draining = True
        self.out.append(goaway(STREAM_ID_MASK, NO_ERROR, reason.encode()))
        self.flush()
        self._timer("drain", _DRAIN_NOTICE, self.shutdown)

    def shutdown(self) -> None:
        """No new streams (GOAWAY NO_ERROR with the last stream id); close when idle."""
        if self.dead or self.goaway_sent:
            return
        self.goaway_sent = True
        self.out.append(goaway(self.last_sid, NO_ERROR))
        self.flush()
        if not self.streams:
            self._close()
        else:
            self._timer("drain", self.limits.drain_timeout, self._close)

    def _close(self) -> None:
        self.flush()
        self.dead = True
        if self.transport is not None:
            self.transport.close()

    def _timer(self, name: str, delay: float, fn: Any) -> None:
        old = self.timers.pop(name, None)
        if old is not None:
            old.cancel()
        self.timers[name] = self.loop.call_later(delay, fn)

    def _settings_timeout(self) -> None:
        self.timers.pop("settings", None)
        if not self.dead:
            self._connection_error(H2ConnectionError(SETTINGS_TIMEOUT, "our SETTINGS were not acknowledged in time"))

    def _idle_tick(self) -> None:
        """Every half idle timeout: a connection that had no stream for two whole intervals is
        closed (so after 1 to 1.5 idle timeouts). Costs nothing per frame."""
        self.timers.pop("idle", None)
        if self.dead:
            return
        empty = not self.streams
        quiet = empty and self.idle_empty and self.last_sid == self.idle_sid
        self.idle_empty, self.idle_sid = empty, self.last_sid
        self.idle_ticks = self.idle_ticks + 1 if quiet else 0
        if self.idle_ticks >= 2:
            self.drain("idle")
            return
        self._timer("idle", self.limits.idle_timeout / 2, self._idle_tick)

    def _peer(self) -> Any:
        return self.transport.get_extra_info("peername") if self.transport is not None else None


_SELF_DEPENDENT = 0x100  # internal flag on a collected header block: priority names its own stream


def _name(ftype: int) -> str:
    return FRAME_NAMES[ftype] if ftype < len(FRAME_NAMES) else f"frame type {ftype:#x}"

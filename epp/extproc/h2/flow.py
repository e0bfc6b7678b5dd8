"""Flow control (RFC 9113 §5.2, §6.9) for the connection: outbound windows and queued DATA,
inbound windows sized to what we are willing to hold.

Inbound: a stream's window is ``Limits.stream_window``; credit comes back for bytes as they
are consumed, never for bytes a stream still holds (``H2Stream.held``: a partial message),
so each stream holds at most its window. A whole message larger than that is granted window
for its full length once its length is known (``grant``), within a per-connection budget;
later ones wait until earlier ones complete. The connection window is credited as frames are
read (what the connection holds is bounded per stream), so it only bounds bytes in flight.

A mixin of ``H2Connection``: it shares the connection's attributes (no extra lookups on the
per-frame path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from epp.extproc.h2.errors import H2ConnectionError, H2StreamError
from epp.extproc.h2.frames import (
    DATA,
    F_END_HEADERS,
    F_END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADER,
    HEADERS,
    MAX_WINDOW,
    PROTOCOL_ERROR,
    STREAM_ID_MASK,
    WINDOW_UPDATE,
    frame,
    headers_frames,
    u32,
    window_update,
)

if TYPE_CHECKING:
    from epp.extproc.h2.stream import H2Stream

# A module-level name, not an imported one: CPython 3.11 compiles ``imported.pack(...)`` to
# LOAD_ATTR (a bound method per call) instead of LOAD_METHOD.
_HDR = HEADER


class FlowControl:
    __slots__ = ()

    # (attributes are set by H2Connection.__init__)
    out: list[bytes]
    streams: dict[int, "H2Stream"]
    blocked: dict[int, "H2Stream"]
    send_conn_window: int
    peer_initial_window: int
    peer_max_frame: int
    pending_bytes: int
    recv_window: int
    connection_window: int
    stream_window: int
    granted_total: int
    buffer_budget: int
    grant_waiters: dict[int, tuple["H2Stream", int]]
    table_update: bytes

    # --- outbound ----------------------------------------------------------------------------
    def send_data(self, st: "H2Stream", data: bytes) -> None:
        n = len(data)
        if not st.pending and n <= st.send_window and n <= self.send_conn_window and n <= self.peer_max_frame:
            st.send_window -= n
            self.send_conn_window -= n
            self.out += (_HDR.pack(n >> 16, n & 0xFFFF, DATA, 0, st.sid), data)
            return
        st.pending += data
        self.pending_bytes += n
        self._drain(st)

    def send_headers(self, st: "H2Stream", block: bytes, end_stream: bool) -> None:
        """A header block; trailers (``end_stream``) wait behind DATA still queued."""
        if end_stream and st.pending:
            st.pending_trailers = block
            return
        if self.table_update:  # the first block after the peer shrank the HPACK table
            block = self.table_update + block
            self.table_update = b""
        if len(block) <= self.peer_max_frame:
            self.out.append(frame(HEADERS, F_END_HEADERS | F_END_STREAM if end_stream else F_END_HEADERS, st.sid, block))
        else:
            self.out += headers_frames(st.sid, block, end_stream, self.peer_max_frame)

    def _drain(self, st: "H2Stream") -> None:
        pending = st.pending
        while pending:
            n = min(len(pending), st.send_window, self.send_conn_window, self.peer_max_frame)
            if n <= 0:
                self.blocked[st.sid] = st
                return
            self.out.append(frame(DATA, 0, st.sid, bytes(pending[:n])))
            del pending[:n]
            self.pending_bytes -= n
            st.send_window -= n
            self.send_conn_window -= n
        self.blocked.pop(st.sid, None)
        if st.pending_trailers is not None:
            block, st.pending_trailers = st.pending_trailers, None
            self.send_headers(st, block, True)
            self.maybe_drop(st)

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {len(payload)} bytes")
        inc = u32(payload) & STREAM_ID_MASK
        if sid == 0:
            if inc == 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE with increment 0 on the connection")
            window = self.send_conn_window + inc
            if window > MAX_WINDOW:
                raise H2ConnectionError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self.send_conn_window = window
            if self.blocked:
                for st in list(self.blocked.values()):
                    self._drain(st)
            return
        st = self.streams.get(sid)
        if st is None:
            self.frame_without_stream(WINDOW_UPDATE, sid)
            return
        if inc == 0:
            raise H2StreamError(sid, PROTOCOL_ERROR, "WINDOW_UPDATE with increment 0")
        window = st.send_window + inc
        if window > MAX_WINDOW:
            raise H2StreamError(sid, FLOW_CONTROL_ERROR, "stream window above 2^31-1")
        st.send_window = window
        if st.pending:
            self._drain(st)

    def _peer_initial_window(self, value: int) -> None:
        """SETTINGS_INITIAL_WINDOW_SIZE changed: every stream's send window moves by the delta (§6.9.2)."""
        delta = value - self.peer_initial_window
        self.peer_initial_window = value
        for st in self.streams.values():
            st.send_window += delta
            if st.send_window > MAX_WINDOW:
                raise H2ConnectionError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE pushes a window above 2^31-1")
        if delta > 0:
            for st in list(self.streams.values()):
                if st.pending:
                    self._drain(st)

    # --- inbound -----------------------------------------------------------------------------
    def replenish_connection(self) -> None:
        inc = self.connection_window - self.recv_window
        self.recv_window = self.connection_window
        self.out.append(window_update(0, inc))

    def replenish(self, st: "H2Stream") -> None:
        """Give the peer credit for what the stream consumed (everything received minus what
        it still holds), up to its window or its grant."""
        if st.remote_closed:
            return
        inc = (st.granted or self.stream_window) - st.held - st.recv_window
        if inc > 0:
            st.recv_window += inc
            self.out.append(window_update(st.sid, inc))

    def grant(self, st: "H2Stream", total: int) -> None:
        """The stream is receiving one message of ``total`` bytes, more than its window: let
        the whole message come if the connection's budget allows, else when it does."""
        if st.granted >= total or st.sid in self.grant_waiters:
            return
        if self.granted_total and self.granted_total + total > self.buffer_budget:
            self.grant_waiters[st.sid] = (st, total)
            return
        self.granted_total += total - st.granted
        st.granted = total
        self.replenish(st)

    def release(self, st: "H2Stream") -> None:
        """The granted message completed (or the stream ended): the budget goes to waiters."""
        self.grant_waiters.pop(st.sid, None)
        if not st.granted:
            return
        self.granted_total -= st.granted
        st.granted = 0
        while self.grant_waiters:
            sid, (waiter, total) = next(iter(self.grant_waiters.items()))
            if self.granted_total and self.granted_total + total > self.buffer_budget:
                return
            del self.grant_waiters[sid]
            if self.streams.get(sid) is waiter:
                self.grant(waiter, total)

    def maybe_drop(self, st: "H2Stream") -> None:  # implemented by H2Connection
        raise NotImplementedError

    def frame_without_stream(self, ftype: int, sid: int) -> None:  # implemented by H2Connection
        raise NotImplementedError

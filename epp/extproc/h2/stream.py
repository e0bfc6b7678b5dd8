"""One HTTP/2 stream as the connection sees it (RFC 9113 §5.1).

A stream object exists while the stream is open or half-closed; ``remote_closed`` and
``local_closed`` say which halves are done (both set = closed, and the connection forgets
it). Idle streams have no object (any id above the highest one opened), and closed ones are
remembered for a while by the connection only to answer late frames correctly.

Subclasses (the gRPC layer) override the event methods; the connection calls them after it
checked the frame, the stream state and flow control.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from epp.extproc.h2.frames import INTERNAL_ERROR

if TYPE_CHECKING:
    from epp.extproc.h2.connection import H2Connection


class H2Stream:
    __slots__ = ("conn", "sid", "send_window", "recv_window", "held", "granted", "pending", "pending_trailers",
                 "headers_sent", "local_closed", "remote_closed", "fast", "content_length")

    def __init__(self, conn: "H2Connection", sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.send_window = conn.peer_initial_window  # what we may still send
        self.recv_window = conn.stream_window  # what the peer may still send
        # Bytes received and kept but not consumed yet (a partial message): no window credit
        # is returned for them, so the stream window bounds what a stream holds.
        self.held = 0
        self.granted = 0  # window granted for one whole large message (FlowControl.grant)
        self.pending = bytearray()  # DATA waiting for flow-control window
        self.pending_trailers: bytes | None = None  # the END_STREAM header block, after pending
        self.headers_sent = False  # our response HEADERS went out (a reset before that is premature)
        self.local_closed = False  # we sent (or queued) END_STREAM
        self.remote_closed = False  # the peer sent END_STREAM
        # True while DATA frames without flags may go to ``fast_data`` straight from the frame
        # loop; only set by a subclass, only while the stream is open and flow control is simple.
        self.fast = False
        self.content_length: int | None = None  # declared request length still to come (§8.1.1)

    # --- events (override) ---------------------------------------------------------------
    def on_data(self, data: bytes, end_stream: bool) -> None:
        """DATA content (padding removed); ``end_stream``: the peer half-closed."""

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """A trailer block, which always ends the peer's side."""
        self.on_data(b"", True)

    def on_reset(self) -> None:
        """The stream ended abnormally: the peer reset it, we did, or the connection went away."""

    def fast_data(self, payload: bytes) -> bool:
        """The hot path for a DATA frame without flags while ``fast`` is set; returns False
        (having done nothing) to let the connection take the general path."""
        return False

    def fail(self, exc: BaseException) -> None:
        """Handling this stream raised ``exc``: it costs this stream, never the connection."""
        self.conn.reset_stream(self.sid, INTERNAL_ERROR)

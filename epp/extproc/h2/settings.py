"""SETTINGS frames (RFC 9113 §6.5): the ones we send, and validation of the peer's."""

from __future__ import annotations

import struct

from epp.extproc.h2.errors import H2ConnectionError
from epp.extproc.h2.frames import (
    DEFAULT_MAX_FRAME,
    ENABLE_CONNECT_PROTOCOL,
    ENABLE_PUSH,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    INITIAL_WINDOW_SIZE,
    LARGEST_MAX_FRAME,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_WINDOW,
    NO_RFC7540_PRIORITIES,
    PROTOCOL_ERROR,
    SETTINGS,
    frame,
)
from epp.extproc.h2.limits import Limits

_PAIR = struct.Struct(">HI")
_BOOLEAN = (ENABLE_PUSH, ENABLE_CONNECT_PROTOCOL, NO_RFC7540_PRIORITIES)


def local_settings(limits: Limits) -> bytes:
    """Our SETTINGS frame: the server preface (§3.4). ENABLE_PUSH is omitted (a server
    must not send 1 and 0 says nothing); the HPACK table keeps its default 4096 bytes."""
    pairs = ((MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams), (INITIAL_WINDOW_SIZE, limits.stream_window),
             (MAX_FRAME_SIZE, limits.max_frame_size), (MAX_HEADER_LIST_SIZE, limits.max_header_list_size))
    return frame(SETTINGS, 0, 0, b"".join(_PAIR.pack(k, v) for k, v in pairs))


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    """The (identifier, value) pairs of a peer's SETTINGS frame, in order, each checked;
    unknown identifiers are kept (the caller ignores them, §6.5.2). Raises the connection
    error the RFC names for a bad frame or value."""
    if len(payload) % 6:
        raise H2ConnectionError(FRAME_SIZE_ERROR, f"SETTINGS length {len(payload)} is not a multiple of 6")
    out = []
    for pos in range(0, len(payload), 6):
        ident, value = _PAIR.unpack_from(payload, pos)
        if ident in _BOOLEAN and value > 1:
            raise H2ConnectionError(PROTOCOL_ERROR, f"SETTINGS {ident:#x} must be 0 or 1, got {value}")
        if ident == INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise H2ConnectionError(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} exceeds 2^31-1")
        if ident == MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME <= value <= LARGEST_MAX_FRAME:
            raise H2ConnectionError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} outside 16384 .. 2^24-1")
        out.append((ident, value))
    return out

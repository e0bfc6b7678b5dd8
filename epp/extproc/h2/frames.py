"""HTTP/2 frame layout (RFC 9113 §4, §6): constants, builders, and the checks of fixed-size fields.

Frames are built as bytes; parsing happens in the connection's frame loop (one ``struct`` call
per frame header), which uses the helpers here for the parts that need validating.
"""

from __future__ import annotations

import struct

from epp.extproc.h2.errors import H2ConnectionError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (§6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY",
               "WINDOW_UPDATE", "CONTINUATION")

# Flags
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

# Error codes (§7)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

# Settings identifiers (§6.5.2)
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6
ENABLE_CONNECT_PROTOCOL = 0x8  # RFC 8441
NO_RFC7540_PRIORITIES = 0x9  # RFC 9218

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
LARGEST_MAX_FRAME = 2**24 - 1
STREAM_ID_MASK = 0x7FFFFFFF  # the reserved bit is ignored on receipt (§4.1)

HEADER = struct.Struct(">BHBBI")  # 24-bit length as (high byte, low 16 bits), type, flags, stream id
_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def rst_stream(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, _U32.pack(code))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, _U32.pack(increment))


def goaway(last_sid: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_sid, code) + debug[:256])


def headers_frames(sid: int, block: bytes, end_stream: bool, max_frame: int) -> list[bytes]:
    """A header block as HEADERS (+ CONTINUATION frames when it is larger than the peer's
    SETTINGS_MAX_FRAME_SIZE, §4.3, §6.10)."""
    flags = F_END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return [frame(HEADERS, flags | F_END_HEADERS, sid, block)]
    out = [frame(HEADERS, flags, sid, block[:max_frame])]
    pos = max_frame
    while pos < len(block):
        part = block[pos:pos + max_frame]
        pos += max_frame
        out.append(frame(CONTINUATION, F_END_HEADERS if pos >= len(block) else 0, sid, part))
    return out


def strip_padding(payload: bytes, ftype: int) -> bytes:
    """The content of a PADDED DATA or HEADERS frame (§6.1, §6.2)."""
    n = len(payload)
    if n == 0:
        raise H2ConnectionError(FRAME_SIZE_ERROR, f"padded {FRAME_NAMES[ftype]} frame without a pad length")
    pad = payload[0]
    if pad >= n:
        raise H2ConnectionError(PROTOCOL_ERROR, f"{FRAME_NAMES[ftype]} padding of {pad} bytes in a "
                                                f"{n}-byte frame")
    return payload[1:n - pad]


def u32(payload: bytes) -> int:
    return _U32.unpack_from(payload)[0]

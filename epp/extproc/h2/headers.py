"""Header blocks: HPACK decoding with a cache, request/trailer validation (RFC 9113 §8.2-8.3),
and the few HPACK encodings a server needs to build its own blocks (RFC 7541)."""

from __future__ import annotations

from typing import Any

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

from epp.extproc.h2.errors import H2ConnectionError
from epp.extproc.h2.frames import COMPRESSION_ERROR, ENHANCE_YOUR_CALM

Headers = list[tuple[bytes, bytes]]

# Fields that are connection-specific in HTTP/1.1 and malformed in HTTP/2 (§8.2.2).
_CONNECTION_SPECIFIC = frozenset((b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"))
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))
_BAD_NAME_BYTES = frozenset(range(0x00, 0x21)) | frozenset(range(0x41, 0x5B)) | frozenset(range(0x7F, 0x100))


class Block:
    """A decoded header block and what validation found (computed once per distinct block)."""

    __slots__ = ("headers", "path", "content_length", "request_error", "trailers_error")

    def __init__(self, headers: Headers) -> None:
        self.headers = headers
        self.path, self.content_length, self.request_error = check_request(headers)
        self.trailers_error = check_trailers(headers)


def _field_error(name: bytes, value: bytes) -> str | None:
    if not name:
        return "empty field name"
    if name[0] == 0x3A:  # ':' pseudo-header: the rest of the name is checked like any name
        name = name[1:]
    if any(b in _BAD_NAME_BYTES for b in name):
        return f"invalid field name {name!r} (uppercase or control characters)"
    if b"\x00" in value or b"\r" in value or b"\n" in value:
        return f"field {name!r} has NUL, CR or LF in its value"
    if value and (value[0] in (0x20, 0x09) or value[-1] in (0x20, 0x09)):
        return f"field {name!r} has leading or trailing whitespace"
    if name in _CONNECTION_SPECIFIC:
        return f"connection-specific field {name!r}"
    if name == b"te" and value != b"trailers":
        return "te other than \"trailers\""
    return None


def check_request(headers: Headers) -> tuple[bytes, int | None, str | None]:
    """(path, content-length or None, problem or None) of a request header block (§8.3.1)."""
    seen: dict[bytes, bytes] = {}
    regular = False
    content_length: int | None = None
    host: bytes | None = None
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return b"", None, f"pseudo-header {name!r} after a regular field"
            if name not in _REQUEST_PSEUDO:
                return b"", None, f"pseudo-header {name!r} is not a request pseudo-header"
            if name in seen:
                return b"", None, f"duplicate pseudo-header {name!r}"
            seen[name] = value
        else:
            regular = True
            if name == b"host":
                if host is not None:
                    return b"", None, "duplicate host"  # RFC 9110 §7.2
                host = value
            elif name == b"content-length":
                if not value.isdigit() or (content_length is not None and int(value) != content_length):
                    return b"", None, "invalid content-length"
                content_length = int(value)
        problem = _field_error(name, value)
        if problem:
            return b"", None, problem
    method = seen.get(b":method")
    if method is None:
        return b"", None, "missing :method"
    authority = seen.get(b":authority")
    if host is not None and authority is not None and host != authority:
        return b"", None, "host differs from :authority"  # §8.3.1: SHOULD be malformed
    if method == b"CONNECT" and b":protocol" not in seen:
        if b":scheme" in seen or b":path" in seen or b":authority" not in seen:
            return b"", None, "CONNECT with :scheme or :path, or without :authority"
        return b"", content_length, None
    if b":protocol" in seen and method != b"CONNECT":
        return b"", None, ":protocol without CONNECT"
    path = seen.get(b":path")
    if b":scheme" not in seen or path is None:
        return b"", None, "missing :scheme or :path"
    if not path:
        return b"", None, "empty :path"
    return path, content_length, None


def check_trailers(headers: Headers) -> str | None:
    """Problem of a trailer block, or None: no pseudo-headers (§8.1), valid fields."""
    for name, value in headers:
        if name[:1] == b":":
            return f"pseudo-header {name!r} in trailers"
        problem = _field_error(name, value)
        if problem:
            return problem
    return None


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


class HeaderDecoder:
    """HPACK-decodes header blocks, remembering blocks that left the dynamic table untouched.

    Envoy sends the same bytes for every ext_proc stream's headers once its dynamic table
    holds them (indexed fields plus a Huffman-coded literal :path that is never indexed);
    decoding and validating that in Python costs more than the rest of a request. A cached
    result is valid while the table does not change (insertions are counted).
    """

    CACHE_SIZE = 64

    def __init__(self, max_header_list_size: int) -> None:
        self.decoder = Decoder(max_header_list_size)
        self.table = _CountingTable(self.decoder.header_table)
        self.cache: dict[bytes, Block] = {}
        self.state: tuple = ()

    def decode(self, block: bytes) -> Block:
        state = self.table.state()
        if state != self.state:
            self.cache.clear()
            self.state = state
        cached = self.cache.get(block)
        if cached is not None:
            return cached
        try:
            headers = self.decoder.decode(block, raw=True)
        except OversizedHeaderListError as e:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, f"header list over our SETTINGS_MAX_HEADER_LIST_SIZE: {e}") from None
        except HPACKError as e:
            raise H2ConnectionError(COMPRESSION_ERROR, f"bad header block: {e}") from None
        except Exception as e:  # hpack lets some garbage through as IndexError, ValueError, ...: either
            # way the dynamic table is in an unknown state, so the connection cannot go on
            raise H2ConnectionError(COMPRESSION_ERROR, f"bad header block: {type(e).__name__}") from None
        decoded = Block(headers)
        if self.table.state() == state and len(self.cache) < self.CACHE_SIZE:
            self.cache[block] = decoded
        return decoded


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
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


def literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value

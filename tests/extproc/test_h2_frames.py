"""Property tests of the HTTP/2 pieces that parse or build bytes, against the python-hyper
packages (hyperframe, h2) as independent references."""

from __future__ import annotations

import struct

import h2.utilities
import pytest
from h2.exceptions import ProtocolError
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, HeadersFrame, SettingsFrame
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from epp.extproc.h2.errors import H2ConnectionError
from epp.extproc.h2.frames import (
    DATA,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    PROTOCOL_ERROR,
    headers_frames,
    strip_padding,
)
from epp.extproc.h2.headers import check_request, check_trailers
from epp.extproc.h2.limits import TokenBucket
from epp.extproc.h2.settings import parse_settings


@pytest.fixture(autouse=True)
def extproc_core():
    """Overrides the package-wide parametrisation: no server core involved."""
    return "fast"


def parse(data: bytes) -> list[Frame]:
    frames = []
    while data:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9:9 + length]))
        frames.append(f)
        data = data[9 + length:]
    return frames


setting_ids = st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9, 0xABCD])
setting_values = st.one_of(st.integers(0, 2), st.sampled_from([16383, 16384, 2**24 - 1, 2**24, 2**31 - 1, 2**31]),
                           st.integers(0, 2**32 - 1))


@given(st.lists(st.tuples(setting_ids, setting_values), max_size=8), st.integers(0, 5))
def test_settings_parse_like_hyperframe_and_reject_what_the_rfc_rejects(pairs, junk):
    payload = b"".join(struct.pack(">HI", k, v) for k, v in pairs) + b"\x00" * (junk if junk % 6 else 0)
    if len(payload) % 6:
        with pytest.raises(H2ConnectionError) as e:
            parse_settings(payload)
        assert e.value.code == FRAME_SIZE_ERROR
        return
    bad = next(((k, v) for k, v in pairs if (k in (2, 8, 9) and v > 1) or (k == 4 and v > 2**31 - 1)
                or (k == 5 and not 16384 <= v <= 2**24 - 1)), None)
    if bad is not None:
        with pytest.raises(H2ConnectionError) as e:
            parse_settings(payload)
        assert e.value.code == (FLOW_CONTROL_ERROR if bad[0] == 4 else PROTOCOL_ERROR)
        return
    ours = parse_settings(payload)
    assert ours == pairs  # every pair, in order (§6.5.3: processed in order)
    reference = SettingsFrame(0)
    reference.parse_body(memoryview(payload))
    assert dict(ours) == dict(reference.settings)


@given(st.binary(max_size=300), st.integers(0, 255))
def test_padding_is_removed_like_hyperframe_or_refused(content, pad):
    payload = bytes([pad]) + content
    if pad >= len(payload):
        with pytest.raises(H2ConnectionError) as e:
            strip_padding(payload, DATA)
        assert e.value.code == PROTOCOL_ERROR
        return
    reference = DataFrame(1)
    reference.flags.add("PADDED")
    reference.parse_body(memoryview(payload))
    assert strip_padding(payload, DATA) == reference.data


def test_zero_length_padded_frame_is_a_frame_size_error():
    with pytest.raises(H2ConnectionError) as e:
        strip_padding(b"", DATA)
    assert e.value.code == FRAME_SIZE_ERROR


@given(st.binary(min_size=0, max_size=5000), st.integers(16384, 20000).map(lambda n: n // 1000), st.booleans())
def test_large_header_blocks_split_into_continuation(block, max_frame, end_stream):
    frames = parse(b"".join(headers_frames(7, block, end_stream, max_frame)))
    assert isinstance(frames[0], HeadersFrame) and all(isinstance(f, ContinuationFrame) for f in frames[1:])
    assert all(f.stream_id == 7 and len(f.data) <= max_frame for f in frames)
    assert b"".join(f.data for f in frames) == block
    assert ["END_HEADERS" in f.flags for f in frames] == [False] * (len(frames) - 1) + [True]
    assert ("END_STREAM" in frames[0].flags) == end_stream


names = st.sampled_from([b":method", b":scheme", b":path", b":authority", b":status", b":foo", b"x-a", b"X-Up",
                         b"te", b"connection", b"content-length", b"user-agent", b"keep-alive", b"x y", b"",
                         b"host"])
values = st.sampled_from([b"POST", b"GET", b"http", b"/p", b"", b"trailers", b"gzip", b"5", b" lead", b"a\rb", b"epp"])
REQUEST = h2.utilities.HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False,
                                             is_push_promise=False)
TRAILER = h2.utilities.HeaderValidationFlags(is_client=False, is_trailer=True, is_response_header=False,
                                             is_push_promise=False)


def h2_accepts(headers: list[tuple[bytes, bytes]], flags: h2.utilities.HeaderValidationFlags) -> bool:
    try:
        list(h2.utilities.validate_headers(headers, flags))
        return True
    except ProtocolError:
        return False


@settings(max_examples=300)
@given(st.permutations([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p"), (b":authority", b"epp")]),
       st.lists(st.tuples(names, values), max_size=6), st.integers(0, 4))
def test_request_validation_agrees_with_h2(base, extra, cut):
    """Malformed requests (§8.2-8.3) are the ones h2's own server-side validation refuses.
    Two differences: we also refuse a content-length that is not a number (RFC 9110 §8.6),
    and accept a request with neither :authority nor host (§8.3.1 allows a request without
    authority information; h2 refuses it)."""
    fields = list(base[cut:]) + extra
    problem = check_request(fields)[2]
    if any(n == b"content-length" and not v.isdigit() for n, v in fields):
        assert problem is not None
        return
    if not any(n in (b":authority", b"host") for n, _ in fields):
        assume(not h2_accepts([(b":authority", b"epp")] + fields, REQUEST))  # then both must refuse it anyway
    assert (problem is None) == h2_accepts(fields, REQUEST), (fields, problem)


@settings(max_examples=150)
@given(st.lists(st.tuples(names, values), max_size=5))
def test_trailer_validation_agrees_with_h2(fields):
    assert (check_trailers(fields) is None) == h2_accepts(fields, TRAILER), fields


@given(st.integers(1, 50), st.floats(0.1, 100), st.lists(st.floats(0, 0.5), max_size=200))
def test_token_bucket_allows_at_most_burst_plus_rate_times_elapsed(burst, rate, gaps):
    now = 0.0
    bucket = TokenBucket(burst, rate, now)
    taken = 0
    for gap in gaps:
        now += gap
        taken += bucket.take(now)
        assert taken <= burst + rate * now + 1e-9
    if not gaps or now == 0:
        assert taken == min(len(gaps), burst)

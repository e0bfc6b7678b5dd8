"""Plausible-but-wrong frame sequences (hypothesis): the server never fails internally and
gives every resource back.

Unlike the byte-level fuzz in test_fastserver_h2.py, these sequences follow a grammar close to
what a real client sends (valid HPACK blocks for real methods, gRPC messages, resets, window
updates, settings, priority, split header blocks), so they reach the stream state machine and
the gRPC layer instead of stopping at the first malformed frame.
"""

from __future__ import annotations

import struct

import hpack
import pytest
from extproc_support import REQ_HEADERS, body_msg, completion_body, headers_msg, new_director
from h2peer import (
    CONTINUATION,
    DATA,
    HEADERS,
    HEALTH_CHECK,
    HEALTH_WATCH,
    INTERNAL_ERROR,
    PRIORITY,
    PROCESS,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ConnectionClosed,
    Peer,
    ServerThread,
    grpc_message,
    raw,
)
from hyperframe.frame import GoAwayFrame, RstStreamFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


PATHS = [PROCESS, HEALTH_CHECK, HEALTH_WATCH, "/x.Y/Z"]
MESSAGES = [headers_msg(REQ_HEADERS).SerializeToString(), body_msg(completion_body(), True).SerializeToString(),
            body_msg(b"partial", False).SerializeToString(), headers_msg({":status": "200"}, response=True).SerializeToString(),
            body_msg(b"data: tok\n\n", False, response=True).SerializeToString(), b"", b"\xff\x00garbage"]

sids = st.sampled_from([1, 3, 5, 7, 9, 11])
actions = st.one_of(
    st.tuples(st.just("headers"), sids, st.sampled_from(PATHS), st.booleans(), st.booleans()),
    st.tuples(st.just("message"), sids, st.sampled_from(MESSAGES), st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("cut"), sids, st.integers(1, 200), st.booleans()),
    st.tuples(st.just("rst"), sids, st.sampled_from([0, 8, 2])),
    st.tuples(st.just("window"), st.sampled_from([0, 1, 3, 5]), st.sampled_from([1, 1000, 2**31 - 1])),
    st.tuples(st.just("settings"), st.sampled_from([(4, 0), (4, 1), (4, 65535), (5, 16384), (3, 1), (0xAB, 1)])),
    st.tuples(st.just("priority"), sids, st.sampled_from([0, 1, 3])),
    st.tuples(st.just("trailers"), sids),
)


@pytest.fixture(autouse=True)
def extproc_core():
    """Overrides the package-wide parametrisation: these tests speak HTTP/2 to the fast core."""
    return "fast"


def encode(p: Peer, enc: hpack.Encoder, action: tuple) -> bytes:
    kind = action[0]
    if kind == "headers":
        _, sid, path, end_stream, split = action
        block = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "epp"),
                            ("content-type", "application/grpc"), ("te", "trailers")])
        if split:
            return raw(HEADERS, 0x1 if end_stream else 0, sid, block[:3]) + raw(CONTINUATION, 0x4, sid, block[3:])
        return raw(HEADERS, 0x4 | (0x1 if end_stream else 0), sid, block)
    if kind == "message":
        _, sid, body, end_stream, pad = action
        payload = grpc_message(body)
        if pad:
            return raw(DATA, 0x8 | (0x1 if end_stream else 0), sid, bytes([pad]) + payload + b"\x00" * pad)
        return raw(DATA, 0x1 if end_stream else 0, sid, payload)
    if kind == "cut":  # a message whose length prefix promises more than follows
        _, sid, n, end_stream = action
        return raw(DATA, 0x1 if end_stream else 0, sid, b"\x00" + struct.pack(">I", n + 10) + b"x" * n)
    if kind == "rst":
        return raw(RST_STREAM, 0, action[1], struct.pack(">I", action[2]))
    if kind == "window":
        return raw(WINDOW_UPDATE, 0, action[1], struct.pack(">I", action[2]))
    if kind == "settings":
        return raw(SETTINGS, 0, 0, struct.pack(">HI", *action[1]))
    if kind == "priority":
        return raw(PRIORITY, 0, action[1], struct.pack(">I", action[2]) + b"\x10")
    block = enc.encode([("grpc-status", "0")])
    return raw(HEADERS, 0x5, action[1], block)


def test_plausible_frame_sequences_never_fail_internally_and_release_everything():
    director = new_director()
    with ServerThread(director) as server:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(actions, min_size=1, max_size=14))
        def run(seq):
            with Peer(server.port, timeout=3) as p:
                p.handshake()
                enc = p.encoder
                p.send(b"".join(encode(p, enc, a) for a in seq))
                try:
                    p.expect_alive(b"fuzzdone")
                except (ConnectionClosed, AssertionError):
                    pass  # a connection error is a fine answer to a wrong sequence
                bad = [f for f in p.frames if isinstance(f, (GoAwayFrame, RstStreamFrame)) and f.error_code == INTERNAL_ERROR]
                assert not bad, (seq, bad)

        run()
        assert server.wait_for(lambda: not server.server.connections)
        assert server.service.active_streams == 0
        assert director.in_flight == 0

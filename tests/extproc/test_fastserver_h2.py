"""The fast core at the HTTP/2 level: garbage never takes it down; oversized messages are refused."""

from __future__ import annotations

import socket
import struct

import grpc
import pytest
from extproc_support import REQ_HEADERS, EppThread, body_msg, completion_body, headers_msg, new_director, stub_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame

from epp.extproc.fastserver import PREFACE, frame


@pytest.fixture(autouse=True)
def extproc_core(monkeypatch):
    """Overrides the package-wide parametrisation: these tests speak HTTP/2 to the fast core."""
    monkeypatch.setenv("EPP_EXTPROC_CORE", "fast")
    return "fast"


def _still_serving(epp: EppThread) -> bool:
    with grpc.insecure_channel(epp.target) as ch:
        out = list(stub_for(ch)(iter([headers_msg(REQ_HEADERS), body_msg(completion_body(), True)]), timeout=5))
    return out[0].HasField("request_headers")


frames = st.lists(st.builds(lambda t, f, sid, p: frame(t, f, sid, p), st.integers(0, 12), st.integers(0, 255),
                            st.integers(0, 9), st.binary(max_size=64)), max_size=12)


def test_random_frames_and_bytes_never_crash_the_server():
    with EppThread(new_director()) as epp:

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.booleans(), frames, st.binary(max_size=200))
        def run(preface, fs, tail):
            received = b""
            with socket.create_connection(("127.0.0.1", epp.port), timeout=2) as s:
                s.sendall((PREFACE if preface else b"") + b"".join(fs) + tail)
                s.shutdown(socket.SHUT_WR)
                try:
                    while chunk := s.recv(65536):
                        received += chunk
                except OSError:
                    pass
            # Whatever came in, the answer is well-formed HTTP/2 and never INTERNAL_ERROR (a bug).
            while len(received) >= 9:
                f, length = Frame.parse_frame_header(memoryview(received[:9]))
                f.parse_body(memoryview(received[9:9 + length]))
                received = received[9 + length:]
                if isinstance(f, (GoAwayFrame, RstStreamFrame)):
                    assert f.error_code != 0x2, f
            assert received == b""

        run()
        assert epp.wait_idle(10)
        assert epp.director.in_flight == 0
        assert _still_serving(epp)


def test_oversized_grpc_message_is_refused():
    director = new_director()
    with EppThread(director) as epp:
        limit = epp.servers.extproc.max_message
        hdrs = frame(1, 0x4, 1, b"\x83\x86" + b"\x04" + bytes([len(b"/envoy.service.ext_proc.v3.ExternalProcessor/Process")])
                     + b"/envoy.service.ext_proc.v3.ExternalProcessor/Process")
        prefix = b"\x00" + struct.pack(">I", limit + 1)
        with socket.create_connection(("127.0.0.1", epp.port), timeout=5) as s:
            s.sendall(PREFACE + frame(4, 0, 0) + hdrs + frame(0, 0, 1, prefix + b"x" * 100))
            data = b""
            while b"grpc-status" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        assert b"grpc-status\x018" in data  # literal header, value "8": RESOURCE_EXHAUSTED
        assert _still_serving(epp)


header_lists = st.lists(st.lists(st.tuples(st.sampled_from([b":path", b"x-a", b"x-b", b"te", b"user-agent"]),
                                           st.sampled_from([b"1", b"22", b"/p", b"trailers", b"v" * 40])),
                                 min_size=1, max_size=5), min_size=1, max_size=12)


def test_hpack_block_cache_decodes_like_a_plain_decoder():
    import hpack

    from epp.extproc.h2.headers import HeaderDecoder

    cases = []

    @settings(max_examples=80, deadline=None)
    @given(header_lists, st.lists(st.integers(0, 11), max_size=10), st.sampled_from([0, 64, 4096]))
    def collect(lists, repeats, table_size):
        cases.append((lists, repeats, table_size))

    collect()
    # A fixed case that must hit the cache, so the assertion below never depends on what
    # hypothesis happened to generate: from the second repetition on, the block is index-only
    # and byte-identical, and decoding it leaves the dynamic table unchanged.
    cases.append(([[(b":path", b"/p"), (b"x-a", b"1")]] * 3, [], 4096))
    cached = 0
    for lists, repeats, table_size in cases:
        enc = hpack.Encoder()
        enc.header_table_size = table_size
        blocks = []
        for i, hl in enumerate(lists):
            blocks.append(enc.encode(hl, huffman=True))
            for r in repeats:  # the same headers again: often a byte-identical, index-only block
                if r == i:
                    blocks.append(enc.encode(hl, huffman=True))
        dec = HeaderDecoder(1 << 16)
        ref = hpack.Decoder()
        for block in blocks:
            hit = block in dec.cache and dec.table.state() == dec.state
            assert dec.decode(block).headers == ref.decode(block, raw=True)
            cached += hit
    assert cached > 0  # the cache was exercised, not just bypassed

"""RFC 9113 conformance of the fast core, case by case (h2spec's list as the checklist).

An independent peer (hyperframe + hpack, see h2peer.py) sends frames over TCP and checks the
server's answer: a connection error is GOAWAY with the RFC's code and a closed connection; a
stream error is RST_STREAM with the RFC's code on a connection that still answers PING.
"""

from __future__ import annotations

import struct

import pytest
from extproc_support import new_director
from h2peer import (
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    HEALTH_CHECK,
    HEALTH_WATCH,
    INTERNAL_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIO,
    PRIORITY,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    Peer,
    ServerThread,
    grpc_message,
    raw,
    u32,
)
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame
from hyperframe.frame import WindowUpdateFrame


@pytest.fixture(autouse=True)
def extproc_core():
    """Overrides the package-wide parametrisation: these tests speak HTTP/2 to the fast core."""
    return "fast"


@pytest.fixture(scope="module")
def server():
    with ServerThread(new_director()) as s:
        yield s


@pytest.fixture
def peer(server):
    with Peer(server.port) as p:
        yield p.handshake()


def frame_head(ftype: int, flags: int, sid: int, length: int) -> bytes:
    """Only the 9-byte header of a frame announcing ``length`` bytes: enough for a size check
    (sending the payload too would make the server close with unread data, i.e. a TCP reset
    that can overtake its GOAWAY)."""
    return struct.pack(">BHBBI", length >> 16, length & 0xFFFF, ftype, flags, sid)


def check_request(p: Peer, sid: int) -> bytes:
    """A complete health Check on ``sid`` (request + END_STREAM)."""
    return p.headers(sid) + p.data(sid, grpc_message(b""), end_stream=True)


def open_watch(p: Peer, sid: int) -> None:
    """A health Watch stream that stays open (our side answered, the peer's side open)."""
    p.send(p.headers(sid, HEALTH_WATCH), p.data(sid, grpc_message(b"")))
    p.until(lambda f: isinstance(f, DataFrame) and f.stream_id == sid)


# --- §3.5 the connection preface --------------------------------------------------------------
def test_server_preface_is_settings_with_our_limits(server):
    with Peer(server.port) as p:
        p.send(PREFACE)
        first = p.next()
        assert isinstance(first, SettingsFrame) and "ACK" not in first.flags
        assert first.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == server.limits.max_concurrent_streams
        assert first.settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 65535
        assert first.settings[SettingsFrame.MAX_FRAME_SIZE] == server.limits.max_frame_size
        assert first.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == server.limits.max_header_list_size
        update = p.next()  # the connection window: sized, not 2^31-1
        assert isinstance(update, WindowUpdateFrame) and update.window_increment == (1 << 20) - 65535


def test_invalid_preface_is_a_protocol_error(server):
    with Peer(server.port) as p:
        p.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        p.expect_goaway(PROTOCOL_ERROR)


# --- the normal exchange ------------------------------------------------------------------------
def test_a_call_works_and_padding_priority_and_continuation_are_understood(peer):
    peer.send(check_request(peer, 1))
    headers, body, trailers = peer.response(1)
    assert headers[":status"] == "200" and trailers["grpc-status"] == "0" and body[:1] == b"\x00"
    # HEADERS padded + priority, split in three CONTINUATIONs; DATA padded
    block = peer.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", HEALTH_CHECK),
                                 (":authority", "epp"), ("content-type", "application/grpc"), ("te", "trailers"),
                                 ("x-long", "v" * 300)])
    pad = 7
    head = bytes([pad]) + u32(1) + b"\x10" + block[:10] + b"\x00" * pad
    peer.send(raw(HEADERS, PADDED | PRIO, 3, head), raw(CONTINUATION, 0, 3, block[10:100]),
              raw(CONTINUATION, 0, 3, block[100:200]), raw(CONTINUATION, END_HEADERS, 3, block[200:]),
              peer.data(3, grpc_message(b""), end_stream=True, pad=20))
    assert peer.response(3)[2]["grpc-status"] == "0"


# --- §4 frames --------------------------------------------------------------------------------
def test_unknown_frame_types_and_flags_and_the_reserved_bit_are_ignored(peer):
    peer.send(raw(0x20, 0xFF, 0, b"whatever"), raw(PING, 0xFE & ~0x1, 0, b"flags-ok"),
              raw(PING, 0, 0x80000000, b"reserved"))
    acks = [f.opaque_data for f in peer.expect_alive() if isinstance(f, PingFrame)]
    assert acks == [b"flags-ok", b"reserved"]


def test_a_data_frame_of_2_14_bytes_is_accepted(peer):
    body = b"x" * (16384 - 5)
    peer.send(peer.headers(1), raw(DATA, END_STREAM, 1, grpc_message(body)))
    assert peer.response(1)[2]["grpc-status"] != ""  # answered (an undecodable request is INVALID_ARGUMENT)


@pytest.mark.parametrize("ftype", [DATA, HEADERS], ids=["data", "headers"])
def test_frame_larger_than_our_max_frame_size_is_a_frame_size_error(server, peer, ftype):
    if ftype == DATA:
        peer.send(peer.headers(1))
    peer.send(frame_head(ftype, END_HEADERS if ftype == HEADERS else 0, 1, server.limits.max_frame_size + 1))
    peer.expect_goaway(FRAME_SIZE_ERROR)


@pytest.mark.parametrize("block", [
    b"\x80",  # RFC 7541 §6.1: index 0
    b"\xff\xff\xff\xff\xff",  # §2.3.3: indexed field beyond both tables
    b"\x7f\x80\x01\x01a",  # §2.3.3: literal whose indexed name is beyond both tables (191)
    b"\x3f\xe1\x5f",  # §4.2: table size update above our SETTINGS_HEADER_TABLE_SIZE
    b"\x82\x20",  # §4.2: table size update after a field, not at the start of the block
    b"\x82\x86\x84\x41\x83\xff\xff\xff",  # §5.2: Huffman padding longer than 7 bits
    b"\x82\x86\x84\x41\x81\x18",  # §5.2: Huffman padding that is not the EOS prefix (zeros)
    b"\x82\x86\x84\x41\x84\xff\xff\xff\xff",  # §5.2: the EOS symbol in a string
], ids=["index-0", "index-beyond-tables", "literal-name-index-beyond-tables", "table-size-above-settings",
        "table-size-update-at-the-end", "huffman-padding-over-7-bits", "huffman-padding-not-eos", "huffman-eos"])
def test_hpack_errors_are_compression_errors(peer, block):
    peer.send(raw(HEADERS, END_HEADERS | END_STREAM, 1, block))
    peer.expect_goaway(COMPRESSION_ERROR)


@pytest.mark.parametrize("second", [raw(PRIORITY, 0, 1, u32(0) + b"\x10"), raw(HEADERS, END_HEADERS, 3, b"\x82"),
                                    raw(DATA, 0, 1, b""), raw(CONTINUATION, END_HEADERS, 3, b"\x82"),
                                    raw(0x20, 0, 1, b"extension")],
                         ids=["priority", "headers-other-stream", "data", "continuation-other-stream",
                              "unknown-frame-type"])
def test_anything_but_continuation_inside_a_header_block_is_a_protocol_error(peer, second):
    peer.send(raw(HEADERS, 0, 1, b"\x83"), second)
    peer.expect_goaway(PROTOCOL_ERROR)


# --- §5.1 stream states ----------------------------------------------------------------------
@pytest.mark.parametrize("frame", [raw(DATA, 0, 1, b"x"), raw(RST_STREAM, 0, 1, u32(CANCEL)),
                                   raw(WINDOW_UPDATE, 0, 1, u32(100)), raw(CONTINUATION, END_HEADERS, 1, b"\x82"),
                                   raw(DATA, 0, 2, b"x")],
                         ids=["data", "rst-stream", "window-update", "continuation", "data-on-even-stream"])
def test_frames_on_idle_streams_are_protocol_errors(peer, frame):
    peer.send(frame)
    peer.expect_goaway(PROTOCOL_ERROR)


def test_priority_on_an_idle_stream_is_allowed_and_does_not_open_it(peer):
    """PRIORITY on idle streams 9 and 3, then HEADERS open 3 and 5 normally (h2spec generic 3.3.5):
    PRIORITY did not make them lower than an id already used."""
    peer.send(raw(PRIORITY, 0, 9, u32(0) + b"\x10"), raw(PRIORITY, 0, 3, u32(0) + b"\x10"))
    peer.expect_alive()
    peer.send(check_request(peer, 3))
    assert peer.response(3)[2]["grpc-status"] == "0"
    peer.send(check_request(peer, 5))
    assert peer.response(5)[2]["grpc-status"] == "0"


def test_frames_a_half_closed_remote_or_closed_stream_may_receive(peer):
    """WINDOW_UPDATE, PRIORITY (exclusive, weight 256) and RST_STREAM on a half-closed (remote)
    stream, PRIORITY on the closed one: all accepted (h2spec generic 2.2-2.5)."""
    open_watch(peer, 1)
    peer.send(peer.data(1, b"", end_stream=True), raw(WINDOW_UPDATE, 0, 1, u32(100)),
              raw(PRIORITY, 0, 1, u32(0x80000000) + b"\xff"))
    peer.send(raw(RST_STREAM, 0, 1, u32(CANCEL)), raw(PRIORITY, 0, 1, u32(0) + b"\x10"))
    assert not [f for f in peer.expect_alive() if isinstance(f, (RstStreamFrame, GoAwayFrame))]


@pytest.mark.parametrize("state", ["half-closed-remote", "closed-by-reset", "closed-by-both-end-streams"])
def test_continuation_on_a_half_closed_or_closed_stream_is_a_protocol_error(peer, state):
    """No header block is in progress there, so it is a connection error (h2spec 5.1.7, 5.1.10,
    5.1.13 accept PROTOCOL_ERROR or STREAM_CLOSED)."""
    if state == "closed-by-both-end-streams":
        peer.send(check_request(peer, 1))
        peer.response(1)
    else:
        open_watch(peer, 1)
        peer.send(peer.data(1, b"", end_stream=True) if state == "half-closed-remote"
                  else raw(RST_STREAM, 0, 1, u32(CANCEL)))
    peer.send(raw(CONTINUATION, END_HEADERS, 1, b"\x82"))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_half_closed_remote_data_and_headers_are_stream_closed(peer):
    open_watch(peer, 1)
    peer.send(peer.data(1, b"", end_stream=True))  # the peer half-closes; Watch keeps our side open
    peer.send(peer.data(1, b"late"))
    peer.expect_rst(1, STREAM_CLOSED)
    open_watch(peer, 3)
    peer.send(peer.data(3, b"", end_stream=True), peer.headers(3, end_stream=True))
    peer.expect_rst(3, STREAM_CLOSED)


def test_closed_by_the_peer_reset_data_and_headers_are_stream_closed(peer):
    open_watch(peer, 1)
    peer.send(raw(RST_STREAM, 0, 1, u32(CANCEL)), peer.data(1, b"late"))
    peer.expect_rst(1, STREAM_CLOSED)
    open_watch(peer, 3)
    peer.send(raw(RST_STREAM, 0, 3, u32(CANCEL)), peer.headers(3, end_stream=True))
    peer.expect_rst(3, STREAM_CLOSED)


@pytest.mark.parametrize("late", ["data", "headers"])
def test_closed_by_both_end_streams_is_a_connection_error_stream_closed(peer, late):
    peer.send(check_request(peer, 1))
    peer.response(1)
    peer.send(peer.data(1, b"late") if late == "data" else peer.headers(1, end_stream=True))
    peer.expect_goaway(STREAM_CLOSED)


def test_window_update_and_rst_stream_after_close_are_ignored(peer):
    peer.send(check_request(peer, 1))
    peer.response(1)
    peer.send(raw(WINDOW_UPDATE, 0, 1, u32(10)), raw(RST_STREAM, 0, 1, u32(CANCEL)))
    assert not peer.expect_alive()


def test_data_on_a_skipped_stream_id_is_stream_closed(peer):
    """Opening stream 5 closes idle streams 1 and 3 (§5.1.1): DATA there is STREAM_CLOSED."""
    peer.send(check_request(peer, 5))
    peer.response(5)
    peer.send(peer.data(3, b"x"))
    peer.expect_rst(3, STREAM_CLOSED)


def test_frames_after_our_reset_are_ignored(peer):
    open_watch(peer, 1)
    peer.send(raw(WINDOW_UPDATE, 0, 1, u32(0)))  # a stream error: we reset stream 1
    peer.expect_rst(1, PROTOCOL_ERROR)
    peer.send(peer.data(1, b"in flight"), raw(WINDOW_UPDATE, 0, 1, u32(5)))
    assert not peer.expect_alive()


# --- §5.1.1 stream identifiers ----------------------------------------------------------------
def test_even_stream_id_is_a_protocol_error(peer):
    peer.send(peer.headers(2, end_stream=True))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_stream_id_lower_than_one_used_is_a_protocol_error(peer):
    peer.send(check_request(peer, 5))
    peer.response(5)
    peer.send(peer.headers(3, end_stream=True))
    peer.expect_goaway(PROTOCOL_ERROR)


# --- §5.3.1 dependencies ------------------------------------------------------------------------
def test_headers_depending_on_itself_is_a_stream_error(peer):
    block = peer.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", HEALTH_CHECK)])
    peer.send(raw(HEADERS, END_HEADERS | PRIO, 1, u32(1) + b"\x10" + block))
    peer.expect_rst(1, PROTOCOL_ERROR)


def test_priority_depending_on_itself_is_a_stream_error(peer):
    open_watch(peer, 1)
    peer.send(raw(PRIORITY, 0, 1, u32(1) + b"\x10"))
    peer.expect_rst(1, PROTOCOL_ERROR)


# --- §5.4 error handling ----------------------------------------------------------------------
def test_a_stream_error_leaves_other_streams_working(peer):
    open_watch(peer, 1)
    peer.send(raw(WINDOW_UPDATE, 0, 1, u32(0)))
    peer.expect_rst(1, PROTOCOL_ERROR)
    peer.send(check_request(peer, 3))
    assert peer.response(3)[2]["grpc-status"] == "0"


# --- §6.1 DATA ----------------------------------------------------------------------------------
def test_data_on_stream_0_is_a_protocol_error(peer):
    peer.send(raw(DATA, 0, 0, b"x"))
    peer.expect_goaway(PROTOCOL_ERROR)


@pytest.mark.parametrize("payload,code", [(b"\x05abc", PROTOCOL_ERROR), (b"\x05abcd", PROTOCOL_ERROR),
                                          (b"", FRAME_SIZE_ERROR)],
                         ids=["pad-longer-than-frame", "pad-as-long-as-frame", "zero-length-padded"])
def test_invalid_data_padding(peer, payload, code):
    open_watch(peer, 1)
    peer.send(raw(DATA, PADDED, 1, payload))
    peer.expect_goaway(code)


# --- §6.2 HEADERS -----------------------------------------------------------------------------
def test_headers_on_stream_0_is_a_protocol_error(peer):
    peer.send(raw(HEADERS, END_HEADERS, 0, b"\x82"))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_headers_with_invalid_pad_length_is_a_protocol_error(peer):
    peer.send(raw(HEADERS, END_HEADERS | PADDED, 1, b"\x09\x82\x86"))
    peer.expect_goaway(PROTOCOL_ERROR)


# --- §6.3 PRIORITY ------------------------------------------------------------------------------
def test_priority_on_stream_0_is_a_protocol_error(peer):
    peer.send(raw(PRIORITY, 0, 0, u32(1) + b"\x10"))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_priority_of_wrong_length_is_a_frame_size_error(peer):
    open_watch(peer, 1)
    peer.send(raw(PRIORITY, 0, 1, u32(0)))
    peer.expect_rst(1, FRAME_SIZE_ERROR)


# --- §6.4 RST_STREAM ----------------------------------------------------------------------------
def test_rst_stream_on_stream_0_is_a_protocol_error(peer):
    peer.send(raw(RST_STREAM, 0, 0, u32(CANCEL)))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_rst_stream_of_wrong_length_is_a_frame_size_error(peer):
    open_watch(peer, 1)
    peer.send(raw(RST_STREAM, 0, 1, b"\x00\x00\x08"))
    peer.expect_goaway(FRAME_SIZE_ERROR)


def test_rst_stream_with_an_unknown_code_is_just_a_reset(peer):
    open_watch(peer, 1)
    peer.send(raw(RST_STREAM, 0, 1, u32(0xDEAD)), raw(GOAWAY, 0, 0, u32(0) + u32(0xBEEF)))
    peer.expect_alive()


# --- §6.5 SETTINGS ------------------------------------------------------------------------------
@pytest.mark.parametrize("frame,code", [
    (raw(SETTINGS, 0x1, 0, u32(0) + b"\x00\x00"), FRAME_SIZE_ERROR),
    (raw(SETTINGS, 0, 1, b""), PROTOCOL_ERROR),
    (raw(SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00"), FRAME_SIZE_ERROR),
    (raw(SETTINGS, 0, 0, struct.pack(">HI", 0x2, 2)), PROTOCOL_ERROR),
    (raw(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2**31)), FLOW_CONTROL_ERROR),
    (raw(SETTINGS, 0, 0, struct.pack(">HI", 0x5, 0)), PROTOCOL_ERROR),
    (raw(SETTINGS, 0, 0, struct.pack(">HI", 0x5, 16383)), PROTOCOL_ERROR),
    (raw(SETTINGS, 0, 0, struct.pack(">HI", 0x5, 2**24)), PROTOCOL_ERROR),
], ids=["ack-with-payload", "on-a-stream", "length-not-multiple-of-6", "enable-push-2", "initial-window-2^31",
        "max-frame-size-0", "max-frame-size-below-2^14", "max-frame-size-above-2^24-1"])
def test_invalid_settings(peer, frame, code):
    peer.send(frame)
    peer.expect_goaway(code)


def test_every_defined_setting_is_accepted(peer):
    """Each SETTINGS parameter of §6.5.2 with a valid value (h2spec generic 3.5)."""
    values = [(0x1, 4096), (0x2, 0), (0x3, 100), (0x4, 65535), (0x5, 16384), (0x6, 65536), (0x8, 1), (0x9, 1)]
    peer.send(raw(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in values)), check_request(peer, 1))
    assert peer.response(1)[2]["grpc-status"] == "0"
    assert sum(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in peer.frames) == 2  # the handshake's, this one's


def test_a_smaller_header_table_is_signalled_in_our_next_block():
    """The peer shrinks its HPACK table (SETTINGS_HEADER_TABLE_SIZE 0): our next header block
    starts with a dynamic table size update (RFC 7541 §4.2), which h2's decoder insists on."""
    import socket

    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    with ServerThread(new_director()) as server:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        for sid in (1, 3):  # 3: after the update, nothing more is sent
            client.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "epp"),
                                      (":path", HEALTH_CHECK), ("content-type", "application/grpc"),
                                      ("te", "trailers")])
            client.send_data(sid, grpc_message(b""), end_stream=True)
            sock.sendall(client.data_to_send())
            events: list = []
            while not any(isinstance(e, h2.events.StreamEnded) for e in events):
                data = sock.recv(1 << 16)
                assert data, "server closed the connection"
                events += client.receive_data(data)  # raises on a block that ignores the new size
                sock.sendall(client.data_to_send())
            trailers = next(e for e in events if isinstance(e, h2.events.TrailersReceived))
            assert dict(trailers.headers)[b"grpc-status"] == b"0"
        assert client.decoder.header_table_size == 0
        sock.close()


def test_settings_are_acknowledged_and_unknown_ones_ignored(peer):
    peer.send(raw(SETTINGS, 0, 0, struct.pack(">HI", 0xABCD, 7)))
    assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in peer.expect_alive())


def test_settings_values_apply_in_order_and_windows_follow(peer):
    """INITIAL_WINDOW_SIZE 1 then 0 then 3: our DATA leaves in 3-byte frames, and a later
    increase (even to a window that had gone negative) releases the rest (§6.5.3, §6.9.2)."""
    peer.send(raw(SETTINGS, 0, 0, struct.pack(">HIHIHI", 4, 1, 4, 0, 4, 3)))
    peer.send(check_request(peer, 1))
    first = peer.until(lambda f: isinstance(f, DataFrame))
    assert len(first.data) == 3
    peer.send(raw(SETTINGS, 0, 0, struct.pack(">HI", 4, 65535)))
    headers, body, trailers = peer.response(1)
    assert trailers["grpc-status"] == "0" and len(first.data + body) == 7


# --- §6.7 PING ----------------------------------------------------------------------------------
def test_ping_is_answered_with_its_payload_and_acks_are_not(peer):
    peer.send(raw(PING, 0x1, 0, b"ack-only"))
    acks = [f.opaque_data for f in peer.expect_alive(b"answered") if isinstance(f, PingFrame)]
    assert acks == []


@pytest.mark.parametrize("frame,code", [(raw(PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
                                        (raw(PING, 0, 0, b"abc"), FRAME_SIZE_ERROR)],
                         ids=["on-a-stream", "3-bytes"])
def test_invalid_ping(peer, frame, code):
    peer.send(frame)
    peer.expect_goaway(code)


# --- §6.8 GOAWAY --------------------------------------------------------------------------------
def test_goaway_on_a_stream_is_a_protocol_error(peer):
    peer.send(raw(GOAWAY, 0, 1, u32(0) + u32(0)))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_after_the_peer_goaway_open_streams_finish(peer):
    peer.send(peer.headers(1), raw(GOAWAY, 0, 0, u32(1) + u32(0)), peer.data(1, grpc_message(b""), end_stream=True))
    assert peer.response(1)[2]["grpc-status"] == "0"


# --- §6.9 WINDOW_UPDATE and flow control --------------------------------------------------------
def test_window_update_of_zero(peer):
    open_watch(peer, 1)
    peer.send(raw(WINDOW_UPDATE, 0, 1, u32(0)))
    peer.expect_rst(1, PROTOCOL_ERROR)
    peer.send(raw(WINDOW_UPDATE, 0, 0, u32(0)))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_window_update_of_wrong_length_is_a_frame_size_error(peer):
    peer.send(raw(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"))
    peer.expect_goaway(FRAME_SIZE_ERROR)


def test_window_overflow(peer):
    open_watch(peer, 1)
    peer.send(raw(WINDOW_UPDATE, 0, 1, u32(2**31 - 1)))
    peer.expect_rst(1, FLOW_CONTROL_ERROR)
    peer.send(raw(WINDOW_UPDATE, 0, 0, u32(2**31 - 1)))
    peer.expect_goaway(FLOW_CONTROL_ERROR)


def test_initial_window_size_change_overflowing_a_window_is_a_flow_control_error(peer):
    open_watch(peer, 1)
    peer.send(raw(WINDOW_UPDATE, 0, 1, u32(2**31 - 1 - 65535)))  # the stream window is now 2^31-1
    peer.send(raw(SETTINGS, 0, 0, struct.pack(">HI", 4, 65535 + 100)))  # +100: more than the Watch answer used
    peer.expect_goaway(FLOW_CONTROL_ERROR)


def test_data_beyond_our_stream_window_is_a_flow_control_error(peer):
    open_watch(peer, 1)
    peer.send(raw(DATA, 0, 1, b"\x00" * 65535), raw(DATA, 0, 1, b"x"))
    peer.expect_rst(1, FLOW_CONTROL_ERROR)


def test_data_beyond_our_connection_window_is_a_flow_control_error(peer):
    """The connection window (1 MiB, credited as frames are read) still binds a stream that
    was granted window for a whole 2 MiB message."""
    peer.send(peer.headers(1), raw(DATA, 0, 1, grpc_message(b"x" * (2 << 20))[:1000]))
    peer.until(lambda f: isinstance(f, WindowUpdateFrame) and f.stream_id == 1)
    peer.send(raw(DATA, 0, 1, b"x" * (400 << 10)))  # 1 MiB - 1000 - 400 KiB of connection credit left
    peer.send(raw(DATA, 0, 1, b"x" * (1 << 20)))
    peer.expect_goaway(FLOW_CONTROL_ERROR)


def test_our_data_respects_the_peer_window_and_frame_size():
    """The h2 library as the client checks every frame we send against its windows and limits."""
    import h2.config
    import h2.connection
    import h2.events
    import socket

    from extproc_support import REQ_HEADERS, body_msg, headers_msg

    with ServerThread(new_director()) as server:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000, h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384})
        client.initiate_connection()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(client.data_to_send())
        body = b'{"model": "m1", "prompt": "' + b"p" * 150_000 + b'"}'
        msgs = grpc_message(headers_msg(REQ_HEADERS).SerializeToString()) + \
            grpc_message(body_msg(body, True).SerializeToString())
        client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "epp"),
                                (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
                                ("content-type", "application/grpc"), ("te", "trailers")])
        received = bytearray()
        sent = 0
        while len(received) < len(body):
            while sent < len(msgs) and client.local_flow_control_window(1) > 0:
                n = min(client.local_flow_control_window(1), client.max_outbound_frame_size, len(msgs) - sent)
                client.send_data(1, msgs[sent:sent + n])
                sent += n
            sock.sendall(client.data_to_send())
            data = sock.recv(1 << 16)
            assert data, "server closed the connection"
            for ev in client.receive_data(data):  # raises on any protocol violation of ours
                if isinstance(ev, h2.events.DataReceived):
                    assert len(ev.data) <= 16384
                    received += ev.data
                    client.acknowledge_received_data(ev.flow_controlled_length, 1)
                assert not isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)), ev
        sock.close()
        assert len(received) > len(body)  # the routing answer + the body echoed in chunks


# --- §6.10 CONTINUATION -------------------------------------------------------------------------
def test_continuation_on_stream_0_or_after_end_headers_is_a_protocol_error(peer):
    peer.send(raw(HEADERS, 0, 1, b"\x83"), raw(CONTINUATION, END_HEADERS, 0, b"\x86"))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_continuation_after_end_headers_is_a_protocol_error(peer):
    peer.send(peer.headers(1), raw(CONTINUATION, END_HEADERS, 1, b"\x86"))
    peer.expect_goaway(PROTOCOL_ERROR)


@pytest.mark.parametrize("case", ["data-after-continuation", "continuation-after-the-last-continuation",
                                  "continuation-after-data"])
def test_continuation_out_of_sequence_is_a_protocol_error(peer, case):
    """h2spec 6.10.2, 6.10.5 and 6.10.6."""
    block = peer.encoder.encode(GOOD + [("content-type", "application/grpc")])
    if case == "data-after-continuation":
        frames = [raw(HEADERS, 0, 1, block[:3]), raw(CONTINUATION, 0, 1, block[3:]), raw(DATA, 0, 1, b"")]
    elif case == "continuation-after-the-last-continuation":
        frames = [raw(HEADERS, 0, 1, block[:3]), raw(CONTINUATION, END_HEADERS, 1, block[3:]),
                  raw(CONTINUATION, END_HEADERS, 1, b"\x82")]
    else:
        frames = [raw(HEADERS, END_HEADERS, 1, block), raw(DATA, 0, 1, grpc_message(b"")),
                  raw(CONTINUATION, END_HEADERS, 1, b"\x82")]
    peer.send(*frames)
    peer.expect_goaway(PROTOCOL_ERROR)


@pytest.mark.parametrize("max_frame", [16384, 20000])
def test_our_large_header_blocks_are_split_into_continuation(server, max_frame):
    """An UNIMPLEMENTED answer names the 30 KiB path: more than the peer's SETTINGS_MAX_FRAME_SIZE
    (the default, and a larger one: frames follow the peer's value, not a constant)."""
    path = "/" + "p" * (30 << 10)
    with Peer(server.port) as p:
        peer = p.handshake({SettingsFrame.MAX_FRAME_SIZE: max_frame})
        peer.send(peer.headers(1, path, end_stream=True))
        frames = []
        while not frames or "END_HEADERS" not in frames[-1].flags:
            frames.append(peer.until(lambda f: getattr(f, "stream_id", 0) == 1))
    assert isinstance(frames[0], HeadersFrame) and len(frames) >= 2
    assert max(len(f.data) for f in frames) == max_frame
    fields = dict(peer.decoder.decode(b"".join(f.data for f in frames)))
    assert fields["grpc-status"] == "12" and fields["grpc-message"].endswith("p" * 100)


# --- §8.1-8.3 HTTP message exchange -------------------------------------------------------------
GOOD = [(":method", "POST"), (":scheme", "http"), (":path", HEALTH_CHECK), (":authority", "epp")]


@pytest.mark.parametrize("fields", [
    GOOD + [(":unknown", "x")],
    GOOD + [(":status", "200")],
    [(":method", "POST"), ("x-a", "1"), (":scheme", "http"), (":path", HEALTH_CHECK)],
    GOOD + [("connection", "keep-alive")],
    GOOD + [("te", "gzip")],
    GOOD + [("X-Upper", "1")],
    [(":method", "POST"), (":scheme", "http"), (":path", "")],
    [(":scheme", "http"), (":path", HEALTH_CHECK)],
    [(":method", "POST"), (":path", HEALTH_CHECK)],
    [(":method", "POST"), (":scheme", "http")],
    GOOD + [(":method", "POST")],
    GOOD + [(":path", "/x")],
    GOOD + [(":scheme", "https")],
    GOOD + [("x-bad", "a\rb")],
], ids=["unknown-pseudo", "response-pseudo", "pseudo-after-regular", "connection-specific", "te-not-trailers",
        "uppercase-name", "empty-path", "no-method", "no-scheme", "no-path", "duplicate-method", "duplicate-path",
        "duplicate-scheme", "cr-in-value"])
def test_malformed_requests_are_stream_errors(peer, fields):
    peer.send(peer.headers(1, fields=fields, end_stream=True))
    peer.expect_rst(1, PROTOCOL_ERROR)


def test_trailers_with_a_pseudo_header_or_without_end_stream_are_stream_errors(peer):
    peer.send(peer.headers(1), peer.data(1, grpc_message(b"")), peer.headers(1, fields=[(":path", "/x")],
                                                                             end_stream=True))
    peer.expect_rst(1, PROTOCOL_ERROR)
    peer.send(peer.headers(3), peer.headers(3, fields=[("x-trailer", "1")]))
    peer.expect_rst(3, PROTOCOL_ERROR)


@pytest.mark.parametrize("sizes", [[3], [2, 2]], ids=["one-frame", "two-frames"])
def test_content_length_not_matching_data_is_a_stream_error(peer, sizes):
    peer.send(peer.headers(1, extra=[("content-length", "5")]))
    for i, n in enumerate(sizes):
        peer.send(peer.data(1, b"\x00" * n, end_stream=i == len(sizes) - 1))
    peer.expect_rst(1, PROTOCOL_ERROR)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_plain_http_requests_get_an_answer(peer, method):
    """h2spec generic 4.1-4.2: a request that is not a gRPC call still gets a response."""
    peer.send(peer.headers(1, fields=[(":method", method), (":scheme", "http"), (":path", "/"),
                                      (":authority", "epp")], end_stream=True))
    headers, body, _ = peer.response(1)
    assert headers[":status"] == "200" and headers["grpc-status"] == "12" and body == b""


def test_a_request_with_trailers_is_answered(peer):
    """h2spec generic 4.4: HEADERS, DATA, then a trailer block with END_STREAM."""
    peer.send(peer.headers(1), peer.data(1, grpc_message(b"")),
              peer.headers(1, fields=[("x-trailer", "1")], end_stream=True))
    assert peer.response(1)[2]["grpc-status"] == "0"


def test_push_promise_from_a_client_is_a_protocol_error(peer):
    peer.send(raw(PUSH_PROMISE, END_HEADERS, 1, u32(2) + b"\x82"))
    peer.expect_goaway(PROTOCOL_ERROR)


# --- gRPC over the stream -----------------------------------------------------------------------
@pytest.mark.parametrize("cut", [b"\x00" + u32(100) + b"only ten..", b"\x00\x00\x00"],
                         ids=["body-cut", "prefix-cut"])
def test_message_cut_short_by_end_stream_is_grpc_internal(peer, cut):
    """A length prefix promising more than arrives before END_STREAM (or only part of a
    prefix): INTERNAL (13), not OK."""
    peer.send(peer.headers(1, "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
              peer.data(1, cut, end_stream=True))
    _, body, trailers = peer.response(1)
    assert body == b"" and trailers["grpc-status"] == "13"


def test_trailers_only_for_unknown_methods(peer):
    peer.send(peer.headers(1, "/no.Such/Method", end_stream=True))
    headers, body, _ = peer.response(1)
    assert headers[":status"] == "200" and headers["grpc-status"] == "12" and body == b""


def test_an_exception_in_one_stream_costs_that_stream_only(server, peer, monkeypatch):
    from epp.extproc.fastserver import _HealthStream

    original = _HealthStream.on_message

    def on_message(self, raw_msg):
        if raw_msg == b"boom":
            raise RuntimeError("a bug")
        return original(self, raw_msg)

    monkeypatch.setattr(_HealthStream, "on_message", on_message)
    open_watch(peer, 1)
    peer.send(peer.headers(3), peer.data(3, grpc_message(b"boom"), end_stream=True))
    _, _, trailers = peer.response(3)
    assert trailers["grpc-status"] == str(13)
    peer.send(check_request(peer, 5))
    assert peer.response(5)[2]["grpc-status"] == "0"
    assert not any(isinstance(f, GoAwayFrame) for f in peer.frames)


def test_an_exception_while_opening_a_stream_costs_that_stream_only(peer, monkeypatch):
    from epp.extproc.fastserver import _Connection

    original = _Connection.open_stream

    def open_stream(self, sid, block):
        if block.path == b"/boom":
            raise RuntimeError("a bug")
        return original(self, sid, block)

    monkeypatch.setattr(_Connection, "open_stream", open_stream)
    peer.send(peer.headers(1, "/boom", end_stream=True))
    peer.expect_rst(1, INTERNAL_ERROR)
    peer.send(check_request(peer, 3))
    assert peer.response(3)[2]["grpc-status"] == "0"


def test_an_exception_after_a_stream_ended_costs_nothing_more(peer, monkeypatch):
    """The handler answers, the stream ends (and is forgotten), then the handler raises."""
    from epp.extproc.fastserver import _HealthStream

    original = _HealthStream.on_message

    def on_message(self, raw_msg):
        original(self, raw_msg)
        raise RuntimeError("a bug after the answer")

    monkeypatch.setattr(_HealthStream, "on_message", on_message)
    peer.send(check_request(peer, 1))
    assert peer.response(1)[2]["grpc-status"] == "0"
    assert not any(isinstance(f, (GoAwayFrame, RstStreamFrame)) for f in peer.expect_alive())


def test_an_exception_on_a_streamed_chunk_costs_that_stream_only(server, peer, monkeypatch):
    """The per-token path (full duplex, one chunk per DATA frame, handled from the frame loop)."""
    from extproc_support import REQ_HEADERS, body_msg, completion_body, headers_msg

    from epp.extproc.fastserver import _ProcessStream
    from epp.extproc.stream import ExtProcStream

    def duplex_chunk(self, data):
        raise RuntimeError("a bug on the chunk path")

    fast_calls = []
    fast_data = _ProcessStream.fast_data
    monkeypatch.setattr(ExtProcStream, "duplex_chunk", duplex_chunk)
    monkeypatch.setattr(_ProcessStream, "fast_data", lambda self, payload: fast_calls.append(1) or fast_data(self, payload))

    def msg(m) -> bytes:
        return grpc_message(m.SerializeToString())
    process = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
    peer.send(peer.headers(1, process), peer.data(1, msg(headers_msg(REQ_HEADERS))),
              peer.data(1, msg(body_msg(completion_body(), True))))
    peer.until(lambda f: isinstance(f, DataFrame) and f.stream_id == 1)
    peer.send(peer.data(1, msg(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))),
              peer.data(1, msg(body_msg(b"data: {}\n\n", False, response=True))))
    _, _, trailers = peer.response(1)
    assert trailers["grpc-status"] == "13" and fast_calls  # the chunk took the per-token path
    peer.send(check_request(peer, 3))
    assert peer.response(3)[2]["grpc-status"] == "0"
    assert not any(isinstance(f, GoAwayFrame) for f in peer.frames)
    assert server.wait_for(lambda: server.service.active_streams == 0)


def test_hpack_state_survives_refused_and_malformed_streams(peer):
    """Blocks of streams that are refused or malformed are still decoded: the dynamic table
    the peer's encoder assumes stays in sync (a later stream decodes right)."""
    enc = peer.encoder
    bad = enc.encode(GOOD + [("x-indexed", "value-1"), ("te", "gzip")])
    peer.send(raw(HEADERS, END_HEADERS | END_STREAM, 1, bad))
    peer.expect_rst(1, PROTOCOL_ERROR)
    good = enc.encode(GOOD + [("content-type", "application/grpc"), ("x-indexed", "value-1")])
    peer.send(raw(HEADERS, END_HEADERS, 3, good), peer.data(3, grpc_message(b""), end_stream=True))
    assert peer.response(3)[2]["grpc-status"] == "0"

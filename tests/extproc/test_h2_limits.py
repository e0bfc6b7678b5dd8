"""What a hostile or careless HTTP/2 peer can cost the fast core, measured in the server object.

Each case drives the attack over real TCP with the independent peer (h2peer.py) and reads the
server's own state (streams held, bytes buffered, window granted, socket buffer) on its event
loop, so the bounds are checked exactly, never by timing.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from extproc_support import new_director
from h2peer import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    HEADERS,
    NO_ERROR,
    PROCESS,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS_TIMEOUT,
    Peer,
    ServerThread,
    grpc_message,
    raw,
    u32,
)
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame

from epp.extproc.h2.limits import Limits


@pytest.fixture(autouse=True)
def extproc_core():
    """Overrides the package-wide parametrisation: these tests speak HTTP/2 to the fast core."""
    return "fast"


@pytest.fixture(scope="module")
def server():
    with ServerThread(new_director()) as s:
        yield s


def only_connection(server: ServerThread):
    conns = server.connections()
    assert len(conns) == 1
    return conns[0]


# --- header blocks --------------------------------------------------------------------------------
def test_continuation_flood_is_refused_at_the_header_list_limit(server):
    limit = server.limits.max_header_list_size
    with Peer(server.port) as p:
        p.handshake()
        p.send(raw(HEADERS, 0, 1, b"\x83"))
        chunk = b"\x00" * 4096
        sent = 1
        while sent + len(chunk) <= limit:
            p.send(raw(CONTINUATION, 0, 1, chunk))
            sent += len(chunk)
        conn = only_connection(server)  # everything up to the limit is accepted and held, nothing more
        assert server.wait_for(lambda: conn.header_block is not None and len(conn.header_block) == sent)
        p.send(raw(CONTINUATION, 0, 1, chunk))  # one more frame: over the limit
        p.expect_goaway(ENHANCE_YOUR_CALM)


def test_empty_continuation_flood_is_refused_by_count(server):
    with Peer(server.port) as p:
        p.handshake()
        p.send(raw(HEADERS, 0, 1, b"\x83"), *[raw(CONTINUATION, 0, 1, b"")] * (server.limits.max_continuations + 1))
        p.expect_goaway(ENHANCE_YOUR_CALM)


def test_header_list_larger_than_advertised_when_decoded_ends_the_connection(server):
    """A small block can expand (indexed references to one big table entry): the decoded
    size is checked against SETTINGS_MAX_HEADER_LIST_SIZE as well."""
    with Peer(server.port) as p:
        p.handshake()
        name, value = b"x-big", b"v" * 3000
        insert = b"\x40" + bytes([len(name)]) + name + b"\x7f" + _hpack_int(len(value) - 127) + value
        block = insert + b"\xbe" * 30  # index 62 (the entry just added) 30 times: ~90 KB decoded
        p.send(raw(HEADERS, END_HEADERS | END_STREAM, 1, block))
        p.expect_goaway(ENHANCE_YOUR_CALM)


def _hpack_int(n: int) -> bytes:
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# --- concurrency and memory given back ------------------------------------------------------------
def test_concurrent_streams_are_capped_and_memory_is_given_back(server):
    limit = server.limits.max_concurrent_streams
    extra = 20
    with Peer(server.port) as p:
        p.handshake()
        assert p.server_settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == limit
        sids = [1 + 2 * i for i in range(limit + extra)]
        p.send(*[p.headers(sid, PROCESS) for sid in sids])
        refused = set()
        while len(refused) < extra:
            f = p.until(lambda f: isinstance(f, (RstStreamFrame, GoAwayFrame)))
            assert isinstance(f, RstStreamFrame) and f.error_code == REFUSED_STREAM
            refused.add(f.stream_id)
        assert refused == set(sids[limit:])  # the ones beyond the limit, not others
        conn = only_connection(server)
        assert server.call(lambda: len(conn.streams)) == limit
        assert server.service.active_streams == limit
        p.send(*[raw(RST_STREAM, 0, sid, u32(8)) for sid in sids[:limit]])
        p.expect_alive()
        state = server.call(lambda: (len(conn.streams), len(conn.closed_recent) + len(conn.closed_older),
                                     conn.pending_bytes, conn.granted_total, len(conn.blocked), len(conn.timers)))
        assert state[0] == 0 and state[1] <= 256 and state[2:5] == (0, 0, 0) and state[5] <= 2
        assert server.service.active_streams == 0 and server.director.in_flight == 0
        p.send(p.headers(sids[-1] + 2, "/grpc.health.v1.Health/Check"),
               p.data(sids[-1] + 2, grpc_message(b""), end_stream=True))
        assert p.response(sids[-1] + 2)[2]["grpc-status"] == "0"  # and new streams work again


def test_before_our_settings_are_acknowledged_a_first_burst_is_accepted():
    """A peer may open streams before it has seen our limit (RFC 9113 §5.1.2), as Envoy does
    on every new connection: they are accepted (up to 1000); after its ACK the limit holds."""
    with ServerThread(new_director(), Limits(max_concurrent_streams=2)) as server, Peer(server.port) as p:
        p.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + raw(4, 0, 0))
        watch = "/grpc.health.v1.Health/Watch"
        p.send(*[p.headers(sid, watch) + p.data(sid, grpc_message(b"")) for sid in (1, 3, 5, 7, 9)])
        answered = set()
        while len(answered) < 5:
            f = p.next()
            assert not isinstance(f, (RstStreamFrame, GoAwayFrame)), f
            if isinstance(f, DataFrame):
                answered.add(f.stream_id)
        p.send(raw(4, 0x1, 0))  # now the peer knows the limit (2): 5 streams are open already
        p.send(p.headers(11, watch))
        p.expect_rst(11, REFUSED_STREAM)


# --- write backpressure ---------------------------------------------------------------------------
def test_a_peer_that_does_not_read_stops_being_read():
    """PINGs from a peer that never reads the ACKs: once the socket is full the server stops
    reading, so what it buffers for the peer stays near the high-water mark."""
    limits = Limits(write_high_water=64 << 10, write_low_water=16 << 10)
    with ServerThread(new_director(), limits) as server:
        sock = socket.socket()
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # small kernel buffers fill quickly
            sock.setsockopt(socket.SOL_SOCKET, opt, 32768)
        sock.connect(("127.0.0.1", server.port))
        sock.settimeout(5)
        p = Peer(server.port, sock=sock).handshake()
        conn = only_connection(server)

        def shrink() -> None:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, opt, 32768)
        server.call(shrink)
        sock.setblocking(False)
        pings = memoryview(raw(6, 0, 0, b"12345678") * 4096)
        sent, stalled_at = 0, None
        while sent < (64 << 20):
            try:
                pos = sent % len(pings)
                sent += sock.send(pings[pos:])
                stalled_at = None
            except BlockingIOError:
                stalled_at = stalled_at or time.monotonic()
                if time.monotonic() - stalled_at > 0.3:  # the server no longer reads: stalled for good
                    break
                time.sleep(0.005)
        buffered, paused = server.call(lambda: (conn.transport.get_write_buffer_size(), conn.write_paused))
        assert paused and buffered <= limits.write_high_water + (256 << 10), (buffered, sent)
        assert sent < (8 << 20)  # the peer could not push on: the server stopped reading
        sock.setblocking(True)
        sock.settimeout(10)
        done = threading.Thread(target=p.until, args=(lambda f: isinstance(f, PingFrame) and f.opaque_data == b"drained!",))
        done.start()  # reading everything resumes the server ...
        while sent % 17:  # (finish the frame cut by the last non-blocking send)
            sent += sock.send(pings[sent % len(pings):sent % len(pings) + 17 - sent % 17])
        p.send(p.ping(b"drained!"))
        done.join(10)
        acks = sum(isinstance(f, PingFrame) for f in p.frames)
        assert acks == sent // 17 + 1  # ... and nothing was lost: every PING answered
        assert server.call(lambda: conn.write_paused) is False
        sock.close()


# --- inbound windows --------------------------------------------------------------------------------
def test_a_large_message_is_granted_exactly_its_length(server):
    with Peer(server.port) as p:
        p.handshake()
        assert p.server_settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 65535
        message = grpc_message(b"x" * (2 << 20))
        p.send(p.headers(1, PROCESS), raw(DATA, 0, 1, message[:1000]))
        grant = p.until(lambda f: isinstance(f, WindowUpdateFrame) and f.stream_id == 1)
        assert 1000 + (65535 - 1000) + grant.window_increment == len(message)
        conn = only_connection(server)
        assert server.call(lambda: (conn.granted_total, conn.streams[1].held)) == (len(message), 1000)
        p.send_flowing(1, message[1000:] + b"x")  # one byte more than granted
        p.expect_rst(1, FLOW_CONTROL_ERROR)
        assert server.call(lambda: conn.granted_total) == 0


def test_grants_wait_for_the_connection_budget():
    with ServerThread(new_director(), Limits(buffer_budget=3 << 20)) as server:
        with Peer(server.port) as p:
            p.handshake()
            message = grpc_message(b"x" * (2 << 20))
            for sid in (1, 3, 5):
                p.send(p.headers(sid, PROCESS), raw(DATA, 0, sid, message[:60000]))
            before = p.expect_alive()
            granted = {f.stream_id for f in before if isinstance(f, WindowUpdateFrame) and f.stream_id}
            assert granted == {1}  # one 2 MiB grant fits the 3 MiB budget, a second would not
            conn = only_connection(server)
            held, total = server.call(lambda: ([conn.streams[s].held for s in (1, 3, 5)], conn.granted_total))
            assert held == [60000] * 3 and total == len(message) <= 3 << 20
            p.send_flowing(1, message[60000:])  # stream 1's message completes: 3 is next
            f = p.until(lambda f: isinstance(f, WindowUpdateFrame) and f.stream_id in (3, 5))
            assert f.stream_id == 3
            assert server.call(lambda: conn.granted_total) == len(message)


# --- rapid reset ---------------------------------------------------------------------------------------
def test_rapid_reset_is_capped_and_other_connections_are_served():
    limits = Limits(premature_reset_burst=100, premature_resets_per_second=10)
    with ServerThread(new_director(), limits) as server, Peer(server.port) as bystander:
        bystander.handshake()
        with Peer(server.port) as p:
            p.handshake()
            pairs = b"".join(p.headers(1 + 2 * i, PROCESS) + raw(RST_STREAM, 0, 1 + 2 * i, u32(8)) for i in range(5000))
            p.flood(pairs)
            goaway = [f for f in p.frames if isinstance(f, GoAwayFrame)]
            assert goaway and goaway[0].error_code == ENHANCE_YOUR_CALM
            assert goaway[0].last_stream_id < 2 * (100 + 2 * limits.max_streams_after_goaway)
        assert server.service.active_streams == 0
        bystander.send(bystander.headers(1), bystander.data(1, grpc_message(b""), end_stream=True))
        assert bystander.response(1)[2]["grpc-status"] == "0"


def test_resets_after_an_answer_are_normal_and_not_counted():
    """Envoy resets every ext_proc stream once the request is done: that is never an attack."""
    from extproc_support import REQ_HEADERS, headers_msg

    limits = Limits(premature_reset_burst=10, premature_resets_per_second=1)
    with ServerThread(new_director(), limits) as server, Peer(server.port) as p:
        p.handshake()
        get = dict(REQ_HEADERS, **{":method": "GET"})
        request = grpc_message(headers_msg(get, eos=True).SerializeToString())  # answered at once
        for i in range(100):
            sid = 1 + 2 * i
            p.send(p.headers(sid, PROCESS), p.data(sid, request))
            p.until(lambda f: isinstance(f, DataFrame) and f.stream_id == sid)
            p.send(raw(RST_STREAM, 0, sid, u32(8)))
        p.expect_alive()
        assert server.service.active_streams == 0


def test_after_goaway_new_streams_are_refused():
    with ServerThread(new_director()) as server, Peer(server.port) as p:
        p.handshake()
        conn = only_connection(server)
        p.send(p.headers(1, "/grpc.health.v1.Health/Watch"), p.data(1, grpc_message(b"")))
        p.until(lambda f: isinstance(f, DataFrame) and f.stream_id == 1)
        server.call(conn.shutdown)
        f = p.until(lambda f: isinstance(f, GoAwayFrame))
        assert (f.error_code, f.last_stream_id) == (NO_ERROR, 1)
        p.send(p.headers(3, end_stream=True))
        p.expect_rst(3, REFUSED_STREAM)
        p.send(raw(RST_STREAM, 0, 1, u32(8)))  # the last stream ends: the connection closes
        p.expect_closed()


def test_new_streams_are_refused_while_the_peer_does_not_take_our_data():
    with ServerThread(new_director(), Limits(max_blocked_bytes=100)) as server, Peer(server.port) as p:
        p.handshake({SettingsFrame.INITIAL_WINDOW_SIZE: 0})
        p.send(p.headers(1), p.data(1, grpc_message(b""), end_stream=True))  # its answer waits for window
        p.expect_alive()
        p.send(p.headers(3, "/grpc.health.v1.Health/List"), p.data(3, grpc_message(b""), end_stream=True))
        p.send(p.headers(5, end_stream=True))
        p.expect_rst(5, REFUSED_STREAM)


# --- timeouts and the connection limit --------------------------------------------------------------
def test_idle_connections_are_closed_gracefully_and_busy_ones_kept():
    with ServerThread(new_director(), Limits(idle_timeout=0.3)) as server:
        with Peer(server.port) as idle, Peer(server.port) as busy:
            idle.handshake()
            busy.handshake()
            busy.send(busy.headers(1, "/grpc.health.v1.Health/Watch"), busy.data(1, grpc_message(b"")))
            first = idle.until(lambda f: isinstance(f, GoAwayFrame))
            assert (first.error_code, first.last_stream_id) == (NO_ERROR, 2**31 - 1)  # notice: stop opening
            final = idle.until(lambda f: isinstance(f, GoAwayFrame))
            assert (final.error_code, final.last_stream_id) == (NO_ERROR, 0)
            idle.expect_closed()
            assert not any(isinstance(f, GoAwayFrame) for f in busy.expect_alive())


def test_unacknowledged_settings_time_out():
    with ServerThread(new_director(), Limits(settings_timeout=0.3)) as server:
        with Peer(server.port) as p:
            p.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + raw(4, 0, 0))  # never ACKs the server's SETTINGS
            p.expect_goaway(SETTINGS_TIMEOUT)
        with Peer(server.port) as silent:  # nothing at all: the same timeout ends it
            silent.expect_goaway(SETTINGS_TIMEOUT)


def test_connections_beyond_the_limit_are_refused():
    with ServerThread(new_director(), Limits(max_connections=2)) as server:
        with Peer(server.port) as a, Peer(server.port) as b:
            a.handshake()
            b.handshake()
            with Peer(server.port) as c:
                c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                c.expect_goaway(ENHANCE_YOUR_CALM)
            a.expect_alive()
        assert server.wait_for(lambda: len(server.server.connections) == 0)
        with Peer(server.port) as d:
            d.handshake().expect_alive()

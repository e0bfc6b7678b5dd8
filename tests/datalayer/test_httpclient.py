"""The scrape client (epp/datalayer/httpclient.py) against real servers on 127.0.0.1.

Most servers here are raw asyncio servers that write exactly the bytes a test scripts, so
framing, keep-alive and misbehaviour are under the test's control; TLS and gzip also run
against aiohttp servers. The split-anywhere property test feeds the connection protocol
directly, because TCP would not preserve the split points it wants to try.
"""

from __future__ import annotations

import asyncio
import gzip
import pickle
import ssl
import zlib
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web
from dl_helpers import plugin
from local_servers import serve_app
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.errors import DataSourceError
from epp.datalayer.httpclient import FetchError, ScrapeClient, _Connection

PAGE = b"".join(b"vllm:metric_%d{model=\"m\"} %d\n" % (i, i) for i in range(2000))  # ~60 KB
Handler = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[bool]]


def ok(body: bytes, *headers: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + b"".join(h + b"\r\n" for h in headers)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(body: bytes, size: int = 1000) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def until_close(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body


class RawServer:
    """Calls ``handler(request_number, request_head, writer)`` per request; counts connections.

    The handler writes whatever it likes and returns whether to keep reading requests on
    that connection (False closes it).
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> "RawServer":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "/metrics") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                self.requests.append(head)
                if not await self.handler(len(self.requests), head, writer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # stop() cancels hanging handlers; ending quietly keeps asyncio from logging it
        finally:
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def answer(response: bytes, keep: bool = True) -> Handler:
    async def handler(n: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(response)
        return keep

    return handler


@pytest.fixture
async def raw():
    started: list[RawServer] = []

    async def make(handler: Handler) -> RawServer:
        srv = await RawServer(handler).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop()


@pytest.fixture
async def client():
    clients: list[ScrapeClient] = []

    def make(**kw: Any) -> ScrapeClient:
        kw.setdefault("timeout", 2.0)
        kw.setdefault("max_bytes", 1 << 20)
        c = ScrapeClient(**kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


# -- framing and keep-alive -------------------------------------------------------------------

@pytest.mark.parametrize("response", [ok(PAGE), chunked(PAGE), until_close(PAGE)],
                         ids=["content-length", "chunked", "until-close"])
async def test_each_framing_gives_the_exact_body(raw, client, response):
    keep = not response.startswith(until_close(b""))
    srv = await raw(answer(response, keep=keep))
    c = client()
    for _ in range(3):
        assert await c.get(srv.url()) == PAGE
    assert len(srv.requests) == 3
    assert srv.connections == (1 if keep else 3)  # a close-delimited body cannot share its connection


async def test_requests_carry_the_headers_and_keep_alive_reuses_one_connection(raw, client):
    srv = await raw(answer(ok(PAGE)))
    c = client(headers={"Accept": "text/plain", "Authorization": "Bearer t0"})
    for _ in range(20):
        await c.get(srv.url("/metrics?x=1"))
    assert srv.connections == 1 and len(srv.requests) == 20
    head = srv.requests[0].decode()
    assert head.startswith("GET /metrics?x=1 HTTP/1.1\r\n")
    for line in (f"Host: 127.0.0.1:{srv.port}", "Accept: text/plain", "Authorization: Bearer t0",
                 "User-Agent: epp-datalayer", "Accept-Encoding: identity"):
        assert line in head.split("\r\n")
    c.set_header("Authorization", "Bearer t1")  # a rotated token is on the next request
    await c.get(srv.url())
    assert "Authorization: Bearer t1" in srv.requests[-1].decode()
    with pytest.raises(ValueError, match="line break"):
        c.set_header("Authorization", "Bearer x\r\nX-Evil: 1")


async def test_concurrent_gets_to_one_host_open_more_connections(raw, client):
    release = asyncio.Event()

    async def slow(n: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(ok(b"page %d" % n))
        return True

    srv = await raw(slow)
    c = client()
    gets = [asyncio.ensure_future(c.get(srv.url())) for _ in range(3)]
    while len(srv.requests) < 3:
        await asyncio.sleep(0.005)
    release.set()
    assert sorted(await asyncio.gather(*gets)) == [b"page 1", b"page 2", b"page 3"]
    assert srv.connections == 3 and c.open_connections == 3
    for _ in range(6):  # sequential GETs afterwards reuse the pooled connections
        await c.get(srv.url())
    assert srv.connections == 3


async def test_connection_close_is_honoured(raw, client):
    # The server announces close but keeps the socket open: the client must not reuse it.
    srv = await raw(answer(ok(b"bye", b"Connection: close"), keep=True))
    c = client()
    assert await c.get(srv.url()) == b"bye"
    assert await c.get(srv.url()) == b"bye"
    assert srv.connections == 2


async def test_http10_without_keep_alive_reads_until_close(raw, client):
    srv = await raw(answer(b"HTTP/1.0 200 OK\r\n\r\n" + PAGE, keep=False))
    c = client()
    assert await c.get(srv.url()) == PAGE
    assert await c.get(srv.url()) == PAGE
    assert srv.connections == 2


async def test_interim_1xx_responses_are_skipped(raw, client):
    srv = await raw(answer(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"real")))
    c = client()
    assert await c.get(srv.url()) == b"real"
    assert await c.get(srv.url()) == b"real"
    assert srv.connections == 1


async def test_idle_connections_of_vanished_endpoints_are_closed(raw, client):
    gone, alive = await raw(answer(ok(b"a"))), await raw(answer(ok(b"b")))
    c = client(idle_timeout=0.1)
    assert await c.get(gone.url()) == b"a"
    assert await c.get(alive.url()) == b"b"
    assert c.open_connections == 2
    await asyncio.sleep(0.25)  # nobody scrapes either for longer than idle_timeout
    assert await c.get(alive.url()) == b"b"  # a GET runs the sweep
    assert c.open_connections == 1 and alive.connections == 2
    assert await c.get(gone.url()) == b"a"  # a host that comes back gets a fresh connection
    assert gone.connections == 2


# -- servers closing connections ----------------------------------------------------------------

async def test_idle_connection_closed_by_the_server_is_replaced(raw, client):
    srv = await raw(answer(ok(PAGE), keep=False))  # answers, then closes (an idle timeout of 0)
    c = client()
    for _ in range(3):
        assert await c.get(srv.url()) == PAGE
        await asyncio.sleep(0.02)
    assert srv.connections == 3


async def test_stale_reused_connection_is_retried_once_on_a_fresh_one(raw, client):
    # Request 2 arrives on the kept-alive connection just as the server gives up on it: it
    # closes without a byte of response. A GET is idempotent, so the client retries it.
    async def handler(n: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if n == 2:
            return False
        writer.write(ok(b"page %d" % n))
        return True

    srv = await raw(handler)
    c = client()
    assert await c.get(srv.url()) == b"page 1"
    assert await c.get(srv.url()) == b"page 3"
    assert srv.connections == 2 and len(srv.requests) == 3


async def test_no_retry_on_a_fresh_connection_or_after_response_bytes(raw, client):
    silent = await raw(lambda n, head, writer: _false())  # closes every connection unanswered
    c = client()
    with pytest.raises(FetchError, match=r"GET http://127\.0\.0\.1:\d+/metrics: connection closed before a response"):
        await c.get(silent.url())
    assert len(silent.requests) == 1

    async def cut_second(n: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(PAGE) if n == 1 else ok(PAGE)[:500])
        return n == 1

    cut = await raw(cut_second)
    assert await c.get(cut.url()) == PAGE
    with pytest.raises(FetchError, match="connection closed in the response headers|connection closed after"):
        await c.get(cut.url())
    assert len(cut.requests) == 2  # half a response is not retried


async def _false() -> bool:
    return False


# -- timeouts, caps, garbage ------------------------------------------------------------------

async def test_timeout_bounds_the_whole_get_and_drops_the_connection(raw, client):
    async def hang(n: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if n == 2:  # headers, then a body that never comes
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await asyncio.sleep(3600)
        return False

    srv = await raw(hang)
    c = client(timeout=0.2)
    with pytest.raises(FetchError, match=r"/metrics: timed out after 0\.2s$"):
        await c.get(srv.url())
    with pytest.raises(FetchError, match=r"timed out after 0\.2s reading the body"):
        await c.get(srv.url())
    assert c.open_connections == 0 and srv.connections == 2


@pytest.mark.parametrize("response", [ok(PAGE), chunked(PAGE), until_close(PAGE)],
                         ids=["content-length", "chunked", "until-close"])
async def test_bodies_over_the_cap_fail_and_drop_the_connection(raw, client, response):
    srv = await raw(answer(response, keep=not response.startswith(until_close(b""))))
    exact = client(max_bytes=len(PAGE))
    assert await exact.get(srv.url()) == PAGE  # exactly at the cap is fine
    c = client(max_bytes=len(PAGE) - 1)
    message = (f"body of {len(PAGE)} bytes exceeds the {len(PAGE) - 1}-byte limit" if b"Content-Length" in response
               else f"body exceeds the {len(PAGE) - 1}-byte limit")
    with pytest.raises(FetchError, match=message):
        await c.get(srv.url())
    await asyncio.sleep(0.01)
    assert c.open_connections == 0


async def test_content_length_over_the_cap_fails_before_the_body_is_sent(raw, client):
    async def promise_big(n: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
        await asyncio.sleep(3600)  # the body never comes; the client must not wait for it
        return False

    srv = await raw(promise_big)
    c = client(timeout=5.0)
    with pytest.raises(FetchError, match="body of 10000000000 bytes exceeds the 1048576-byte limit"):
        await c.get(srv.url())


@pytest.mark.parametrize(("response", "message"), [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "invalid HTTP response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\n", "invalid HTTP response"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid HTTP response"),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nabc", "unsupported Content-Encoding 'br'"),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", "cannot decompress the gzip body"),
])
async def test_garbage_responses_are_clear_errors(raw, client, response, message):
    srv = await raw(answer(response, keep=False))
    c = client(timeout=1.0)
    with pytest.raises(FetchError, match=message):
        await c.get(srv.url())


async def test_non_200_names_status_and_keeps_the_connection(raw, client):
    async def handler(n: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        if n == 1:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 17\r\n\r\nengine overloaded")
        else:
            writer.write(ok(b"fine"))
        return True

    srv = await raw(handler)
    c = client()
    with pytest.raises(FetchError, match=r"^GET http://127\.0\.0\.1:\d+/metrics: HTTP 503 Service Unavailable$"):
        await c.get(srv.url())
    assert await c.get(srv.url()) == b"fine"
    assert srv.connections == 1


async def test_connection_refused_is_a_clear_error(raw, client):
    srv = await raw(answer(ok(b"")))
    url = srv.url()
    await srv.stop()
    with pytest.raises(FetchError, match=r"GET http://127\.0\.0\.1:\d+/metrics: cannot connect: .*[Rr]efused"):
        await client().get(url)


async def test_not_an_http_url_is_an_error(client):
    with pytest.raises(FetchError, match="not an http"):
        await client().get("ftp://127.0.0.1/x")


# -- redirects ------------------------------------------------------------------------------------

async def test_same_origin_redirects_are_followed_others_are_errors(raw, client):
    async def handler(n: int, head: bytes, writer: asyncio.StreamWriter) -> bool:
        path = head.split(b" ", 2)[1]
        if path == b"/metrics":
            writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /metrics/\r\nContent-Length: 0\r\n\r\n")
        elif path == b"/metrics/":
            writer.write(ok(b"mounted"))
        elif path == b"/away":
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://example.invalid/x\r\nContent-Length: 0\r\n\r\n")
        else:  # /loop redirects to itself
            writer.write(b"HTTP/1.1 301 Moved Permanently\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n")
        return True

    srv = await raw(handler)
    c = client()
    assert await c.get(srv.url("/metrics")) == b"mounted"
    assert srv.connections == 1
    with pytest.raises(FetchError, match="HTTP 302 Found redirects to http://example.invalid/x; only same-origin"):
        await c.get(srv.url("/away"))
    with pytest.raises(FetchError, match="more than 3 redirects"):
        await c.get(srv.url("/loop"))


# -- TLS and gzip against aiohttp ---------------------------------------------------------------

async def test_https_self_signed_with_and_without_verification(tmp_path, client):
    from epp.extproc.tls import self_signed_certificate

    cert, key = self_signed_certificate()
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=PAGE)

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner, port = await serve_app(app, server_ctx)
    try:
        url = f"https://127.0.0.1:{port}/metrics"
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        c = client(ssl=insecure)
        assert await c.get(url) == PAGE
        assert await c.get(url) == PAGE
        assert c.open_connections == 1
        with pytest.raises(FetchError, match="cannot connect: SSLCertVerificationError: .*CERTIFICATE_VERIFY_FAILED"):
            await client().get(url)  # default context: verification on
        trusting = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
        assert await client(ssl=trusting).get(url) == PAGE
    finally:
        await runner.cleanup()


async def test_gzip_is_asked_for_only_with_compression_and_capped_after_decompression(raw, client):
    seen: list[str | None] = []

    async def page(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding"))
        resp = web.Response(body=PAGE)
        resp.enable_compression()  # gzip or deflate as the client asked; chunked
        return resp

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner, port = await serve_app(app)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert await client().get(url) == PAGE
        assert await client(compression=True).get(url) == PAGE
        assert seen == ["identity", "gzip, deflate"]
    finally:
        await runner.cleanup()

    bomb = gzip.compress(b"\0" * 5_000_000)  # ~5 KB on the wire, 5 MB inflated
    srv = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb)
                           + bomb))
    with pytest.raises(FetchError, match="body exceeds the 1048576-byte limit"):
        await client(compression=True).get(srv.url())
    deflated = zlib.compress(PAGE)
    srv = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n"
                           % len(deflated) + deflated))
    assert await client(compression=True).get(srv.url()) == PAGE
    truncated = gzip.compress(PAGE)[:-20]
    srv = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                           % len(truncated) + truncated))
    with pytest.raises(FetchError, match="truncated gzip body"):
        await client(compression=True).get(srv.url())


# -- the data source on top ---------------------------------------------------------------------

async def test_http_source_is_picklable_before_and_after_use(raw, tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    srv = await raw(answer(ok(b'# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 7\n')))
    source = plugin("prometheus-data-source", {"bearerTokenFile": str(token)})
    target = EndpointMetadata("127.0.0.1", srv.port)
    copy = None
    try:
        assert (await source.collect(target))["vllm:num_requests_waiting"].samples[0].value == 7
        copy = pickle.loads(pickle.dumps(source))  # the client (sockets) stays behind
        assert (await copy.collect(target))["vllm:num_requests_waiting"].samples[0].value == 7
        assert all(b"Authorization: Bearer abc\r\n" in r for r in srv.requests)
        assert srv.connections == 2
        srv.handler = answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        with pytest.raises(DataSourceError, match=r"^GET http://127\.0\.0\.1:\d+/metrics: HTTP 404 Not Found$"):
            await source.collect(target)
    finally:
        await source.close()
        if copy is not None:
            await copy.close()


def test_works_on_uvloop():
    """The collector process runs on uvloop: the same client paths on it."""
    import uvloop

    async def scenario() -> None:
        servers = [await RawServer(answer(r, keep=k)).start()
                   for r, k in ((ok(PAGE), True), (chunked(PAGE), True), (until_close(PAGE), False))]
        c = ScrapeClient(timeout=2.0, max_bytes=1 << 20)
        try:
            for _ in range(3):
                for srv in servers:
                    assert await c.get(srv.url()) == PAGE
            assert [s.connections for s in servers] == [1, 1, 3]
        finally:
            c.close()
            for srv in servers:
                await srv.stop()

    uvloop.run(scenario())


def test_a_client_moves_to_a_new_event_loop():
    c = ScrapeClient(timeout=2.0, max_bytes=1 << 20)

    async def scrape_once() -> None:
        srv = await RawServer(answer(ok(b"x"))).start()
        try:
            assert await c.get(srv.url()) == b"x"
        finally:
            await srv.stop()

    try:
        asyncio.run(scrape_once())
        asyncio.run(scrape_once())  # bound to the first loop, which is closed now: rebinds
    finally:
        c.close()


# -- any split of the byte stream (property) ----------------------------------------------------

class _Wire(asyncio.Transport):
    """The transport side of a connection: records writes; the test plays the network."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


def _framed(body: bytes, framing: str, sizes: list[int], lower: bool) -> bytes:
    def h(name: str) -> bytes:
        return (name.lower() if lower else name).encode()

    head = b"HTTP/1.1 200 OK\r\n" + h("Content-Type") + b": text/plain\r\n"
    if framing == "length":
        return head + h("Content-Length") + b": %d\r\n\r\n" % len(body) + body
    if framing == "close":
        return head + b"\r\n" + body
    out, i, k = [head + h("Transfer-Encoding") + b": chunked\r\n\r\n"], 0, 0
    while i < len(body):
        n = sizes[k % len(sizes)]
        k += 1
        out.append(b"%x\r\n%s\r\n" % (len(body[i:i + n]), body[i:i + n]))
        i += n
    return b"".join(out) + b"0\r\n\r\n"


@settings(max_examples=300, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=2000), min_size=1, max_size=3),
    framing=st.sampled_from(["length", "chunked", "close"]),
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    lower=st.booleans(),
)
def test_any_split_of_the_stream_gives_the_exact_bodies(bodies, framing, sizes, cuts, lower):
    loop = asyncio.new_event_loop()
    try:
        conn = _Connection(loop, [], set())
        wire = _Wire()
        conn.connection_made(wire)
        for body in bodies:  # keep-alive: responses one after another on one connection
            waiter = conn.send(b"GET / HTTP/1.1\r\n\r\n", 1 << 20)
            for piece in _split(_framed(body, framing, sizes, lower), cuts):
                conn.data_received(piece)
            if framing == "close":
                assert not waiter.done()
                conn.connection_lost(None)
            assert waiter.result() == body
            if framing == "close":
                break
            assert not wire.closed
    finally:
        loop.close()

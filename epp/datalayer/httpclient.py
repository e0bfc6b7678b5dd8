"""A lean HTTP/1.1 keep-alive GET client for scraping (``/metrics``, ``/v1/models``), and POSTs of
idempotent JSON calls on the same pools (vLLM's render endpoints, ``post()``).

Why not aiohttp: at 64 endpoints every 50 ms the collector GETs 1,280 pages a second, and
aiohttp's general-purpose request machinery (cookie jar, tracing, header multidicts,
stream readers, per-request timeout objects) cost ~125 µs of CPU per 57 KiB page on
uvloop, against ~60 µs for this client: an ``asyncio.Protocol`` feeding httptools (the C
llhttp parser uvicorn uses), request bytes built once per URL, and one timer per request.

What it does, and nothing more:
- GET only; one pool of keep-alive connections per ``host:port``. A caller that finds no
  idle connection opens another, so concurrent GETs to one host work; a scraper that polls
  an endpoint sequentially keeps using a single connection.
- Bodies framed by Content-Length, chunked transfer coding, or the end of the connection.
  ``Connection: close`` (and HTTP/1.0 without keep-alive) is honoured.
- A reused idle connection that the server had closed is retried once, transparently, on a
  fresh connection, but only if not a single response byte arrived on it (a GET is
  idempotent; a half-received response is not retried).
- ``timeout`` bounds the whole GET (connect, TLS, redirects, the body) with one deadline.
- ``max_bytes`` is enforced while reading: a Content-Length above it fails before the body
  is read, chunked and close-delimited bodies fail as soon as they pass it, gzip/deflate
  bodies are capped on their decompressed size. The connection is then dropped.
- https through an ``ssl.SSLContext`` (the caller decides about verification).
- Redirects: 301/302/303/307/308 to the SAME origin (scheme, host and port) are followed,
  at most ``max_redirects`` times, because ASGI servers answer ``/metrics`` with a redirect
  to ``/metrics/`` when the app is mounted on a prefix. Redirects to another origin are an
  error naming the Location: following them would hand the bearer token to another host.
- Interim 1xx responses are skipped. Anything but 200 is an error naming status and reason.

Every failure is a ``FetchError`` (a ``DataSourceError``) whose message starts with
``GET <url>:`` (``POST <url>:``). ``post()`` shares all of the above except redirects (an error)
and must only be used for requests that may be sent twice (the stale-connection retry).
When nobody answers at the address at all (refused, no route, unknown host, no TCP handshake
within ``connect_timeout``), it is a ``ConnectError``, which is also an ``EndpointUnreachable``:
the collector takes such an endpoint out at once. A reused keep-alive connection that the server
closed (e.g. it was killed) is retried on a fresh one, so a crashed server shows up as
``ConnectError`` on the very next scrape.
"""

from __future__ import annotations

import asyncio
import math
import ssl as ssl_module
import zlib
from typing import Any, Mapping
from urllib.parse import urljoin, urlsplit

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpResponseParser

from epp.datalayer.errors import DataSourceError, EndpointUnreachable

DEFAULT_CONNECT_TIMEOUT = 0.25  # a TCP handshake on a cluster network takes well under 1 ms
DEFAULT_IDLE_TIMEOUT = 60.0  # close connections unused this long (endpoints come and go)
_SWEEP_EVERY = 10.0
_DISCARD_LIMIT = 64 * 1024  # bytes of a non-200 body read (and dropped) to keep the connection
_MAX_TARGETS = 4096
_REDIRECTS = frozenset((301, 302, 303, 307, 308))


class FetchError(DataSourceError):
    """A GET failed; the message names the URL and what went wrong."""


class ConnectError(FetchError, EndpointUnreachable):
    """No connection could be made: nobody listens, no route, unknown host, no handshake in time."""


class _Failure(Exception):
    """What a connection reports; ``get()`` turns it into a FetchError naming the URL."""

    def __init__(self, message: str, retryable: bool = False, timeout: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.timeout = timeout


class _Stop(Exception):
    """Raised inside a parser callback after the request was failed: stop parsing."""


class _Status:
    """A complete non-200 response (its body was read and dropped)."""

    __slots__ = ("status", "reason", "location")

    def __init__(self, status: int, reason: str, location: str | None) -> None:
        self.status = status
        self.reason = reason
        self.location = location


class _Target:
    """One URL: where to connect and the request bytes, built once."""

    __slots__ = ("url", "origin", "host", "port", "tls", "server_hostname", "request", "post_head", "idle")

    def __init__(self, url: str, origin: tuple[str, str, int], host: str, port: int, tls: bool,
                 request: bytes, idle: list["_Connection"], post_head: bytes = b"") -> None:
        self.url = url
        self.origin = origin
        self.host = host
        self.port = port
        self.tls = tls
        self.server_hostname = host if tls else None
        self.request = request
        self.post_head = post_head  # a POST's request line and headers, up to the Content-Length value
        self.idle = idle  # shared by every target of the same host:port


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses the response with httptools.

    The parser calls ``on_*`` synchronously from ``data_received``; the outcome lands in
    ``waiter``: the body (bytes) for a 200, a ``_Status`` for other statuses, or a
    ``_Failure`` exception.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: list["_Connection"],
                 owner: set["_Connection"]) -> None:
        self.loop = loop
        self.idle = idle
        self.owner = owner
        self.parser = HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Any] | None = None
        self.closed = False
        self.reused = False  # served a response before: the server may have closed it meanwhile
        self.keep_alive = False
        self.last_used = math.inf  # set when it goes idle; never swept while being set up
        self._reset(0)

    def _reset(self, limit: int) -> None:
        self.limit = limit
        self.keep_alive = False
        self.got_bytes = False
        self.headers_done = False
        self.interim = False
        self.status = 0
        self.reason = b""
        self.length = -1
        self.chunked = False
        self.encoding = b""
        self.location: bytes | None = None
        self.parts: list[bytes] = []
        self.size = 0
        self.inflate: Any = None

    # -- driven by the client --------------------------------------------------------------

    def send(self, request: bytes, limit: int) -> asyncio.Future[Any]:
        self._reset(limit)
        self.waiter = waiter = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(request)
        return waiter

    def expire(self) -> None:
        """The request's deadline passed: fail it and drop the connection."""
        self._fail(_Failure("reading the body" if self.headers_done else "", timeout=True))

    def abort(self, graceful: bool = False) -> None:
        self.closed = True
        self.owner.discard(self)
        if self.transport is not None:
            try:
                if graceful:
                    self.transport.close()  # flushes the request and sends FIN, not RST
                else:
                    self.transport.abort()
            except RuntimeError:  # its event loop is closed already
                pass

    def _fail(self, failure: _Failure) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(failure)
        self.abort()

    def _done(self, result: Any) -> None:
        waiter, self.waiter = self.waiter, None
        self.parts = []
        if not self.keep_alive:
            self.closed = True
            self.owner.discard(self)
            if self.transport is not None:
                self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.add(self)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: the stream is out of sync
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Stop):
                self._fail(_Failure(f"invalid HTTP response: {e.__context__ or e}"))
        except HttpParserError as e:
            self._fail(_Failure(f"invalid HTTP response: {e}"))
        except HttpParserUpgrade:
            self._fail(_Failure("the server switched protocols (HTTP 101), which a GET never asks for"))

    def eof_received(self) -> bool | None:
        self.closed = True  # not reusable from here on
        return None  # close the transport; connection_lost settles the request

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.discard(self)
        try:
            self.idle.remove(self)
        except ValueError:
            pass
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.headers_done and self.length < 0 and not self.chunked and exc is None and not self.interim:
            # no Content-Length, not chunked: the body ends with the connection
            try:
                self._complete()
            except _Stop:
                pass
            return
        if not self.got_bytes and self.reused:
            self._fail(_Failure("the server closed the idle connection", retryable=True))
        elif not self.got_bytes:
            self._fail(_Failure(f"connection closed before a response{_because(exc)}"))
        elif not self.headers_done:
            self._fail(_Failure(f"connection closed in the response headers{_because(exc)}"))
        else:
            self._fail(_Failure(f"connection closed after {self.size} bytes of the body{_because(exc)}"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.waiter is None:  # a second response to one request: the stream is out of sync
            self.abort()
            raise _Stop

    def on_status(self, status: bytes) -> None:
        self.reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"content-length":
            self.length = int(value)  # llhttp has validated it
        elif n == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()
        elif n == b"content-encoding":
            self.encoding = value.strip().lower()
        elif n == b"location":
            self.location = value

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the real response follows
            self.interim = True
            return
        self.status = status
        self.headers_done = True
        if status != 200:
            self.limit = _DISCARD_LIMIT
        elif self.length > self.limit:
            self._fail(_Failure(f"body of {self.length} bytes exceeds the {self.limit}-byte limit"))
            raise _Stop
        if self.encoding and self.encoding != b"identity" and status == 200:
            if self.encoding in (b"gzip", b"x-gzip", b"deflate"):
                self.inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
            else:
                self._fail(_Failure(f"unsupported Content-Encoding {self.encoding.decode('latin-1')!r}"))
                raise _Stop

    def on_body(self, body: bytes) -> None:
        if self.inflate is not None:
            try:
                body = self.inflate.decompress(body, self.limit - self.size + 1)
            except zlib.error as e:
                self._fail(_Failure(f"cannot decompress the {self.encoding.decode('latin-1')} body: {e}"))
                raise _Stop from None
        self.size += len(body)
        if self.size > self.limit:
            if self.status != 200:  # enough of an error page: report the status, drop the rest
                self.keep_alive = False
                self._done(self._status())
            else:
                self._fail(_Failure(f"body exceeds the {self.limit}-byte limit"))
            raise _Stop
        if self.status == 200:
            self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        self._complete()

    def _complete(self) -> None:
        if self.status != 200:
            self._done(self._status())
            return
        if self.inflate is not None:
            tail = self.inflate.flush()
            if tail:
                self.size += len(tail)
                if self.size > self.limit:
                    self._fail(_Failure(f"body exceeds the {self.limit}-byte limit"))
                    raise _Stop
                self.parts.append(tail)
            if not self.inflate.eof:
                self._fail(_Failure(f"truncated {self.encoding.decode('latin-1')} body"))
                raise _Stop
        parts = self.parts
        self._done(parts[0] if len(parts) == 1 else b"".join(parts))

    def _status(self) -> _Status:
        location = self.location.decode("latin-1") if self.location is not None else None
        return _Status(self.status, self.reason.decode("latin-1", "replace"), location)


def _because(exc: BaseException | None) -> str:
    return f" ({type(exc).__name__}: {exc})" if exc is not None else ""


class ScrapeClient:
    """GET whole bodies over pooled keep-alive HTTP/1.1 connections.

    Bound to the event loop of its first ``get()`` (rebound, dropping the connections, when
    that loop has stopped and another one calls); not thread-safe; ``close()`` closes every
    connection. Not picklable on purpose: create it on the loop that uses it.
    """

    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        headers: Mapping[str, str] | None = None,
        compression: bool = False,
        ssl: ssl_module.SSLContext | None = None,
        max_redirects: int = 3,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if timeout <= 0 or max_bytes <= 0 or connect_timeout <= 0:
            raise ValueError("timeout, connect_timeout and max_bytes must be > 0")
        self.timeout = float(timeout)
        # Bounds the TCP (and TLS) handshake of a new connection, within ``timeout``: a host
        # that has gone away (a killed container's address) answers nothing at all, and
        # waiting the whole scrape timeout for that would keep a dead endpoint in rotation.
        self.connect_timeout = float(connect_timeout)
        self.max_bytes = int(max_bytes)
        self.max_redirects = max_redirects
        self.idle_timeout = idle_timeout
        self._ssl = ssl
        self._headers: dict[str, str] = {"User-Agent": "epp-datalayer", "Accept": "*/*"}
        # At 20 scrapes/s per endpoint gzip costs the model server and us more CPU than the
        # bytes it saves on a cluster network; it is opt-in.
        self._headers["Accept-Encoding"] = "gzip, deflate" if compression else "identity"
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._conns: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_sweep = 0.0

    def set_header(self, name: str, value: str | None) -> None:
        """Add, replace (or with None remove) a request header, e.g. a rotated bearer token."""
        if value is not None and any(c in value for c in "\r\n\0"):
            raise ValueError(f"header {name} contains a line break or NUL")
        if any(c in name for c in "\r\n\0: "):
            raise ValueError(f"invalid header name {name!r}")
        old = self._headers.get(name)
        if value is None:
            self._headers.pop(name, None)
        else:
            self._headers[name] = value
        if old != value:
            self._targets = {}  # request bytes are rebuilt lazily

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        """Close every connection; requests in flight fail. The client stays usable."""
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        for idle in self._idle.values():
            idle.clear()

    # -- one GET -----------------------------------------------------------------------------

    async def get(self, url: str) -> bytes:
        """The body of a 200 answer to ``GET url``; FetchError for anything else."""
        loop = self._loop
        if loop is None or not loop.is_running():  # cheaper than get_running_loop() (a getpid each)
            loop = self._rebind(asyncio.get_running_loop())
        deadline = loop.time() + self.timeout
        if deadline >= self._next_sweep:  # before the lookup: a sweep may drop targets
            self._sweep(deadline)
        target = self._targets.get(url) or self._target(url)
        for _ in range(self.max_redirects + 1):
            result = await self._exchange(loop, target, deadline)
            if type(result) is bytes:
                return result
            status: _Status = result
            if status.status not in _REDIRECTS or not status.location:
                raise FetchError(f"GET {target.url}: HTTP {status.status} {status.reason}".rstrip())
            target = self._redirect(target, status)
        raise FetchError(f"GET {url}: more than {self.max_redirects} redirects (last to {target.url})")

    async def post(self, url: str, body: bytes) -> bytes:
        """The body of a 200 answer to ``POST url`` with a JSON ``body``; FetchError for anything else."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._rebind(asyncio.get_running_loop())
        deadline = loop.time() + self.timeout
        if deadline >= self._next_sweep:
            self._sweep(deadline)
        target = self._targets.get(url) or self._target(url)
        request = b"%b%d\r\n\r\n%b" % (target.post_head, len(body), body)
        result = await self._exchange(loop, target, deadline, request, "POST")
        if type(result) is bytes:
            return result
        raise FetchError(f"POST {target.url}: HTTP {result.status} {result.reason}".rstrip())

    async def _exchange(self, loop: asyncio.AbstractEventLoop, target: _Target, deadline: float,
                        request: bytes | None = None, method: str = "GET") -> Any:
        """One request/response on a pooled or new connection; retries a stale idle one once."""
        idle = target.idle
        conn = idle.pop() if idle else None
        request = target.request if request is None else request
        while True:
            if conn is None or conn.closed:
                conn = await self._connect(loop, target, deadline, method)
            waiter = conn.send(request, self.max_bytes)
            timer = loop.call_at(deadline, conn.expire)
            try:
                result = await waiter
            except _Failure as e:
                if e.retryable:
                    conn = None
                    continue
                if e.timeout:
                    raise self._timed_out(target, str(e), method) from None
                raise FetchError(f"{method} {target.url}: {e}") from None
            except BaseException:  # cancelled: the response is half read, the connection is useless
                # Closed gracefully: the server still gets the whole request and a clean
                # end of stream, as it would from a client that simply went away.
                conn.abort(graceful=True)
                raise
            finally:
                timer.cancel()
            if conn.closed:
                return result
            conn.reused = True
            conn.last_used = deadline
            idle.append(conn)
            return result

    async def _connect(self, loop: asyncio.AbstractEventLoop, target: _Target, deadline: float,
                       method: str = "GET") -> _Connection:
        ssl = None
        if target.tls:
            ssl = self._ssl if self._ssl is not None else ssl_module.create_default_context()
        connect_by = loop.time() + self.connect_timeout
        try:
            # The rare path (a new connection), so asyncio's own timeout is fine here.
            async with asyncio.timeout_at(min(deadline, connect_by)):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, target.idle, self._conns), target.host, target.port,
                    ssl=ssl, server_hostname=target.server_hostname)
        except TimeoutError:
            if connect_by < deadline:
                raise ConnectError(f"{method} {target.url}: cannot connect: no answer within "
                                   f"{self.connect_timeout:g}s") from None
            raise self._timed_out(target, "", method) from None
        except ssl_module.SSLError as e:  # somebody answers, but the TLS handshake failed
            raise FetchError(f"{method} {target.url}: cannot connect: {type(e).__name__}: {e}") from None
        except OSError as e:  # refused, no route, unknown host
            raise ConnectError(f"{method} {target.url}: cannot connect: {type(e).__name__}: {e}") from None
        return conn

    def _timed_out(self, target: _Target, phase: str, method: str = "GET") -> FetchError:
        where = f" {phase}" if phase else ""
        return FetchError(f"{method} {target.url}: timed out after {self.timeout:g}s{where}")

    # -- targets, redirects, pool ------------------------------------------------------------

    def _target(self, url: str) -> _Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"GET {url}: not an http(s) URL")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise FetchError(f"GET {url}: invalid port") from None
        host = parts.hostname
        host_header = f"[{host}]" if ":" in host else host
        if port != (443 if scheme == "https" else 80):
            host_header += f":{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = [f"Host: {host_header}"] + [f"{k}: {v}" for k, v in self._headers.items()]
        request = ("\r\n".join([f"GET {path} HTTP/1.1", *headers]) + "\r\n\r\n").encode("latin-1")
        post_head = ("\r\n".join([f"POST {path} HTTP/1.1", *headers, "Content-Type: application/json"])
                     + "\r\nContent-Length: ").encode("latin-1")
        idle = self._idle.setdefault((host, port), [])
        if len(self._targets) >= _MAX_TARGETS:
            self._targets = {}
        target = self._targets[url] = _Target(url, (scheme, host, port), host, port, scheme == "https",
                                              request, idle, post_head)
        return target

    def _redirect(self, target: _Target, status: _Status) -> _Target:
        assert status.location is not None
        url = urljoin(target.url, status.location)
        try:
            nxt = self._targets.get(url) or self._target(url)
        except FetchError:
            nxt = None
        if nxt is None or nxt.origin != target.origin:
            raise FetchError(f"GET {target.url}: HTTP {status.status} {status.reason} redirects to "
                             f"{status.location}; only same-origin redirects are followed")
        return nxt

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        """A new event loop (tests, a restarted process): connections of the old one are unusable."""
        if loop is not self._loop:
            self.close()
            self._loop = loop
        return loop

    def _sweep(self, t: float) -> None:
        """Close connections idle for ``idle_timeout``; forget hosts without any connection."""
        self._next_sweep = t + min(_SWEEP_EVERY, self.idle_timeout)
        cutoff = t - self.idle_timeout
        for conn in [c for c in self._conns if c.waiter is None and c.last_used < cutoff]:
            try:
                conn.idle.remove(conn)
            except ValueError:
                pass
            conn.abort()
        in_use = {id(c.idle) for c in self._conns}
        gone = [k for k, idle in self._idle.items() if not idle and id(idle) not in in_use]
        if gone:  # endpoints that went away: their targets are rebuilt if they come back
            for k in gone:
                del self._idle[k]
            self._targets = {u: tg for u, tg in self._targets.items() if self._idle.get((tg.host, tg.port)) is tg.idle}

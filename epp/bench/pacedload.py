"""Paced open-loop HTTP load: requests leave on a fixed schedule, whatever earlier ones do.

Why not ``hey -q``: hey paces each of its ``-c`` workers with its own ticker, and the workers
start together, so "500 req/s with 8 workers" is really a burst of 8 simultaneous requests
every 16 ms. That measures burst queueing, not a steady 500 req/s (on this machine it tripled
the median latency of every configuration). Here one scheduler sends request *i* at
``start + i / rate`` (``uniform``) or after exponential gaps (``poisson``), over a pool of
keep-alive HTTP/1.1 connections that grows whenever every connection is busy, so a slow
response never delays the next send (no coordinated omission).

Latency is measured from the moment a request is written to the moment its response is
complete; how late the send was against the schedule (event-loop timers have ~1 ms
granularity) is reported separately as ``lag``. The client is a few dozen lines of
``asyncio.Protocol`` + ``httptools`` so that, on a 2-core machine shared with the system
under test, it costs little CPU (~50 µs per request).

    result = run_paced("http://127.0.0.1:8080/v1/completions", body, rate=500, seconds=10)
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

MAX_CONNECTIONS = 256


@dataclass
class PacedResult:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    max_lag_ms: float = 0.0
    connections: int = 0

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, on_done) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.on_done = on_done
        self.sent_at = 0.0
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> None:
        self.busy = True
        self.sent_at = time.perf_counter()
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail()

    def on_message_complete(self) -> None:
        ok = self.parser.get_status_code() == 200
        self.busy = False
        self.on_done(self, ok, (time.perf_counter() - self.sent_at) * 1e3)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail()

    def _fail(self) -> None:
        if self.closed:
            return
        self.closed = True
        was_busy, self.busy = self.busy, False
        if self.transport is not None:
            self.transport.close()
        if was_busy:
            self.on_done(self, False, 0.0)


async def paced(url: str, body: bytes, *, rate: float, seconds: float, arrivals: str = "uniform",
                content_type: str = "application/json", seed: int = 1) -> PacedResult:
    """Send POST ``body`` to ``url`` at ``rate`` per second for ``seconds``; wait for the stragglers."""
    if arrivals not in ("uniform", "poisson"):
        raise ValueError(f"arrivals must be 'uniform' or 'poisson', not {arrivals!r}")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    result = PacedResult()
    idle: list[_Conn] = []
    outstanding = 0
    drained = asyncio.Event()

    def on_done(conn: _Conn, ok: bool, ms: float) -> None:
        nonlocal outstanding
        outstanding -= 1
        if ok:
            result.ok += 1
            result.latencies_ms.append(ms)
        else:
            result.errors += 1
        if not conn.closed:
            idle.append(conn)
        if outstanding == 0:
            drained.set()

    async def connection() -> _Conn | None:
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        if result.connections >= MAX_CONNECTIONS:
            return None
        result.connections += 1
        try:
            _, conn = await loop.create_connection(lambda: _Conn(on_done), host, port)
        except OSError:
            return None
        return conn

    rng = random.Random(seed)
    start = loop.time()
    count = round(rate * seconds)  # uniform: exactly rate x seconds sends, at start + i / rate
    due, i = start, 0
    while (i < count) if arrivals == "uniform" else (due < start + seconds):
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        result.max_lag_ms = max(result.max_lag_ms, (loop.time() - due) * 1e3)
        conn = await connection()
        result.sent += 1
        if conn is None:
            result.errors += 1
        else:
            outstanding += 1
            drained.clear()
            conn.send(request)
        i += 1
        due = start + i / rate if arrivals == "uniform" else due + rng.expovariate(rate)
    result.seconds = loop.time() - start
    if outstanding:
        try:
            await asyncio.wait_for(drained.wait(), timeout=30)
        except asyncio.TimeoutError:
            result.errors += outstanding
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return result


def run_paced(url: str, body: bytes, *, rate: float, seconds: float, arrivals: str = "uniform") -> PacedResult:
    """``paced`` on a fresh event loop (uvloop when available: a cheaper client)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(paced(url, body, rate=rate, seconds=seconds, arrivals=arrivals))
    return uvloop.run(paced(url, body, rate=rate, seconds=seconds, arrivals=arrivals))

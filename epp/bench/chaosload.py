"""Open-loop request log for fault benchmarks and tests: who served each request, who failed, when.

Unlike ``pacedload`` (latency of one request shape, a count of errors), a fault run needs the
timeline: every request's send time, status, the server that answered (the sim's
``x-sim-address`` header) and the error text, so that failures can be attributed to the
moments around a crash or a restart. Requests leave at ``start + i / rate`` whatever earlier
ones do (no coordinated omission); each runs on its own task over a shared aiohttp session.

    log = RequestLog()
    await send_at_rate(log, url, body_for, rate=40, until=lambda: stop.is_set())
    failed = log.between(t_kill, t_kill + 5, failed=True)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from epp.bench.loadgen import SERVER_ADDRESS_HEADER


@dataclass(slots=True)
class Sent:
    index: int
    sent: float  # time.monotonic() when the request left
    done: float = 0.0
    status: int = 0
    server: str = ""
    error: str = ""  # the transport error, or the start of a non-200 body

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RequestLog:
    requests: list[Sent] = field(default_factory=list)

    def between(self, start: float, end: float, *, failed: bool | None = None) -> list[Sent]:
        """Requests sent in [start, end); ``failed`` True/False keeps only failures/successes."""
        out = [r for r in self.requests if start <= r.sent < end]
        if failed is not None:
            out = [r for r in out if (not r.ok) == failed]
        return out

    def in_flight_at(self, t: float) -> list[Sent]:
        """Requests sent before ``t`` that had not finished at ``t``."""
        return [r for r in self.requests if r.sent < t and (r.done == 0.0 or r.done > t)]

    def first_served_by(self, server: str, after: float) -> Sent | None:
        for r in self.requests:
            if r.sent >= after and r.ok and r.server == server:
                return r
        return None


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, rec: Sent, read_body: bool,
               timeout: float) -> None:
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            rec.status = resp.status
            rec.server = resp.headers.get(SERVER_ADDRESS_HEADER, "")
            data = await resp.read() if (read_body or resp.status != 200) else b""
            if resp.status != 200:
                rec.error = data[:200].decode(errors="replace").strip() or f"HTTP {resp.status}"
            elif read_body:
                await resp.release()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:200] or type(e).__name__
    finally:
        rec.done = time.monotonic()


async def send_at_rate(log: RequestLog, url: str, body_for: Callable[[int], bytes], *, rate: float,
                       until: Callable[[], bool], timeout: float = 30.0, read_body: bool = True,
                       connections: int = 0) -> None:
    """POST ``body_for(i)`` to ``url`` at ``rate``/s until ``until()`` is true; waits for the stragglers."""
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector) as session:
        start = loop.time()
        i = 0
        while not until():
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = Sent(i, time.monotonic())
            log.requests.append(rec)
            task = loop.create_task(_one(session, url, body_for(i), rec, read_body, timeout))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout + 5)

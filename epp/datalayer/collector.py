"""The collector: one periodic loop per endpoint feeding every wired source to its extractors.

Each tick, for each ``SourceWiring(source, extractors)``: ``source.collect`` runs ONCE
(bounded by ``timeout``), then every extractor of that source gets the same payload.
A source that enforces the deadline itself says so through an optional hook,
``limit_timeout(seconds) -> bool`` (the HTTP sources do: their client runs one timer per
GET); the collector then skips its own ``asyncio.timeout`` for it, which at 1,280 scrapes/s
is a few percent of the collector's CPU.
Loops start when the pool adds an endpoint and stop when it removes one. Each loop starts at
a random phase within the interval and keeps that phase when it falls behind (missed ticks
are skipped, not bunched), so 64 loops never align into bursts.

Failures are per endpoint and per plugin: counted
(``llm_d_inference_scheduler_datalayer_{poll,extract}_errors_total``), logged at debug
level with a rate-limited warning, and the endpoint keeps its previous data and old
``update_time``. Beyond upstream, health (what scheduling does with it: ``pool.py``):

- a tick where every source failed counts as a failure (``pool.set_failures``); from the
  first one, scheduling prefers endpoints whose data is current, so stale numbers of a
  silent endpoint never attract requests;
- an endpoint nobody answers for (``EndpointUnreachable``: connection refused, no route,
  unknown host, no TCP handshake within the connect timeout) is marked unreachable at once;
- other failures (timeouts, HTTP 5xx, unreadable pages) mark it unreachable after
  ``failure_threshold`` consecutive failed ticks, or ``unreachable_after`` seconds of them;
- an unreachable endpoint is re-probed with a backoff that doubles from the interval up to
  ``max_backoff`` (0.5 s) and is back on the first good scrape;
- a good scrape also ends an exclusion the request path made (``pool.exclude``) before it.

This module runs on whatever loop calls ``start()``; ``epp.datalayer.process`` runs it in a
separate process instead (see there for why and when).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from epp.datalayer.endpoint import Endpoint, now
from epp.datalayer.errors import EndpointUnreachable
from epp.datalayer.pool import EndpointPool

if TYPE_CHECKING:
    from epp.config.model import SourceWiring

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.05
DEFAULT_TIMEOUT = 1.0
DEFAULT_UNREACHABLE_AFTER = 5.0
DEFAULT_FAILURE_THRESHOLD = 3
DEFAULT_MAX_BACKOFF = 0.5
WARN_EVERY = 30.0  # seconds between warnings for the same endpoint and plugin


class CollectorSink(Protocol):
    """Where the collector reports errors and health (the EPP's Prometheus metrics by default)."""

    def poll_error(self, source_type: str, count: int = 1) -> None: ...

    def extract_error(self, source_type: str, extractor_type: str, count: int = 1) -> None: ...

    def reachability(self, endpoint: Endpoint, reachable: bool) -> None: ...

    def forget(self, endpoint: Endpoint) -> None: ...


class MetricsSink:
    """Reports into ``epp.observability.metrics``."""

    def __init__(self, pool_name: str = "") -> None:
        from epp.observability import metrics

        self._m = metrics
        self.pool_name = pool_name

    def poll_error(self, source_type: str, count: int = 1) -> None:
        self._m.DATALAYER_POLL_ERRORS.labels(source_type).inc(count)

    def extract_error(self, source_type: str, extractor_type: str, count: int = 1) -> None:
        self._m.DATALAYER_EXTRACT_ERRORS.labels(source_type, extractor_type).inc(count)

    def reachability(self, endpoint: Endpoint, reachable: bool) -> None:
        self._m.ENDPOINT_REACHABLE.labels(self.pool_name, endpoint.metadata.name).set(1 if reachable else 0)

    def forget(self, endpoint: Endpoint) -> None:
        try:
            self._m.ENDPOINT_REACHABLE.remove(self.pool_name, endpoint.metadata.name)
        except KeyError:
            pass


def plugin_type(plugin: object) -> str:
    return getattr(plugin, "plugin_type", "") or type(plugin).__name__


class _WarnLimiter:
    """First failure of an (endpoint, plugin) pair warns; repeats within WARN_EVERY go to debug."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def log(self, key: tuple[str, str], msg: str, *args: object) -> None:
        t = now()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if t - last >= WARN_EVERY:
            if suppressed:
                msg += f" ({suppressed} similar errors in the last {WARN_EVERY:g}s)"
            log.warning(msg, *args)
            self._last[key] = (t, 0)
        else:
            log.debug(msg, *args)
            self._last[key] = (last, suppressed + 1)

    def clear(self, key: tuple[str, str]) -> None:
        self._last.pop(key, None)

    def forget_endpoint(self, endpoint_key: str) -> None:
        for k in [k for k in self._last if k[0] == endpoint_key]:
            del self._last[k]


class Collector:
    """Runs the data sources for every endpoint of ``pool`` on the current event loop."""

    def __init__(
        self,
        pool: EndpointPool,
        wirings: Sequence["SourceWiring"],
        *,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        unreachable_after: float = DEFAULT_UNREACHABLE_AFTER,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        sink: CollectorSink | None = None,
        on_tick: Callable[[Endpoint], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if interval <= 0:
            interval = DEFAULT_INTERVAL  # upstream: <= 0 means the default
        self.pool = pool
        self.wirings = tuple(wirings)
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.unreachable_after = float(unreachable_after)
        self.failure_threshold = max(1, int(failure_threshold))
        self.max_backoff = max(float(max_backoff), self.interval)
        self.sink: CollectorSink = sink if sink is not None else MetricsSink(pool.name)
        self.on_tick = on_tick
        self._rng = rng or random.Random()
        self._loops: dict[str, tuple[Endpoint, asyncio.Task[None]]] = {}
        self._self_timed = (False,) * len(self.wirings)  # per wiring: the source bounds collect() itself
        self._warn = _WarnLimiter()
        self.ticks: dict[str, int] = {}  # per endpoint key, for tests and benchmarks
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        for w in self.wirings:
            w.source.bind(w.extractors)
            self._declare_error_series(w)
        self._self_timed = tuple(_limits_itself(w.source, self.timeout) for w in self.wirings)
        self.pool.subscribe(self._on_pool_event)
        for ep in self.pool.endpoints():
            self._start_loop(ep)

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self.pool.unsubscribe(self._on_pool_event)
        tasks = [t for _, t in self._loops.values()]
        for t in tasks:
            t.cancel()
        self._loops.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def endpoints(self) -> list[str]:
        """Keys of the endpoints that currently have a loop."""
        return list(self._loops)

    def _on_pool_event(self, event: str, ep: Endpoint) -> None:
        if event == "added":
            self._start_loop(ep)
        elif event == "removed":
            self._stop_loop(ep)
        # "updated" (relabel, new metrics port): the loop reads ep.metadata on every tick.

    def _start_loop(self, ep: Endpoint) -> None:
        if not self.wirings or not self._running:
            return
        current = self._loops.get(ep.key)
        if current is not None and current[0] is ep:
            return
        if current is not None:
            current[1].cancel()
        self.ticks.setdefault(ep.key, 0)
        self.sink.reachability(ep, ep.reachable)
        task = asyncio.get_running_loop().create_task(self._run(ep), name=f"collector {ep.key}")
        self._loops[ep.key] = (ep, task)

    def _stop_loop(self, ep: Endpoint) -> None:
        current = self._loops.get(ep.key)
        if current is None or current[0] is not ep:
            return
        del self._loops[ep.key]
        current[1].cancel()
        self.ticks.pop(ep.key, None)
        self._warn.forget_endpoint(ep.key)
        self.sink.forget(ep)

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self, ep: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval
        await asyncio.sleep(self._rng.uniform(0, interval))
        next_at = loop.time()
        backoff = interval
        while True:
            try:
                await self.tick(ep)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in our own code must not end the loop for good
                log.exception("collector tick failed for endpoint %s", ep.key)
            t = loop.time()
            if not ep.reachable and ep.failures:
                # Re-probe an unreachable endpoint soon, then less often, at most max_backoff
                # apart: a restarted server is back within that, a dead one costs little.
                next_at = t + backoff
                backoff = min(backoff * 2, self.max_backoff)
            else:
                backoff = interval
                next_at += interval
                if t > next_at:  # fell behind (slow endpoint, timeout): skip ticks, keep the phase
                    next_at += math.ceil((t - next_at) / interval) * interval
            await asyncio.sleep(next_at - t)

    async def tick(self, ep: Endpoint) -> None:
        """One round for one endpoint: each source collects once, its extractors read the result."""
        started = now()
        self.ticks[ep.key] = self.ticks.get(ep.key, 0) + 1
        ok = failed = 0
        unreachable: Exception | None = None
        for w, self_timed in zip(self.wirings, self._self_timed):
            source = w.source
            try:
                if self_timed:
                    data = await source.collect(ep.metadata)
                else:
                    async with asyncio.timeout(self.timeout):
                        data = await source.collect(ep.metadata)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failed += 1
                if isinstance(e, EndpointUnreachable):
                    unreachable = e
                self._poll_failed(ep, source, e)
                continue
            if data is None:  # the source had nothing due (e.g. a slower refresh interval)
                continue
            ok += 1
            self._warn.clear((ep.key, source.name))
            for ex in w.extractors:
                try:
                    ex.extract(data, ep)
                except Exception as e:
                    self._extract_failed(ep, source, ex, e)
        if ok:
            self._succeeded(ep, started)
            self.pool.data_changed()
        elif failed:
            self._failed(ep, started, unreachable)
        if self.on_tick is not None:
            self.on_tick(ep)

    # -- errors and health -------------------------------------------------------------------

    def _declare_error_series(self, w: SourceWiring) -> None:
        # Zero-valued error series from the start: a dashboard or alert on rate() sees 0, not "no data".
        stype = plugin_type(w.source)
        self.sink.poll_error(stype, 0)
        for ex in w.extractors:
            self.sink.extract_error(stype, plugin_type(ex), 0)

    def _poll_failed(self, ep: Endpoint, source: object, e: Exception) -> None:
        stype = plugin_type(source)
        self.sink.poll_error(stype)
        reason = f"timed out after {self.timeout:g}s" if isinstance(e, TimeoutError) else _describe(e)
        self._warn.log((ep.key, getattr(source, "name", stype)), "data source %s failed for endpoint %s: %s",
                       getattr(source, "name", stype), _who(ep), reason)

    def _extract_failed(self, ep: Endpoint, source: object, ex: object, e: Exception) -> None:
        self.sink.extract_error(plugin_type(source), plugin_type(ex))
        name = getattr(ex, "name", plugin_type(ex))
        self._warn.log((ep.key, name), "extractor %s failed for endpoint %s: %s", name, _who(ep), _describe(e))

    def _succeeded(self, ep: Endpoint, started: float) -> None:
        ep.last_scrape_ok = started
        down_since = ep.first_failure
        ep.first_failure = 0.0
        self.pool.set_failures(ep, 0)
        if not ep.reachable and self.pool.set_reachable(ep, True):
            self.sink.reachability(ep, True)
            log.info("endpoint %s is reachable again after %.1fs", _who(ep), now() - down_since if down_since else 0.0)
        self.pool.scrape_succeeded(ep, started)

    def _failed(self, ep: Endpoint, started: float, unreachable: Exception | None) -> None:
        if ep.first_failure == 0.0:
            ep.first_failure = started
        self.pool.set_failures(ep, ep.failures + 1)
        if not ep.reachable:
            return
        if unreachable is not None:
            why = f"nobody answers ({_describe(unreachable)})"
        elif ep.failures >= self.failure_threshold:
            why = f"{ep.failures} scrapes in a row failed"
        elif now() - ep.first_failure >= self.unreachable_after:
            why = f"every data source failed for {now() - ep.first_failure:.1f}s"
        else:
            return
        if self.pool.set_reachable(ep, False):
            self.sink.reachability(ep, False)
            log.warning("endpoint %s marked unreachable: %s; excluded from scheduling and re-probed "
                        "at least every %gs until a scrape succeeds", _who(ep), why, self.max_backoff)


def _limits_itself(source: object, timeout: float) -> bool:
    """Ask the source to bound each ``collect()`` by ``timeout`` itself (optional hook)."""
    hook = getattr(source, "limit_timeout", None)
    return callable(hook) and hook(timeout) is True


def _who(ep: Endpoint) -> str:
    name = ep.metadata.name
    return name if name == ep.key else f"{name} ({ep.key})"


def _describe(e: BaseException) -> str:
    """Our own errors carry a complete message; others get their type name in front."""
    text = str(e)
    if not text:
        return type(e).__name__
    return text if type(e).__module__.startswith("epp") else f"{type(e).__name__}: {text}"

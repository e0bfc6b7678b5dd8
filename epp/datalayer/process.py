"""Running the collector in its own process, feeding compact updates to the serving loop.

Why: scraping and parsing 64 endpoints every 50 ms is ~0.4 core of Python. On the event
loop of the ext_proc server that CPU competes with the request path and adds latency to
whichever request is waiting behind a parse (see ``epp/bench/collector.py`` for the
measurement). ``ProcessCollector`` has the same ``start()``/``stop()`` API as
``Collector``; the server picks one with ``make_collector(mode, ...)``.

How: the wired sources and extractors are pickled (before any client exists; HTTP
sources drop theirs when pickled) and a child process started with ``spawn`` (never fork a
process that runs gRPC) rebuilds them and runs the normal ``Collector`` on its own event
loop, against a mirror of the pool. The parent tells the child about endpoint additions,
updates and removals; the child sends back, every ``flush_interval``, one batch with, per
endpoint that ticked, only what changed: the new ``Metrics`` fields, the attribute map,
the health verdict, plus error counts and log records. The parent applies them with the
same snapshot swaps the in-process collector uses, so readers cannot tell the difference.

Limits: only what extractors write onto the endpoint (metrics, custom, attributes) crosses
the process boundary. An extractor with side effects elsewhere in the parent (e.g. feeding
an in-memory index) needs the in-process mode. Plugins must be picklable. If the child
dies it is restarted after ``restart_delay``; endpoints keep their last data meanwhile
(and age, so staleness-aware consumers notice).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import operator
import pickle
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Sequence

from epp.datalayer.collector import (
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_TIMEOUT,
    DEFAULT_UNREACHABLE_AFTER,
    Collector,
    CollectorSink,
    MetricsSink,
)
from epp.datalayer.endpoint import Endpoint, EndpointMetadata, Metrics
from epp.datalayer.childproc import ChildProcess, FdPair, run_child
from epp.datalayer.childproc import drain as _drain
from epp.datalayer.childproc import dumps as _dumps
from epp.datalayer.childproc import frame as _frame
from epp.datalayer.childproc import open_pipes as _open_pipes
from epp.datalayer.childproc import read_msg as _read_msg
from epp.datalayer.pool import EndpointPool
from epp.framework.handle import PluginHandle, logging_warn
from epp.framework.plugin import Plugin, RuntimeSettings

if TYPE_CHECKING:
    from epp.config.model import SourceWiring

log = logging.getLogger(__name__)

MODES = ("process", "inprocess")
_METRIC_FIELDS = tuple(f.name for f in dataclasses.fields(Metrics))
_MAPPING_FIELDS = frozenset(
    f.name for f in dataclasses.fields(Metrics) if "Mapping" in str(f.type)
)
_METRIC_VALUES = operator.attrgetter(*_METRIC_FIELDS)  # one C call per update instead of a generator
_MAPPING_AT = tuple(i for i, name in enumerate(_METRIC_FIELDS) if name in _MAPPING_FIELDS)


class CollectorProcessError(RuntimeError):
    """The collector process could not be started (the message says why)."""


def make_collector(
    mode: str,
    pool: EndpointPool,
    wirings: Sequence["SourceWiring"],
    **options: Any,
) -> "Collector | ProcessCollector":
    """The collector for ``--collector-mode``: ``process`` (default) or ``inprocess``."""
    if mode == "process":
        return ProcessCollector(pool, wirings, **options)
    if mode == "inprocess":
        for key in ("flush_interval", "restart_delay", "nice"):
            options.pop(key, None)
        return Collector(pool, wirings, **options)
    raise ValueError(f"unknown collector mode {mode!r} (expected one of: {', '.join(MODES)})")


def _health(ep: Endpoint) -> tuple:
    """What the collector knows about an endpoint's health, as it crosses the process boundary."""
    return (ep.reachable, ep.last_scrape_ok, ep.first_failure, ep.failures)


def _upsert(ep: Endpoint) -> tuple:
    """Endpoint identity plus its health so far (a restarted or reloaded child resumes it)."""
    m = ep.metadata
    return ("upsert", (m.address, m.port, m.name, m.namespace, m.metrics_port, dict(m.labels)), _health(ep))


# -- the parent side ----------------------------------------------------------------------------

class ProcessCollector:
    """A ``Collector`` running in a child process; applies its updates to ``pool`` here."""

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
        flush_interval: float = 0.01,
        restart_delay: float = 1.0,
        nice: int = 5,
        sink: CollectorSink | None = None,
    ) -> None:
        self.pool = pool
        self.wirings = tuple(wirings)
        # The child runs at a lower CPU priority (``nice``): when cores are short, the request
        # path wins and the data merely gets a little older.
        self.options = {"interval": interval, "timeout": timeout, "unreachable_after": unreachable_after,
                        "failure_threshold": failure_threshold, "max_backoff": max_backoff,
                        "flush_interval": flush_interval, "pool_name": pool.name, "nice": nice}
        self.restart_delay = restart_delay
        self.sink: CollectorSink = sink if sink is not None else MetricsSink(pool.name)
        self.ticks: dict[str, int] = {}
        self._child: ChildProcess | None = None
        self._maps: dict[tuple[str, str], Any] = {}  # reuse identical mappings across updates

    async def start(self) -> None:
        if self._child is not None:
            return
        for w in self.wirings:
            w.source.bind(w.extractors)
        try:
            payload = _dumps([(w.source, w.extractors) for w in self.wirings])
        except Exception as e:
            raise CollectorProcessError(
                f"the data-layer plugins cannot be sent to the collector process ({type(e).__name__}: {e}); "
                f"use the in-process collector mode for them"
            ) from e
        self._child = ChildProcess("collector process", _child_main, (payload, self.options, _effective_level()),
                                   on_message=self._on_message, error=CollectorProcessError,
                                   on_spawn=self._send_pool, restart_delay=self.restart_delay,
                                   stale="endpoint data goes stale")
        self.pool.subscribe(self._on_pool_event)
        for ep in self.pool.endpoints():
            self.sink.reachability(ep, ep.reachable)
        try:
            await self._child.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        self.pool.unsubscribe(self._on_pool_event)
        await child.stop()

    @property
    def restarts(self) -> int:
        return self._child.restarts if self._child is not None else 0

    @property
    def child_pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def endpoints(self) -> list[str]:
        return [ep.key for ep in self.pool.endpoints()] if self.wirings else []

    def _on_message(self, msg: Any) -> None:
        if msg[0] == "batch":
            self._apply(msg[1], msg[2], msg[3])

    def _send_pool(self) -> None:
        for ep in self.pool.endpoints():
            self._send(_upsert(ep))

    # -- pool -> child -----------------------------------------------------------------------

    def _send(self, msg: Any) -> None:
        if self._child is not None:
            self._child.send(msg)

    def _on_pool_event(self, event: str, ep: Endpoint) -> None:
        if event == "removed":
            self._send(("remove", ep.key))
            self.ticks.pop(ep.key, None)
            for k in [k for k in self._maps if k[0] == ep.key]:
                del self._maps[k]
            self.sink.forget(ep)
        else:
            if event == "added":
                self.sink.reachability(ep, ep.reachable)
            self._send(_upsert(ep))

    # -- child -> pool -----------------------------------------------------------------------

    def _apply(self, updates: list[tuple], errors: dict[tuple, int], logs: list[tuple]) -> None:
        pool = self.pool
        for key, ticks, metrics, attrs, health in updates:
            ep = pool.get(key)
            if ep is None:
                continue  # removed meanwhile
            self.ticks[key] = ticks
            if metrics is not None:
                ep.metrics = self._metrics(key, metrics)
            if attrs is not None:
                ep.attributes = MappingProxyType(attrs)
            reachable, last_ok, ep.first_failure, failures = health
            pool.set_failures(ep, failures)
            if pool.set_reachable(ep, reachable):
                self.sink.reachability(ep, reachable)
            if last_ok != ep.last_scrape_ok:
                ep.last_scrape_ok = last_ok
                pool.scrape_succeeded(ep, last_ok)
        if updates:
            pool.data_changed()
        for what, n in errors.items():
            if what[0] == "poll":
                self.sink.poll_error(what[1], n)
            else:
                self.sink.extract_error(what[1], what[2], n)
        for level, name, message in logs:
            logging.getLogger(name).log(level, "%s", message)

    def _metrics(self, key: str, values: tuple) -> Metrics:
        kwargs = {}
        for name, value in zip(_METRIC_FIELDS, values):
            if name in _MAPPING_FIELDS:
                cached = self._maps.get((key, name))
                if cached is not None and cached == value:
                    value = cached  # unchanged: keep the same read-only mapping
                else:
                    value = MappingProxyType(value)
                    self._maps[(key, name)] = value
            kwargs[name] = value
        return Metrics(**kwargs)


def _effective_level() -> int:
    return logging.getLogger("epp").getEffectiveLevel()


# -- the child side -----------------------------------------------------------------------------

def _child_main(fds: FdPair, payload: bytes, options: dict[str, Any], level: int) -> None:
    run_child(_child, fds, payload, options, level, nice=options.get("nice", 0))


class _Batcher:
    """Collects what changed since the last flush; the collector's sink and tick hook feed it."""

    def __init__(self, collector_ticks: dict[str, int]) -> None:
        self.ticks = collector_ticks
        self.dirty: dict[str, Endpoint] = {}
        self.sent: dict[str, tuple[Any, Any]] = {}  # key -> (metrics, attributes) objects last sent
        self.errors: dict[tuple, int] = {}
        self.logs: list[tuple[int, str, str]] = []

    # CollectorSink
    def poll_error(self, source_type: str, count: int = 1) -> None:
        k = ("poll", source_type)
        self.errors[k] = self.errors.get(k, 0) + count

    def extract_error(self, source_type: str, extractor_type: str, count: int = 1) -> None:
        k = ("extract", source_type, extractor_type)
        self.errors[k] = self.errors.get(k, 0) + count

    def reachability(self, endpoint: Endpoint, reachable: bool) -> None:
        self.dirty[endpoint.key] = endpoint  # shipped with the health tuple of the next batch

    def forget(self, endpoint: Endpoint) -> None:
        self.dirty.pop(endpoint.key, None)
        self.sent.pop(endpoint.key, None)

    def touch(self, ep: Endpoint) -> None:
        self.dirty[ep.key] = ep

    def take(self) -> tuple | None:
        if not self.dirty and not self.errors and not self.logs:
            return None
        updates = []
        for key, ep in self.dirty.items():
            prev = self.sent.get(key)
            m, a = ep.metrics, ep.attributes
            health = _health(ep)
            metrics = None if prev is not None and prev[0] is m else _metrics_tuple(m)
            attrs = None if prev is not None and prev[1] is a else _picklable(a)
            self.sent[key] = (m, a)
            updates.append((key, self.ticks.get(key, 0), metrics, attrs, health))
        self.dirty = {}
        batch = ("batch", updates, self.errors, self.logs)
        self.errors = {}
        self.logs = []
        return batch


def _metrics_tuple(m: Metrics) -> tuple:
    values = list(_METRIC_VALUES(m))
    for i in _MAPPING_AT:  # read-only mappings travel as plain dicts
        values[i] = dict(values[i])
    return tuple(values)


def _picklable(attrs: Any) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        try:
            _dumps(v)
        except Exception as e:
            logging.getLogger(__name__).error("endpoint attribute %r cannot be sent to the serving process: %s", k, e)
            continue
        out[k] = v
    return out


class _ForwardLogs(logging.Handler):
    def __init__(self, batcher: _Batcher) -> None:
        super().__init__()
        self.batcher = batcher

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            self.batcher.logs.append((record.levelno, record.name, msg))
        except Exception:  # never let logging break collection
            pass


async def _child(fds: FdPair, payload: bytes, options: dict[str, Any], level: int) -> None:
    reader, _, writer = await _open_pipes(fds.read_fd, fds.write_fd)
    pool = EndpointPool(options["pool_name"])
    batcher = _Batcher({})
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(batcher)]
    root.setLevel(level)
    plugins: list[Plugin] = []
    collector: Collector | None = None
    flusher: asyncio.Task[None] | None = None

    def send(msg: Any) -> None:
        writer.write(_frame(msg))

    try:
        from epp.config.model import SourceWiring

        pairs = pickle.loads(payload)
        wirings = [SourceWiring(src, tuple(exs)) for src, exs in pairs]
        for w in wirings:
            for p in (w.source, *w.extractors):
                if p not in plugins:
                    plugins.append(p)
        settings = RuntimeSettings(refresh_metrics_interval=options["interval"], pool_name=pool.name)
        handle = PluginHandle(plugins, pool=pool, settings=settings, warn=logging_warn)
        for p in plugins:
            await p.start(handle)
        collector = Collector(pool, wirings, interval=options["interval"], timeout=options["timeout"],
                              unreachable_after=options["unreachable_after"],
                              failure_threshold=options["failure_threshold"], max_backoff=options["max_backoff"],
                              sink=batcher, on_tick=batcher.touch)
        batcher.ticks = collector.ticks
        await collector.start()
    except Exception as e:
        send(("error", f"collector process failed to start: {type(e).__name__}: {e}"))
        await _drain(writer)
        return
    send(("ready",))

    async def flush_forever() -> None:
        period = options["flush_interval"]
        while True:
            await asyncio.sleep(period)
            batch = batcher.take()
            if batch is not None:
                send(batch)

    flusher = asyncio.get_running_loop().create_task(flush_forever())
    try:
        while True:
            try:
                msg = await _read_msg(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the serving process went away: nothing left to feed
            if msg[0] == "upsert":
                meta = EndpointMetadata(*msg[1])
                known = pool.get(meta.key) is not None
                ep = pool.upsert(meta)
                if not known:  # a failure run that began before this child keeps counting
                    reachable, ep.last_scrape_ok, ep.first_failure, failures = msg[2]
                    pool.set_failures(ep, failures)
                    pool.set_reachable(ep, reachable)
            elif msg[0] == "remove":
                pool.remove(msg[1])  # the collector stops the loop and tells the batcher to forget it
            elif msg[0] == "stop":
                break
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await collector.stop()
        for p in plugins:
            try:
                await p.close()
            except Exception as e:
                log.warning("closing %s failed: %s", p, e)
        batch = batcher.take()
        if batch is not None:
            send(batch)
        await _drain(writer)

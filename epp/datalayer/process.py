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
import copyreg
import dataclasses
import io
import logging
import multiprocessing
import operator
import os
import pickle
import struct
import time
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Sequence

from epp.datalayer.collector import (
    DEFAULT_INTERVAL,
    DEFAULT_TIMEOUT,
    DEFAULT_UNREACHABLE_AFTER,
    Collector,
    CollectorSink,
    MetricsSink,
)
from epp.datalayer.endpoint import Endpoint, EndpointMetadata, Metrics
from epp.datalayer.pool import EndpointPool
from epp.framework.handle import PluginHandle, logging_warn
from epp.framework.plugin import Plugin, RuntimeSettings

if TYPE_CHECKING:
    from epp.config.model import SourceWiring

log = logging.getLogger(__name__)

MODES = ("process", "inprocess")
_HEADER = struct.Struct("!I")
_METRIC_FIELDS = tuple(f.name for f in dataclasses.fields(Metrics))
_MAPPING_FIELDS = frozenset(
    f.name for f in dataclasses.fields(Metrics) if "Mapping" in str(f.type)
)
_METRIC_VALUES = operator.attrgetter(*_METRIC_FIELDS)  # one C call per update instead of a generator
_MAPPING_AT = tuple(i for i, name in enumerate(_METRIC_FIELDS) if name in _MAPPING_FIELDS)
_START_TIMEOUT = 60.0


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


# -- framing: 4-byte length + pickle, over plain pipes driven by asyncio ------------------------

# Read-only mappings (labels, attribute maps, engine tables) are everywhere in our objects;
# pickle them as the dict they wrap.
def _mappingproxy(d: dict) -> MappingProxyType:
    return MappingProxyType(d)


_DISPATCH = {**copyreg.dispatch_table, MappingProxyType: lambda m: (_mappingproxy, (dict(m),))}


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(obj)
    return buf.getvalue()


def _frame(msg: Any) -> bytes:
    body = _dumps(msg)
    return _HEADER.pack(len(body)) + body


async def _open_pipes(read_fd: int, write_fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport,
                                                            asyncio.WriteTransport]:
    """Asyncio transports over two pipe fds; the transports own (and close) the fds."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                     open(read_fd, "rb", buffering=0))
    write_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, open(write_fd, "wb", buffering=0))
    return reader, read_transport, write_transport


async def _read_msg(reader: asyncio.StreamReader) -> Any:
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(n))


def _upsert(ep: Endpoint) -> tuple:
    """Endpoint identity plus its health so far (a restarted or reloaded child resumes it)."""
    m = ep.metadata
    return ("upsert", (m.address, m.port, m.name, m.namespace, m.metrics_port, dict(m.labels)),
            (ep.reachable, ep.last_scrape_ok, ep.first_failure))


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
                        "flush_interval": flush_interval, "pool_name": pool.name, "nice": nice}
        self.restart_delay = restart_delay
        self.sink: CollectorSink = sink if sink is not None else MetricsSink(pool.name)
        self.ticks: dict[str, int] = {}
        self.restarts = 0
        self.child_pid: int | None = None
        self._payload = b""
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._reader: asyncio.StreamReader | None = None
        self._read_transport: asyncio.BaseTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stopping = False
        self._running = False
        self._maps: dict[tuple[str, str], Any] = {}  # reuse identical mappings across updates

    async def start(self) -> None:
        if self._running:
            return
        for w in self.wirings:
            w.source.bind(w.extractors)
        try:
            self._payload = _dumps([(w.source, w.extractors) for w in self.wirings])
        except Exception as e:
            raise CollectorProcessError(
                f"the data-layer plugins cannot be sent to the collector process ({type(e).__name__}: {e}); "
                f"use the in-process collector mode for them"
            ) from e
        self._running = True
        self._stopping = False
        self.pool.subscribe(self._on_pool_event)
        for ep in self.pool.endpoints():
            self.sink.reachability(ep, ep.reachable)
        try:
            await self._spawn()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._stopping = True
        self.pool.unsubscribe(self._on_pool_event)
        self._send(("stop",))
        proc = self._proc
        if proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, proc.join, 5.0)
            if proc.is_alive():
                log.warning("collector process %s did not stop in time; terminating it", proc.pid)
                proc.terminate()
                await asyncio.get_running_loop().run_in_executor(None, proc.join, 2.0)
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None
        self._close_pipes()

    @property
    def endpoints(self) -> list[str]:
        return [ep.key for ep in self.pool.endpoints()] if self.wirings else []

    # -- child lifecycle -------------------------------------------------------------------

    async def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        # The child reads commands from to_child_r and writes batches to to_parent_w.
        proc = ctx.Process(
            target=_child_main,
            args=(_FdPair(to_child_r, to_parent_w), self._payload, self.options, _effective_level()),
            name="epp-collector",
            daemon=True,
        )
        proc.start()
        os.close(to_child_r)
        os.close(to_parent_w)
        self._proc = proc
        self.child_pid = proc.pid
        self._reader, self._read_transport, self._writer = await _open_pipes(to_parent_r, to_child_w)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._pump = loop.create_task(self._read_loop(), name="collector-process reader")
        for ep in self.pool.endpoints():
            self._send(_upsert(ep))
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), _START_TIMEOUT)
        except asyncio.TimeoutError:
            raise CollectorProcessError(f"collector process did not start within {_START_TIMEOUT:g}s") from None

    def _close_pipes(self) -> None:
        for transport in (self._writer, self._read_transport):
            if transport is not None:
                transport.close()
        self._writer = self._read_transport = None

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            while True:
                msg = await _read_msg(reader)
                kind = msg[0]
                if kind == "batch":
                    self._apply(msg[1], msg[2], msg[3])
                elif kind == "ready":
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(None)
                elif kind == "error":
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_exception(CollectorProcessError(msg[1]))
                    else:
                        log.error("collector process: %s", msg[1])
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("collector process: bad message; restarting it")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(CollectorProcessError(
                f"collector process exited during startup (exit code {await self._exitcode()})"))
            return
        if not self._stopping:
            asyncio.get_running_loop().create_task(self._restart())

    async def _exitcode(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        await asyncio.get_running_loop().run_in_executor(None, proc.join, 1.0)
        return proc.exitcode

    async def _restart(self) -> None:
        code = await self._exitcode()
        log.error("collector process exited unexpectedly (exit code %s); endpoint data goes stale until it is "
                  "restarted in %.1fs", code, self.restart_delay)
        self._close_pipes()
        await asyncio.sleep(self.restart_delay)
        if self._stopping or not self._running:
            return
        self.restarts += 1
        try:
            await self._spawn()
        except Exception as e:
            log.error("collector process restart failed: %s", e)
            if not self._stopping:
                asyncio.get_running_loop().create_task(self._restart())

    # -- pool -> child -----------------------------------------------------------------------

    def _send(self, msg: Any) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_frame(msg))

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
            reachable, ep.last_scrape_ok, ep.first_failure = health
            if pool.set_reachable(ep, reachable):
                self.sink.reachability(ep, reachable)
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


class _FdPair:
    """Two raw pipe fds handed to the spawned child (multiprocessing passes them as DupFd)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    def __reduce__(self) -> Any:
        from multiprocessing.reduction import DupFd

        return (_FdPair._rebuild, (DupFd(self.read_fd), DupFd(self.write_fd)))

    @staticmethod
    def _rebuild(read_dup: Any, write_dup: Any) -> "_FdPair":
        return _FdPair(read_dup.detach(), write_dup.detach())


# -- the child side -----------------------------------------------------------------------------

def _child_main(fds: _FdPair, payload: bytes, options: dict[str, Any], level: int) -> None:
    if options.get("nice"):
        try:
            os.nice(options["nice"])
        except OSError:
            pass
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    runner(_child(fds, payload, options, level))


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
            health = (ep.reachable, ep.last_scrape_ok, ep.first_failure)
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


async def _child(fds: _FdPair, payload: bytes, options: dict[str, Any], level: int) -> None:
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
                              unreachable_after=options["unreachable_after"], sink=batcher, on_tick=batcher.touch)
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
                    reachable, ep.last_scrape_ok, ep.first_failure = msg[2]
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


async def _drain(writer: asyncio.WriteTransport) -> None:
    deadline = time.monotonic() + 2.0
    while writer.get_write_buffer_size() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    writer.close()

"""A worker child process for data-layer work kept off the serving event loop.

Used by the collector process (``epp.datalayer.process``) and the KV-event subscriber process
(``epp.kvevents.process``). The parent's ``ChildProcess`` spawns the child (``spawn``, never
``fork`` a process that runs gRPC), talks to it with framed messages over two plain pipes driven
by asyncio (a 4-byte big-endian length and a pickle), waits for its ``("ready",)`` (or
``("error", text)``), hands every other message to ``on_message``, and restarts it after
``restart_delay`` when it dies, calling ``on_exit`` first (so the parent can drop state that
came from the dead child) and ``on_spawn`` once the new one is up (to send it the current
state). The child's entry point gets an ``FdPair``; ``run_child`` runs its coroutine on uvloop
at a lower CPU priority (``nice``): when cores are short, the request path wins.
"""

from __future__ import annotations

import asyncio
import copyreg
import io
import logging
import multiprocessing
import os
import pickle
import signal
import struct
import time
from types import MappingProxyType
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
START_TIMEOUT = 60.0


# --- framing --------------------------------------------------------------------------------------
# Read-only mappings (labels, attribute maps, engine tables) are everywhere in our objects;
# pickle them as the dict they wrap.
def _mappingproxy(d: dict) -> MappingProxyType:
    return MappingProxyType(d)


_DISPATCH = {**copyreg.dispatch_table, MappingProxyType: lambda m: (_mappingproxy, (dict(m),))}


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(obj)
    return buf.getvalue()


def frame(msg: Any) -> bytes:
    body = dumps(msg)
    return _HEADER.pack(len(body)) + body


async def open_pipes(read_fd: int, write_fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport,
                                                           asyncio.WriteTransport]:
    """Asyncio transports over two pipe fds; the transports own (and close) the fds."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                     open(read_fd, "rb", buffering=0))
    write_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, open(write_fd, "wb", buffering=0))
    return reader, read_transport, write_transport


async def read_msg(reader: asyncio.StreamReader) -> Any:
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(n))


async def drain(writer: asyncio.WriteTransport) -> None:
    """Flush what is buffered (at most 2 s), then close."""
    deadline = time.monotonic() + 2.0
    while writer.get_write_buffer_size() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    writer.close()


class FdPair:
    """Two raw pipe fds handed to the spawned child (multiprocessing passes them as DupFd)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    def __reduce__(self) -> Any:
        from multiprocessing.reduction import DupFd

        return (FdPair._rebuild, (DupFd(self.read_fd), DupFd(self.write_fd)))

    @staticmethod
    def _rebuild(read_dup: Any, write_dup: Any) -> "FdPair":
        return FdPair(read_dup.detach(), write_dup.detach())


def run_child(main: Callable[..., Awaitable[None]], *args: Any, nice: int = 0) -> None:
    """The child's process entry: ``main(*args)`` on uvloop, ``nice`` steps below the parent.

    The child ignores SIGINT/SIGTERM: a terminal's Ctrl-C or a supervisor signalling the whole
    process group reaches it too, and it must not die before the parent has told it to stop
    (the parent would then log a crash and restart it). It ends on the parent's ``("stop",)``
    or when the pipe from the parent closes, i.e. when the parent is gone.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    runner(main(*args))


# --- the parent side -----------------------------------------------------------------------------
class ChildProcess:
    """Spawns ``target(FdPair, *args)`` and keeps it running; see the module docstring."""

    def __init__(self, name: str, target: Callable[..., None], args: tuple, *,
                 on_message: Callable[[Any], None], error: type[Exception] = RuntimeError,
                 on_spawn: Callable[[], None] | None = None, on_exit: Callable[[], None] | None = None,
                 restart_delay: float = 1.0, stale: str = "its data goes stale") -> None:
        self.name = name  # e.g. "collector process"
        self.target = target
        self.args = args
        self.on_message = on_message
        self.error = error
        self.on_spawn = on_spawn
        self.on_exit = on_exit
        self.restart_delay = restart_delay
        self.stale = stale  # what the restart log says happens meanwhile
        self.restarts = 0
        self.pid: int | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._read_transport: asyncio.BaseTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stopping = False
        self._running = False

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._stopping = False
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
        self.send(("stop",))
        proc = self._proc
        loop = asyncio.get_running_loop()
        if proc is not None:
            await loop.run_in_executor(None, proc.join, 5.0)
            if proc.is_alive():
                log.warning("%s %s did not stop in time; terminating it", self.name, proc.pid)
                proc.terminate()
                await loop.run_in_executor(None, proc.join, 2.0)
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None
        self._close_pipes()

    def send(self, msg: Any) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame(msg))

    async def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        # The child reads commands from to_child_r and writes to to_parent_w.
        proc = ctx.Process(target=self.target, args=(FdPair(to_child_r, to_parent_w), *self.args),
                           name="epp-" + self.name.replace(" process", "").replace(" ", "-"), daemon=True)
        proc.start()
        os.close(to_child_r)
        os.close(to_parent_w)
        self._proc = proc
        self.pid = proc.pid
        reader, self._read_transport, self._writer = await open_pipes(to_parent_r, to_child_w)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._pump = loop.create_task(self._read_loop(reader), name=f"{self.name} reader")
        if self.on_spawn is not None:
            self.on_spawn()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except asyncio.TimeoutError:
            raise self.error(f"{self.name} did not start within {START_TIMEOUT:g}s") from None

    def _close_pipes(self) -> None:
        for transport in (self._writer, self._read_transport):
            if transport is not None:
                transport.close()
        self._writer = self._read_transport = None

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await read_msg(reader)
                kind = msg[0]
                if kind == "ready":
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(None)
                elif kind == "error":
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_exception(self.error(msg[1]))
                    else:
                        log.error("%s: %s", self.name, msg[1])
                else:
                    self.on_message(msg)
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: bad message; restarting it", self.name)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(self.error(f"{self.name} exited during startup (exit code {await self._exitcode()})"))
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
        log.error("%s exited unexpectedly (exit code %s); %s until it is restarted in %.1fs",
                  self.name, code, self.stale, self.restart_delay)
        self._close_pipes()
        if self.on_exit is not None:
            self.on_exit()
        await asyncio.sleep(self.restart_delay)
        if self._stopping or not self._running:
            return
        self.restarts += 1
        try:
            await self._spawn()
        except Exception as e:
            log.error("%s restart failed: %s", self.name, e)
            if not self._stopping:
                asyncio.get_running_loop().create_task(self._restart())

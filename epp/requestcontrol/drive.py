"""Stepping the routing coroutine by hand: synchronous until it really has to wait.

Routing (``Director.route``) is a coroutine because a few steps may wait: flow control
holds a request while the pool is saturated, and a data producer may fetch token IDs over
HTTP. Most requests wait for nothing, and for them a Task would cost an event-loop hop and
a few microseconds of bookkeeping on every request. So the transport steps the coroutine
itself: ``step()`` runs it until it finishes (the common case: no hop at all) or until it
awaits an asyncio future that is still pending. The ext_proc stream is then parked, and
``wake_me`` calls back when that future is done, to step again.

What runs under a ``Driven`` is not inside an asyncio Task (``asyncio.current_task()`` is
None, so ``asyncio.timeout`` cannot be used there): await futures, or tasks that do the real
work. A bare ``yield`` (``asyncio.sleep(0)``) resumes on the next loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Driven(Generic[T]):
    __slots__ = ("_coro", "waiter", "result", "_handle", "_callback")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self.waiter: asyncio.Future[Any] | None = None  # what it waits for, while parked
        self.result: T | None = None
        self._handle: asyncio.Handle | None = None
        self._callback: Callable[[Any], None] | None = None

    def step(self) -> bool:
        """Run until the coroutine finishes (True; ``result`` is set) or waits (False).
        Exceptions of the coroutine propagate."""
        self.waiter = None
        self._handle = None
        try:
            yielded = self._coro.send(None)
        except StopIteration as done:
            self.result = done.value
            return True
        if yielded is None:  # a bare yield: asyncio.sleep(0)
            return False
        if getattr(yielded, "_asyncio_future_blocking", False):
            yielded._asyncio_future_blocking = False  # what a Task does before waiting on it
            self.waiter = yielded
            return False
        self._coro.close()
        raise RuntimeError(f"routing awaited {yielded!r}, which is not an asyncio future")

    def wake_me(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the event loop) when the coroutine can go on."""
        waiter = self.waiter
        if waiter is None:
            self._handle = asyncio.get_running_loop().call_soon(callback)
            return
        self._callback = cb = lambda _fut: callback()
        waiter.add_done_callback(cb)

    async def wait(self) -> None:
        """For transports that run in a task: until the coroutine can go on (never raises
        what the waiter holds; ``step`` will)."""
        waiter = self.waiter
        if waiter is None:
            await asyncio.sleep(0)
        else:
            await asyncio.wait((waiter,))

    def cancel(self) -> None:
        """Stop it where it waits: the waiter is cancelled and ``CancelledError`` is raised at
        the coroutine's await, as ``Task.cancel`` does, so ``finally`` blocks and queue
        removals run now. A coroutine that swallows the cancellation is closed."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            if self._callback is not None:
                waiter.remove_done_callback(self._callback)
            waiter.cancel()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._callback = None
        coro = self._coro
        try:
            coro.throw(asyncio.CancelledError())
        except (asyncio.CancelledError, StopIteration):
            return
        except Exception:  # an error while unwinding must not reach the transport
            log.exception("routing failed while being cancelled")
            return
        coro.close()

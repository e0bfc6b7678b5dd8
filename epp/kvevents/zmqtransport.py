"""ZMQ sockets for KV events: a SUB per publisher (or one bound SUB), and replay over DEALER.

Socket options: ``RCVHWM`` bounds what a flooding publisher can queue here (past it ZMQ
drops, and the session sees a gap); reconnection is ZMQ's own, every 100 ms backing off to
500 ms at most (``RECONNECT_IVL_MAX``): a restarted engine's first batches go to nobody until we
are connected again, and without a replay socket they are lost for good (the chains they start
stay unknown: their later blocks are skipped as unknown parents), so the bound is kept short;
an attempt costs one TCP SYN. ``LINGER 0`` so closing never blocks. A socket monitor reports
connects and disconnects for /debug and the reconnection counter.

Replay (vLLM ``replay_endpoint``, a ROUTER): send ``[empty, start seq (8 bytes BE)]`` and read
replies ``[empty, topic, seq, payload]`` (since vLLM PR #45177) or ``[empty, seq, payload]``
(before it) until the end marker with seq -1 and an empty payload. Bounded by 2 s without a
reply and 2 min in total, as llm-d's subscriber.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from epp.kvevents.session import ReplayError, Session, SessionStatus
from epp.kvevents.wire import END_OF_REPLAY, WireError, parse_seq

log = logging.getLogger(__name__)

REPLAY_IDLE_TIMEOUT = 2.0
REPLAY_TOTAL_TIMEOUT = 120.0
YIELD_EVERY = 64  # messages handled before letting other subscriptions run
RECONNECT_IVL_MAX_MS = 500  # see the module docstring


def tcp_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    return f"tcp://{host}:{port}"


def make_sub(ctx: zmq.asyncio.Context, topic_filter: str, hwm: int) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.setsockopt(zmq.IPV6, 1)  # dial [::1]-style endpoints too; IPv4 still works
    sock.setsockopt(zmq.SUBSCRIBE, topic_filter.encode())
    return sock


def replayer_for(ctx: zmq.asyncio.Context, address: str, limit: asyncio.Semaphore | None = None,
                 idle_timeout: float = REPLAY_IDLE_TIMEOUT,
                 total_timeout: float = REPLAY_TOTAL_TIMEOUT) -> Callable[[int], AsyncIterator[tuple[int, bytes]]]:
    """A ``Replayer`` asking the ROUTER at ``address``."""

    async def replay(start: int) -> AsyncIterator[tuple[int, bytes]]:
        if limit is not None:
            await limit.acquire()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(address)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + total_timeout
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise ReplayError(f"took longer than {total_timeout:g}s")
                wait = min(idle_timeout, left)
                if not await sock.poll(int(wait * 1000), zmq.POLLIN):
                    raise ReplayError(f"no reply from {address} for {wait:g}s")
                frames = await sock.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]
                if len(frames) == 3:
                    seq_frame, payload = frames[1], frames[2]
                elif len(frames) == 2:
                    seq_frame, payload = frames
                else:
                    raise ReplayError(f"reply with {len(frames)} frames")
                if seq_frame == END_OF_REPLAY:
                    return
                try:
                    seq = parse_seq(seq_frame)
                except WireError as e:
                    raise ReplayError(str(e)) from None
                yield seq, payload
        finally:
            sock.close(0)
            if limit is not None:
                limit.release()

    return replay


def monitor(sock: zmq.asyncio.Socket) -> zmq.asyncio.Socket:
    """The socket's connect/disconnect monitor; attach it before ``connect`` or the first event is lost."""
    return sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)


async def watch_connection(sock: zmq.asyncio.Socket, mon: zmq.asyncio.Socket, status: SessionStatus,
                           on_event: Callable[[str], None] | None = None) -> None:
    """Keep ``status.connected`` / ``reconnections`` current from the socket's monitor ``mon``."""
    ever = False
    try:
        while True:
            msg = parse_monitor_message(await mon.recv_multipart())
            event = msg["event"]
            if event == zmq.EVENT_CONNECTED:
                status.connected = True
                if ever:
                    status.reconnections += 1
                    if on_event is not None:
                        on_event("reconnect")
                ever = True
            elif event == zmq.EVENT_DISCONNECTED:
                status.connected = False
                if on_event is not None:
                    on_event("disconnect")
    except (asyncio.CancelledError, zmq.ZMQError):
        pass
    finally:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        mon.close(0)


async def pump(sock: zmq.asyncio.Socket, route: Callable[[bytes], Session | None],
               on_error: Callable[[str], None], gate: asyncio.Event | None = None) -> None:
    """Receive ``[topic, seq, payload]`` messages forever and hand each to its session.

    ``gate``, when given and cleared, pauses reading (backpressure from whoever consumes
    the index writes); ZMQ's high-water mark then bounds what queues up.
    """
    n = 0
    while True:
        if gate is not None and not gate.is_set():
            await gate.wait()
        frames = await sock.recv_multipart()
        n += 1
        if n % YIELD_EVERY == 0:
            await asyncio.sleep(0)  # a flooding publisher must not starve the others
        if len(frames) != 3:
            on_error("frames")
            continue
        session = route(frames[0])
        if session is not None:
            await session.on_message(frames[1], frames[2])

"""All KV-event subscriptions of one EPP, in-process: a push data source.

Per-endpoint mode (``discoverPods``): one SUB per pool endpoint dialing
``tcp://<address>:<socketPort>`` (and a replay DEALER to ``replaySocketPort`` when set),
created and dropped as the pool gains and loses endpoints; events are attributed to that
endpoint. Central mode (``zmqEndpoint``): one SUB bound there; each message is attributed to
the endpoint named by its topic ``kv@<address>:<port>@<model>`` (others are counted and
dropped), replayed from ``<address>:<replaySocketPort>`` when set. Both may run at once.

Each publisher gets a ``Session`` (sequence, gaps, replay) feeding one shared ``Ingestor``.
``epp.kvevents.process`` runs this same class in a child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import zmq
import zmq.asyncio

from epp.kvevents.config import KVEventsConfig
from epp.kvevents.ingest import Ingestor
from epp.kvevents.session import Session, SessionStatus
from epp.kvevents.wire import parse_topic
from epp.kvevents.zmqtransport import make_sub, monitor, pump, replayer_for, tcp_address, watch_connection

log = logging.getLogger(__name__)

MAX_CONCURRENT_REPLAYS = 8
_MAX_CENTRAL_SOURCES = 4096


class _Subscription:
    __slots__ = ("session", "sock", "tasks")

    def __init__(self, session: Session, sock: zmq.asyncio.Socket | None) -> None:
        self.session = session
        self.sock = sock
        self.tasks: list[asyncio.Task] = []


class Subscriptions:
    def __init__(self, config: KVEventsConfig, ingestor: Ingestor, gate: asyncio.Event | None = None) -> None:
        self.config = config
        self.gate = gate
        self.ingestor = ingestor
        self.ctx = zmq.asyncio.Context()
        self._subs: dict[str, _Subscription] = {}  # endpoint key -> per-endpoint subscription
        self._central: dict[str, Session] = {}  # endpoint named by a topic -> session (central mode)
        self._central_sock: zmq.asyncio.Socket | None = None
        self._central_status = SessionStatus("(central)", config.zmqEndpoint)
        self._tasks: list[asyncio.Task] = []
        self._replays = asyncio.Semaphore(MAX_CONCURRENT_REPLAYS)
        self._warned: set[str] = set()
        self.errors: dict[str, int] = {}  # transport-level errors (frames, unidentified topics)
        self.started = False

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.started = True
        if self.config.zmqEndpoint:
            sock = make_sub(self.ctx, self.config.central_filter(), self.config.hwm)
            sock.bind(self.config.zmqEndpoint)
            self._central_sock = sock
            self._central_status.connected = True
            loop = asyncio.get_running_loop()
            self._tasks.append(loop.create_task(self._guard(pump(sock, self._route_central, self._count_error, self.gate)),
                                                name="kv-events central"))
            log.info("kv-events: bound %s for publishers to connect", self.config.zmqEndpoint)

    async def stop(self) -> None:
        for key in list(self._subs):
            await self._drop(key, clear=False)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._central_sock is not None:
            self._central_sock.close(0)
            self._central_sock = None
        self.ctx.destroy(0)
        self.started = False

    # --- per-endpoint mode -----------------------------------------------------------------
    def track(self, key: str, address: str) -> None:
        """Subscribe to the publisher of endpoint ``key`` (``address`` is its host)."""
        if not self.config.discoverPods or key in self._subs:
            return
        pd = self.config.podDiscoveryConfig
        url = tcp_address(address, pd.socketPort)
        replay_url = tcp_address(address, pd.replaySocketPort) if pd.replaySocketPort else ""
        status = SessionStatus(key, url, replay_url)
        replayer = replayer_for(self.ctx, replay_url, self._replays) if replay_url else None
        session = Session(key, self.ingestor, replayer, status=status)
        sock = make_sub(self.ctx, self.config.endpoint_filter(), self.config.hwm)
        sub = _Subscription(session, sock)
        self._subs[key] = sub
        loop = asyncio.get_running_loop()
        mon = monitor(sock)
        sub.tasks.append(loop.create_task(watch_connection(sock, mon, status, lambda e: self._on_connection(sub, e)),
                                          name=f"kv-events monitor {key}"))
        sock.connect(url)
        sub.tasks.append(loop.create_task(
            self._guard(pump(sock, lambda _topic: session, self._count_error, self.gate), key), name=f"kv-events {key}"))

    def _on_connection(self, sub: _Subscription, event: str) -> None:
        if event == "disconnect":
            sub.session.disconnected()
            return
        sub.session.reconnected()
        sub.tasks = [t for t in sub.tasks if not t.done()]
        sub.tasks.append(asyncio.get_running_loop().create_task(self._guard(sub.session.verify(), sub.session.endpoint)))

    async def untrack(self, key: str) -> None:
        """The endpoint left the pool: stop listening and forget its blocks."""
        await self._drop(key, clear=True)

    async def _drop(self, key: str, *, clear: bool) -> None:
        sub = self._subs.pop(key, None)
        if sub is None:
            return
        for t in sub.tasks:
            t.cancel()
        for t in sub.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if sub.sock is not None:
            sub.sock.close(0)
        if clear:
            self.ingestor.clear(key)

    # --- central mode ----------------------------------------------------------------------
    def _route_central(self, topic: bytes) -> Session | None:
        parsed = parse_topic(topic)
        if parsed is None:
            self._count_error("unidentified-topic", f"topic {topic[:80]!r} does not name an endpoint "
                                                    "(expected kv@<address>:<port>@<model>)")
            return None
        key = parsed[0]
        session = self._central.get(key)
        if session is None:
            if len(self._central) >= _MAX_CENTRAL_SOURCES:
                self._count_error("too-many-publishers", f"more than {_MAX_CENTRAL_SOURCES} publishers")
                return None
            replay_url = ""
            port = self.config.podDiscoveryConfig.replaySocketPort
            host = key.rsplit(":", 1)[0] if ":" in key else key
            if port:
                replay_url = tcp_address(host.strip("[]"), port)
            status = SessionStatus(key, self.config.zmqEndpoint, replay_url, connected=True)
            replayer = replayer_for(self.ctx, replay_url, self._replays) if replay_url else None
            session = self._central[key] = Session(key, self.ingestor, replayer, status=status)
        return session

    # --- errors and status ------------------------------------------------------------------
    def _count_error(self, reason: str, detail: str = "") -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("kv-events: %s (%s); further ones are counted, not logged",
                        detail or "a message without the 3 frames [topic, seq, payload]", reason)

    async def _guard(self, coro, key: str = "(central)") -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except zmq.ZMQError as e:
            if e.errno != zmq.ETERM:
                self._count_error("zmq", f"subscription {key} failed: {e}")
        except Exception:
            log.exception("kv-events subscription %s failed", key)

    def statuses(self) -> list[dict]:
        now = time.time()
        out = []
        for key, sub in self._subs.items():
            d = sub.session.status.as_dict(now)
            d["blocks"] = self.ingestor.blocks(key)
            out.append(d)
        for key, session in self._central.items():
            d = session.status.as_dict(now)
            d["blocks"] = self.ingestor.blocks(key)
            out.append(d)
        return out

    def sessions(self) -> list[Session]:
        return [s.session for s in self._subs.values()] + list(self._central.values())

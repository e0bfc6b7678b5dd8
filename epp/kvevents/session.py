"""One publisher's event stream: sequence numbers, gaps, restarts and replay.

vLLM numbers its batches 0, 1, 2, ... per publisher process. A ``Session`` is fed every live
message of one publisher, in order, and decides:

- next in sequence: decode and apply;
- the first message we see has seq > 0 (we joined mid-stream) and the publisher has a
  replay socket: replay from 0 first, so blocks stored before we connected are known;
- a gap (seq > last + 1), or any message after the transport reconnected: replay from our
  last seq and check that the publisher still holds that exact batch (a digest of the
  payload). If so it is the publisher we followed and the replay continues our stream. If it
  holds a different batch there, it restarted: clear the endpoint and replay from 0. (A
  restart is otherwise only visible when its sequence falls back below ours.)
  Without a replay socket a gap is counted and the stream goes on, as llm-d does: the index
  may then keep blocks whose removal we missed;
- seq <= last: the publisher restarted (its cache is empty): clear the endpoint, then treat
  the message as a first one.

When the transport loses the publisher (its TCP connection closed: almost always the engine
process going away, whose cache goes with it), the endpoint's blocks are *suspended*: kept, but
not matched, until the stream is settled again: the publisher's next batch (or, with a replay
socket, the check made at once on reconnect) either continues our sequence (a network blip:
the blocks are matched again) or starts over (a restart: they are cleared). Without this, a
restarted engine keeps attracting its old prefixes on stale blocks until its first new batch.

A replay whose buffer no longer reaches our point resets the endpoint and applies what it
got: what was stored before that window is unknown, so it is dropped rather than guessed.
Live messages that were queued while a replay ran and that the replay already covered are
skipped. Replays are bounded by the ``Replayer`` (time, idle time) and, after a failure, not
retried during ``cooldown``.

Bad input is counted per reason and logged once per endpoint: payloads that are not
msgpack batches, bad sequence frames, unknown event types, malformed events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import xxhash

from epp.kvevents.ingest import Ingestor
from epp.kvevents.wire import WireError, decode_batch, parse_seq

log = logging.getLogger(__name__)

# start seq -> the buffered (seq, payload) pairs from start on; raises ReplayError on failure.
Replayer = Callable[[int], AsyncIterator[tuple[int, bytes]]]

REPLAY_COOLDOWN = 30.0


class ReplayError(RuntimeError):
    """A replay request failed (timeout, connection, bad reply)."""


@dataclass
class SessionStatus:
    """What /debug shows for one subscription."""

    endpoint: str
    address: str = ""
    replay_address: str = ""
    connected: bool = False
    last_seq: int | None = None
    messages: int = 0
    gaps: int = 0
    restarts: int = 0
    replays: int = 0
    replay_failures: int = 0
    resets: int = 0  # replays that could not cover the gap: the endpoint was cleared
    reconnections: int = 0
    suspended: bool = False  # disconnected: its blocks are not matched until the stream resumes
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count (decode, seq, ...)
    last_message_at: float = 0.0  # wall clock of the last message received
    last_batch_ts: float = 0.0  # the engine's timestamp of the last batch applied
    delivery_lag_s: float = 0.0  # receive time - engine timestamp, for the last batch

    def as_dict(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        out = {k: v for k, v in self.__dict__.items()}
        out["idle_s"] = round(now - self.last_message_at, 3) if self.last_message_at else None
        out["delivery_lag_s"] = round(self.delivery_lag_s, 4)
        return out


class Session:
    def __init__(self, endpoint: str, ingestor: Ingestor, replayer: Replayer | None = None, *,
                 status: SessionStatus | None = None, cooldown: float = REPLAY_COOLDOWN,
                 clock: Callable[[], float] = time.time) -> None:
        self.endpoint = endpoint
        self.ingestor = ingestor
        self.replayer = replayer
        self.status = status or SessionStatus(endpoint)
        self.cooldown = cooldown
        self.clock = clock
        self._last: int | None = None
        self._last_digest = 0  # of the last applied payload: tells our publisher from a restarted one
        self._dup: tuple[int, int] | None = None  # live seqs a finished replay already applied
        self._suspect = False  # reconnected: the publisher may have restarted behind our back
        self._replay_blocked_until = 0.0
        self._warned: set[str] = set()
        self._lock = asyncio.Lock()  # live messages and reconnect checks take turns

    @property
    def last_seq(self) -> int | None:
        return self._last

    # --- input ------------------------------------------------------------------------------
    def disconnected(self) -> None:
        """The transport lost the publisher: stop matching its blocks until its stream resumes."""
        if not self.status.suspended:
            self.status.suspended = True
            self.ingestor.suspend(self.endpoint)

    def _settled(self) -> None:
        """The stream is back and reconciled (continued, replayed or restarted): match it again."""
        if self.status.suspended:
            self.status.suspended = False
            self.ingestor.resume(self.endpoint)

    def reconnected(self) -> None:
        """The transport lost and regained the publisher: verify the stream on the next message
        (and, with a replay socket, at once: ``verify()``)."""
        self._suspect = True
        self._dup = None  # whatever comes now was not queued behind a replay

    async def verify(self) -> None:
        """After a reconnect, check with the replay socket whether the publisher restarted,
        without waiting for its next batch (an idle engine may send none for a long time)."""
        async with self._lock:
            if not self._suspect or self._last is None or not self._can_replay(self.clock()):
                return
            self._suspect = False
            await self._catch_up(None, b"")
            self._settled()

    async def on_message(self, seq_frame: bytes, payload: bytes) -> None:
        async with self._lock:
            await self._on_message(seq_frame, payload)
            self._settled()

    async def _on_message(self, seq_frame: bytes, payload: bytes) -> None:
        st = self.status
        st.messages += 1
        now = self.clock()
        st.last_message_at = now
        try:
            seq = parse_seq(seq_frame)
        except WireError as e:
            self._error("bad-sequence", str(e))
            return
        dup = self._dup
        if dup is not None:
            if dup[0] <= seq <= dup[1]:
                return  # queued while the replay that already covered it ran
            self._dup = None
        last = self._last
        suspect, self._suspect = self._suspect, False
        if last is not None and seq == last + 1 and not (suspect and self._can_replay(now)):
            self._apply(seq, payload, now)
            return
        if last is not None and seq <= last:
            self._restarted(last, seq)
            last = None
        elif last is not None and seq > last + 1:
            st.gaps += 1
        if last is None and seq == 0:
            self._apply(seq, payload, now)  # a publisher's first batch: nothing before it to fetch
        elif self._can_replay(now):
            await self._catch_up(seq, payload)
        else:
            self._apply(seq, payload, now)

    def reset(self) -> None:
        """Forget the sequence and the endpoint's blocks."""
        self._last = None
        self._dup = None
        self.status.last_seq = None
        self.status.suspended = False  # cleared: nothing stale is left to hide
        self.ingestor.clear(self.endpoint)

    # --- internals ---------------------------------------------------------------------------
    def _can_replay(self, now: float) -> bool:
        return self.replayer is not None and now >= self._replay_blocked_until

    def _restarted(self, last: int, seq: int) -> None:
        self.status.restarts += 1
        log.info("kv-events %s: the publisher restarted (we had seq %d, it has %s); clearing the endpoint's "
                 "blocks", self.endpoint, last, seq if seq >= 0 else "nothing")
        self.reset()

    def _apply(self, seq: int, payload: bytes, now: float) -> None:
        self._last = seq
        self._last_digest = _digest(payload)
        self.status.last_seq = seq
        try:
            batch = decode_batch(payload)
        except WireError as e:
            self._error("decode", str(e))
            return
        st = self.status
        if batch.ts:
            st.last_batch_ts = batch.ts
            st.delivery_lag_s = max(0.0, now - batch.ts)
        try:
            self.ingestor.apply(self.endpoint, batch)
        except Exception as e:  # a bug in ingestion must not kill the subscription
            self._error("apply", f"{type(e).__name__}: {e}")

    async def _fetch(self, start: int) -> list[tuple[int, bytes]] | None:
        """The publisher's buffered batches from ``start`` on; None if the replay failed."""
        st = self.status
        st.replays += 1
        assert self.replayer is not None
        got: list[tuple[int, bytes]] = []
        try:
            async for item in self.replayer(start):
                got.append(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            st.replay_failures += 1
            self._replay_blocked_until = self.clock() + self.cooldown
            self._error("replay", f"replay from {start} failed: {e}; no replay for {self.cooldown:g}s")
            return None
        return got

    async def _catch_up(self, seq: int | None, payload: bytes) -> None:
        """Fill in what we missed before live message ``seq`` from the publisher's replay buffer.

        With history, ask from our last seq and check the publisher still has that exact batch:
        then it is the publisher we followed and the rest continues our stream. Otherwise it
        restarted (clear, replay from 0) or no longer buffers our point (reset, take what it has).
        """
        last = self._last
        got: list[tuple[int, bytes]] | None
        if last is not None:
            got = await self._fetch(last)
            if got is None:
                self._finish(seq, payload, None)
                return
            if got and got[0][0] == last and _digest(got[0][1]) == self._last_digest:
                self._apply_run(got[1:])
                self._finish(seq, payload, got[1][0] if len(got) > 1 else None)
                return
            if not got or got[0][0] <= last:
                # Another batch at our seq, or nothing at all: a publisher always buffers its
                # latest batch, so this is a new process.
                self._restarted(last, got[0][0] if got else -1)
                got = got if got and got[0][0] == 0 else await self._fetch(0)
            else:
                self.status.resets += 1
                log.info("kv-events %s: the publisher no longer buffers seq %d; resetting the endpoint",
                         self.endpoint, last)
                self.reset()
        else:
            got = await self._fetch(0)
        if got:
            if got[0][0] != 0:
                self.status.resets += 1  # joined later than the buffer reaches: older blocks stay unknown
            self._apply_run(got)
        self._finish(seq, payload, got[0][0] if got else None)

    def _apply_run(self, got: list[tuple[int, bytes]]) -> None:
        now = self.clock()
        for s, p in got:
            last = self._last
            if last is not None:
                if s <= last:
                    continue
                if s != last + 1:
                    self.status.gaps += 1
            self._apply(s, p, now)

    def _finish(self, seq: int | None, payload: bytes, replayed_from: int | None) -> None:
        """After a catch-up: apply the live message that triggered it, unless the replay covered it.

        Live messages queued meanwhile that the replay covered are skipped afterwards (``_dup``):
        from the trigger's seq, or, after a reconnect check, from the first replayed seq.
        """
        last = self._last
        if seq is None:  # a reconnect check: no live message
            if replayed_from is not None and last is not None:
                self._dup = (replayed_from, last)
            return
        if last is not None and seq <= last:
            self._dup = (seq, last)
            return
        if last is not None and seq != last + 1:
            self.status.gaps += 1
        self._apply(seq, payload, self.clock())

    def _error(self, reason: str, detail: str) -> None:
        errors = self.status.errors
        errors[reason] = errors.get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("kv-events %s: %s (%s); further ones are counted, not logged", self.endpoint, detail, reason)


def _digest(payload: bytes) -> int:
    return xxhash.xxh64_intdigest(payload)

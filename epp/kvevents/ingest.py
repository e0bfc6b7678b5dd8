"""Applying decoded KV events to the block index: the engine-key side of the dual-key design.

Per publisher (an endpoint) we remember, for every engine block hash the engine reported:
the request keys that block completes (our own keys, see ``epp.kvcache.hasher``), the tiers
it is held in, and, when engine and index block sizes do not align, the chain state after it
(``after``/``tail``). A ``BlockStored`` resolves its ``parent_block_hash`` to that state and
hashes the event's ``token_ids`` from there; an unknown parent means we missed history, so
the event is skipped and counted (the subscriber's replay exists to avoid that). A
``BlockRemoved`` resolves engine hashes to request keys and drops them from the index once
no other engine block of that endpoint holds the same key in that tier (reference counts:
vLLM can hold one token prefix under several engine hashes, e.g. different multimodal
inputs that we do not tell apart). ``AllBlocksCleared`` and publisher restarts clear the
endpoint.

Block sizes: when the engine block is a multiple of the index block (the guides' vLLM 64 /
index 16), each engine block owns its whole request keys and evictions are exact. When it is
smaller or does not divide, a request key is owned by the engine block that completes it;
evicting an earlier engine block of that key leaves it in the index until the completing
block goes too (engines evict chain tails first, so this is rare and short).

Writes go to a ``Sink`` (``BlockIndex`` in-process; a recorder in the subscriber process).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from epp.kvcache.hasher import BlockHasher, token_bytes
from epp.kvcache.index import GPU
from epp.kvevents.wire import AllBlocksCleared, Batch, BlockRemoved, BlockStored, Skipped

log = logging.getLogger(__name__)

_ATTENTION_KINDS = frozenset({"full_attention", "mla_attention", "full", "mla"})
_MAX_LORA_NAMES = 1024


class Sink(Protocol):
    def add(self, endpoint: str, keys: Sequence[int], tier: str = GPU) -> None: ...
    def remove(self, endpoint: str, keys: Iterable[int], tier: str = GPU) -> int | None: ...
    def clear(self, endpoint: str) -> int | None: ...
    def suspend(self, endpoint: str) -> None: ...
    def resume(self, endpoint: str) -> None: ...


@dataclass
class IngestCounters:
    """What ingestion did per reason; the subscriber turns deltas into metrics."""

    stored: int = 0  # BlockStored events applied
    removed: int = 0  # BlockRemoved events applied
    cleared: int = 0  # AllBlocksCleared events
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> events skipped

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _as_tuple(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return (v,) if isinstance(v, int) else v


class _Source:
    """Engine-side state of one publisher."""

    __slots__ = ("keys", "after", "tail", "tiers", "refs")

    def __init__(self) -> None:
        self.keys: dict[int, int | tuple[int, ...]] = {}  # engine hash -> request key(s) it completes
        self.after: dict[int, int] = {}  # engine hash -> chain value after it, when it completes none
        self.tail: dict[int, bytes] = {}  # engine hash -> packed tokens after the last full index block
        self.tiers: dict[int, int] = {}  # engine hash -> tier mask, when not gpu only
        self.refs: dict[int, int] = {}  # (request key << 5 | tier) -> engine blocks holding it


class Ingestor:
    """Turns decoded batches into index writes, per publisher; see the module docstring."""

    def __init__(self, hasher: BlockHasher, sink: Sink, *, max_blocks_per_source: int = 10_000_000) -> None:
        self.hasher = hasher
        self.sink = sink
        self.max_blocks = max_blocks_per_source
        self.sources: dict[str, _Source] = {}
        self.counters = IngestCounters()
        self.lora_names: set[str] = set()
        self._tier_ids: dict[str, int] = {GPU: 0}
        self._tier_names: list[str] = [GPU]

    # --- tiers ---------------------------------------------------------------------------------
    def _tier(self, medium: str | None) -> int:
        name = medium.lower() if medium else GPU
        tid = self._tier_ids.get(name)
        if tid is None:
            if len(self._tier_names) >= 24:
                name = "other"
                tid = self._tier_ids.get(name)
                if tid is not None:
                    return tid
            tid = self._tier_ids[name] = len(self._tier_names)
            self._tier_names.append(name)
        return tid

    # --- entry points ----------------------------------------------------------------------------
    def apply(self, endpoint: str, batch: Batch) -> None:
        events = batch.events
        i, n = 0, len(events)
        while i < n:
            ev = events[i]
            i += 1
            if isinstance(ev, BlockStored):
                self.stored(endpoint, ev)
            elif isinstance(ev, BlockRemoved):
                # Engines send one BlockRemoved per evicted block: take a run of them at once.
                hashes = None
                while i < n and type(events[i]) is BlockRemoved and events[i].medium == ev.medium \
                        and events[i].group_idx == ev.group_idx:
                    if hashes is None:
                        hashes = list(ev.block_hashes)
                    hashes.extend(events[i].block_hashes)
                    self.counters.removed += 1
                    i += 1
                self.removed(endpoint, ev if hashes is None else BlockRemoved(hashes, ev.medium, ev.group_idx))
            elif isinstance(ev, AllBlocksCleared):
                self.counters.cleared += 1
                self.clear(endpoint)
            elif isinstance(ev, Skipped):
                self.counters.skip(ev.reason)

    def clear(self, endpoint: str) -> None:
        """Forget everything about ``endpoint`` (restart, AllBlocksCleared, removal from the pool)."""
        self.sources.pop(endpoint, None)
        self.sink.clear(endpoint)

    def suspend(self, endpoint: str) -> None:
        """Keep ``endpoint``'s blocks but stop matching them (its publisher disconnected)."""
        self.sink.suspend(endpoint)

    def resume(self, endpoint: str) -> None:
        self.sink.resume(endpoint)

    def blocks(self, endpoint: str) -> int:
        src = self.sources.get(endpoint)
        return len(src.keys) if src is not None else 0

    # --- BlockStored -------------------------------------------------------------------------
    def stored(self, endpoint: str, ev: BlockStored) -> None:
        if ev.group_idx not in (None, 0) or (ev.spec_kind is not None and ev.spec_kind not in _ATTENTION_KINDS):
            self.counters.skip("unsupported-cache-group")  # hybrid models: only full attention is prefix-indexed
            return
        src = self.sources.get(endpoint)
        if src is None:
            src = self.sources[endpoint] = _Source()
        tid = self._tier(ev.medium)
        if not ev.token_ids:
            self._tier_update(endpoint, src, ev.block_hashes, tid)
            return
        hasher = self.hasher
        lora = ev.lora_name or ""
        if lora and len(self.lora_names) < _MAX_LORA_NAMES:
            self.lora_names.add(lora)
        if ev.parent is None:
            chain, tail = hasher.root(lora, _salt(ev, lora)), b""
        else:
            state = self._state_after(src, ev.parent)
            if state is None:
                self.counters.skip("unknown-parent")
                return
            chain, tail = state
        n, bs = len(ev.block_hashes), ev.block_size
        if len(ev.token_ids) < n * bs:
            self.counters.skip("malformed")
            return
        try:
            data = token_bytes(ev.token_ids if len(ev.token_ids) == n * bs else ev.token_ids[: n * bs])
        except TypeError:
            self.counters.skip("malformed")
            return
        per = bs * 4  # packed bytes per engine block
        step = hasher.block_size * 4
        new_keys: list[int] = []
        if not tail and per == step and tid == 0:
            # Equal block sizes, GPU: the common case, inlined (one dict write and one count per block).
            all_keys = hasher.keys_of_bytes(data, chain)
            keys_of, refs = src.keys, src.refs
            for ek, rk in zip(ev.block_hashes, all_keys):
                if ek in keys_of:
                    self._record(src, ek, rk, None, b"", tid, new_keys)
                    continue
                keys_of[ek] = rk
                r = rk << 5
                refs[r] = refs.get(r, 0) + 1
                new_keys.append(rk)
        elif not tail and per % step == 0:
            # Aligned (engine block = k x index block): hash the whole run at once.
            all_keys = hasher.keys_of_bytes(data, chain)
            k = per // step
            for i, ek in enumerate(ev.block_hashes):
                mine = all_keys[i * k:(i + 1) * k]
                self._record(src, ek, mine[0] if k == 1 else tuple(mine), None, b"", tid, new_keys)
        else:
            for i, ek in enumerate(ev.block_hashes):
                chunk = tail + data[i * per:(i + 1) * per]
                m = len(chunk) // step
                mine = hasher.keys_of_bytes(chunk[: m * step], chain) if m else []
                if mine:
                    chain = mine[-1]
                tail = chunk[m * step:]
                keys: int | tuple[int, ...] = mine[0] if len(mine) == 1 else tuple(mine)
                self._record(src, ek, keys, None if mine else chain, tail, tid, new_keys)
        self.counters.stored += 1
        if new_keys:
            self.sink.add(endpoint, new_keys, self._tier_names[tid])
        if len(src.keys) > self.max_blocks:
            self._trim(endpoint, src)

    def _state_after(self, src: _Source, ek: int) -> tuple[int, bytes] | None:
        keys = src.keys.get(ek)
        if keys is None:
            return None
        chain = src.after.get(ek)
        if chain is None:
            chain = keys if isinstance(keys, int) else keys[-1]
        return chain, src.tail.get(ek, b"")

    def _record(self, src: _Source, ek: int, keys: int | tuple[int, ...], after: int | None, tail: bytes,
                tid: int, out: list[int]) -> None:
        old = src.keys.get(ek)
        if old is not None:
            # Stored again while we still know it: a removal we missed, or another tier.
            mask = src.tiers.get(ek, 1)
            if mask & (1 << tid):
                out.extend(_as_tuple(old))  # refresh recency only; no second reference
                return
            src.tiers[ek] = mask | (1 << tid)
            self._ref(src, _as_tuple(old), tid, out)
            return
        src.keys[ek] = keys
        if after is not None:
            src.after[ek] = after
        if tail:
            src.tail[ek] = tail
        if tid:
            src.tiers[ek] = 1 << tid
        self._ref(src, _as_tuple(keys), tid, out)

    @staticmethod
    def _ref(src: _Source, keys: tuple[int, ...], tid: int, out: list[int]) -> None:
        refs = src.refs
        for rk in keys:
            r = rk << 5 | tid
            refs[r] = refs.get(r, 0) + 1
            out.append(rk)

    def _tier_update(self, endpoint: str, src: _Source, hashes: list[int], tid: int) -> None:
        """A token-less BlockStored (offloading connectors): known blocks gain a tier."""
        out: list[int] = []
        for ek in hashes:
            keys = src.keys.get(ek)
            if keys is None:
                self.counters.skip("unknown-block")
                continue
            mask = src.tiers.get(ek, 1)
            if mask & (1 << tid):
                continue
            src.tiers[ek] = mask | (1 << tid)
            self._ref(src, _as_tuple(keys), tid, out)
        self.counters.stored += 1
        if out:
            self.sink.add(endpoint, out, self._tier_names[tid])

    # --- BlockRemoved ----------------------------------------------------------------------------
    def removed(self, endpoint: str, ev: BlockRemoved) -> None:
        if ev.group_idx not in (None, 0):
            self.counters.skip("unsupported-cache-group")
            return
        src = self.sources.get(endpoint)
        self.counters.removed += 1
        if src is None:
            return
        tid = self._tier(ev.medium)
        bit = 1 << tid
        gone: list[int] = []
        keys_of, tiers, refs = src.keys, src.tiers, src.refs
        plain = tid == 0 and not src.after and not src.tail  # GPU, equal block sizes: inlined
        for ek in ev.block_hashes:
            keys = keys_of.get(ek)
            if keys is None:
                continue  # never seen (joined late) or already gone: nothing to undo
            if plain and type(keys) is int and ek not in tiers:
                del keys_of[ek]
                r = keys << 5
                n = refs.get(r, 0) - 1
                if n > 0:
                    refs[r] = n
                else:
                    refs.pop(r, None)
                    gone.append(keys)
                continue
            mask = tiers.get(ek, 1)
            if not mask & bit:
                continue
            self._unref(src, _as_tuple(keys), tid, gone)
            mask &= ~bit
            if mask:
                src.tiers[ek] = mask
            else:
                self._forget(src, ek)
        if gone:
            self.sink.remove(endpoint, gone, self._tier_names[tid])

    @staticmethod
    def _unref(src: _Source, keys: tuple[int, ...], tid: int, out: list[int]) -> None:
        refs = src.refs
        for rk in keys:
            r = rk << 5 | tid
            n = refs.get(r, 0) - 1
            if n > 0:
                refs[r] = n
            else:
                refs.pop(r, None)
                out.append(rk)

    @staticmethod
    def _forget(src: _Source, ek: int) -> None:
        del src.keys[ek]
        src.after.pop(ek, None)
        src.tail.pop(ek, None)
        src.tiers.pop(ek, None)

    def _trim(self, endpoint: str, src: _Source) -> None:
        """Safety bound: drop the oldest engine blocks of a source that grew past the limit."""
        excess = len(src.keys) - self.max_blocks
        victims = []
        for ek in src.keys:
            victims.append(ek)
            if len(victims) >= excess:
                break
        by_tier: dict[int, list[int]] = {}
        for ek in victims:
            mask = src.tiers.get(ek, 1)
            keys = _as_tuple(src.keys[ek])
            for tid in range(len(self._tier_names)):
                if mask & (1 << tid):
                    self._unref(src, keys, tid, by_tier.setdefault(tid, []))
            self._forget(src, ek)
        self.counters.skip("source-over-capacity")
        for tid, gone in by_tier.items():
            if gone:
                self.sink.remove(endpoint, gone, self._tier_names[tid])


def _salt(ev: BlockStored, lora: str) -> str:
    """vLLM folds ``cache_salt`` into block 0's extra keys (after the LoRA name); find it there."""
    extra = ev.extra_keys
    if not extra:
        return ""
    first = extra[0]
    if not isinstance(first, (list, tuple)):
        return ""
    strings = [x for x in first if isinstance(x, str) and x != lora]
    return strings[-1] if strings else ""

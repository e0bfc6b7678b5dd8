"""vLLM's KV-event payloads: both event forms decode to the same events, any msgpack value is either
a batch or a WireError (never another exception), bad events inside a batch are Skipped records."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_publisher import encode_batch

from epp.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Skipped,
    WireError,
    decode_batch,
    fold_hash,
    parse_topic,
)

u64 = st.integers(0, (1 << 64) - 1)
digest = st.binary(min_size=16, max_size=32)
stored = st.builds(
    lambda hashes, parent, bs, medium, lora: {
        "type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
        "token_ids": list(range(len(hashes) * bs)), "block_size": bs, "lora_id": None, "medium": medium,
        "lora_name": lora},
    st.lists(st.one_of(u64, digest), min_size=1, max_size=4), st.one_of(st.none(), u64, digest),
    st.sampled_from([1, 4, 16]), st.sampled_from([None, "GPU", "CPU"]), st.sampled_from([None, "sql-lora"]))
removed = st.builds(lambda hashes, medium: {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium},
                    st.lists(st.one_of(u64, digest), min_size=1, max_size=4), st.sampled_from([None, "GPU", "CPU"]))
cleared = st.just({"type": "AllBlocksCleared"})
events = st.lists(st.one_of(stored, removed, cleared), max_size=6)


def normalized(ev):
    if isinstance(ev, BlockStored):
        return ("stored", tuple(ev.block_hashes), ev.parent, tuple(ev.token_ids or ()), ev.block_size, ev.medium,
                ev.lora_name)
    if isinstance(ev, BlockRemoved):
        return ("removed", tuple(ev.block_hashes), ev.medium)
    assert isinstance(ev, AllBlocksCleared)
    return ("cleared",)


@settings(max_examples=150, deadline=None)
@given(evs=events)
def test_map_and_positional_forms_decode_alike(evs):
    a = decode_batch(encode_batch(evs, "map", ts=1.5))
    b = decode_batch(encode_batch(evs, "array", ts=1.5))
    assert a.ts == b.ts == 1.5
    assert [normalized(e) for e in a.events] == [normalized(e) for e in b.events]
    for ev, raw in zip(a.events, evs):
        hashes = [fold_hash(h) for h in raw["block_hashes"]] if "block_hashes" in raw else None
        if hashes is not None:
            assert ev.block_hashes == hashes and all(0 <= h < 1 << 64 for h in hashes)


@settings(max_examples=300, deadline=None)
@given(value=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
                                    st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8)),
                          lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                  st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                          max_leaves=20))
def test_any_msgpack_value_is_a_batch_or_a_wire_error(value):
    try:
        batch = decode_batch(msgspec.msgpack.encode(value))
    except WireError:
        return
    assert all(isinstance(e, (BlockStored, BlockRemoved, AllBlocksCleared, Skipped)) for e in batch.events)


@given(st.binary(max_size=64))
def test_garbage_bytes_are_a_wire_error_or_a_batch(data):
    try:
        decode_batch(data)
    except WireError:
        pass


def test_bad_events_inside_a_good_batch_are_skipped_records():
    batch = decode_batch(encode_batch([
        {"type": "Mystery", "x": 1},
        {"type": "BlockStored", "block_hashes": [1], "block_size": 0, "token_ids": []},
        {"type": "BlockStored", "block_hashes": "nope", "block_size": 16},
        {"type": "BlockStored", "block_hashes": [1], "block_size": 16, "token_ids": ["a"] * 16},
        ["BlockRemoved", [7]],
        42,
    ]))
    kinds = [(type(e).__name__, getattr(e, "reason", "")) for e in batch.events]
    assert kinds == [("Skipped", "unknown-type"), ("Skipped", "malformed"), ("Skipped", "malformed"),
                     ("Skipped", "malformed"), ("BlockRemoved", ""), ("Skipped", "unknown-type")]


@pytest.mark.parametrize("topic,want", [
    (b"kv@10.0.0.1:8000@meta-llama/Llama-3.1-8B-Instruct", ("10.0.0.1:8000", "meta-llama/Llama-3.1-8B-Instruct")),
    (b"kv@[::1]:8000@m", ("[::1]:8000", "m")),
    (b"", None), (b"kv@@m", None), (b"kv@a", None), (b"\xff\xfe", None),
])
def test_topics(topic, want):
    assert parse_topic(topic) == want

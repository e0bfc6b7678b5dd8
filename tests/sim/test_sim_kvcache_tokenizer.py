"""KV block accounting and the tokenizer: properties that must hold for any input."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.sim.kvcache import CLEARED, REMOVED, STORED, KVCache
from epp.sim.tokenizer import block_hashes, chain_root, render_chat, tokenize

ROOT = chain_root("0")


@dataclass
class Holder:
    block_hashes: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    lora: str | None = None
    lora_id: int | None = None
    num_hashed: int = 0
    num_anon: int = 0
    tokens: int = field(default=0)


def holder(ids: list[int], block_size: int = 4) -> Holder:
    return Holder(block_hashes(ids, block_size, ROOT), list(ids))


class EventMirror:
    """What a subscriber knows from the events alone: hash -> (parent, block tokens)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: dict[int, tuple[int | None, tuple[int, ...]]] = {}

    def apply(self, events: list[tuple]) -> None:
        bs = self.block_size
        for event in events:
            if event[0] == STORED:
                _, hashes, parent, tokens, _, _ = event
                assert len(tokens) == len(hashes) * bs
                assert parent is None or parent in self.blocks  # a parent is always known (stored earlier)
                for i, h in enumerate(hashes):
                    assert h not in self.blocks  # stored once while cached
                    self.blocks[h] = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
                    parent = h
            elif event[0] == REMOVED:
                del self.blocks[event[1]]
            else:
                assert event[0] == CLEARED
                self.blocks.clear()

    def full_prefix(self, h: int) -> list[int] | None:
        """The token prefix that ends with block ``h``; None if a block on the way was evicted."""
        chain: list[tuple[int, ...]] = []
        cur: int | None = h
        while cur is not None:
            if cur not in self.blocks:
                return None
            cur, tokens = self.blocks[cur]
            chain.append(tokens)
        return [t for tokens in reversed(chain) for t in tokens]


def check_invariants(kv: KVCache, live: list[Holder]) -> None:
    held_anon = sum(h.num_anon for h in live)
    referenced = {hash_ for hash_, rc in kv.cached.items() if rc > 0}
    assert kv.num_used == held_anon + len(referenced)
    assert kv.num_used + kv.free_uncached + len(kv.evictable) == kv.num_blocks
    assert kv.free_uncached >= 0
    # Reference counts equal the number of live holders of each hash.
    counts: dict[int, int] = {}
    for h in live:
        for hash_ in h.block_hashes[: h.num_hashed]:
            counts[hash_] = counts.get(hash_, 0) + 1
    assert {k: v for k, v in kv.cached.items() if v} == counts
    assert set(kv.evictable) == {k for k, v in kv.cached.items() if v == 0}


# Prompts drawn from a few "documents" so that prefixes are often shared.
prompts = st.builds(
    lambda doc, length: [doc * 1000 + i for i in range(length)],
    st.integers(0, 3),
    st.integers(1, 200),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("new"), prompts),
        st.tuples(st.just("grow"), st.integers(0, 10), st.integers(1, 40)),
        st.tuples(st.just("free"), st.integers(0, 10)),
        st.tuples(st.just("reset")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_block_accounting_invariants_and_events_mirror_the_cache(operations) -> None:
    """Any sequence of allocations, frees and resets: the accounting holds, and a subscriber
    replaying the event log knows exactly the cached blocks and each one's token prefix."""
    kv = KVCache(num_blocks=48, block_size=4)
    kv.record_events()
    mirror = EventMirror(4)
    live: list[Holder] = []
    for op in operations:
        if op[0] == "new":
            ids = op[1]
            h = holder(ids)
            hits = kv.lookup_prefix(h.block_hashes, (len(ids) - 1) // 4)
            if kv.allocate(h, hits * 4 + 1):
                h.tokens = hits * 4 + 1
                live.append(h)
        elif op[0] == "grow" and live:
            h = live[op[1] % len(live)]
            before = (h.num_hashed, h.num_anon, kv.free_uncached, len(kv.evictable))
            if kv.allocate(h, h.tokens + op[2]):
                h.tokens += op[2]
            else:  # a failed allocation changes nothing
                assert before == (h.num_hashed, h.num_anon, kv.free_uncached, len(kv.evictable))
        elif op[0] == "free" and live:
            kv.free(live.pop(op[1] % len(live)))
        elif op[0] == "reset":
            for h in live:
                kv.free(h)
            live.clear()
            kv.reset()
        check_invariants(kv, live)
        mirror.apply(kv.take_events())
        assert set(mirror.blocks) == set(kv.cached)
    for h in live:
        kv.free(h)
    assert kv.num_used == 0
    for h in mirror.blocks:  # the events' tokens rebuild each hash chain (where no parent was evicted)
        prefix = mirror.full_prefix(h)
        if prefix is not None:
            assert block_hashes(prefix, 4, ROOT)[-1] == h


def test_usage_counts_only_referenced_blocks() -> None:
    kv = KVCache(num_blocks=10, block_size=4)
    h = holder(list(range(16)))
    assert kv.allocate(h, 16)
    assert kv.usage == 0.4
    kv.free(h)
    assert kv.usage == 0.0
    assert len(kv.evictable) == 4  # still cached, reusable, but counted as free


@given(st.text(max_size=500))
def test_tokenizer_is_deterministic_and_about_four_bytes_per_token(text: str) -> None:
    ids = tokenize(text)
    assert ids == tokenize(text)
    assert len(ids) == -(-len(text.encode()) // 4)
    assert all(0 <= t < 128_256 for t in ids)


@given(st.text(min_size=8, max_size=300), st.text(max_size=100), st.text(max_size=100))
def test_shared_text_prefix_gives_shared_token_prefix(prefix: str, a: str, b: str) -> None:
    full_tokens = len(prefix.encode()) // 4
    assert tokenize(prefix + a)[:full_tokens] == tokenize(prefix + b)[:full_tokens]


def test_english_text_is_about_four_characters_per_token() -> None:
    text = "The quick brown fox jumps over the lazy dog while the router picks an endpoint. " * 20
    assert 3.5 <= len(text) / len(tokenize(text)) <= 4.5


def test_chat_flattening_keeps_earlier_turns_as_a_prefix() -> None:
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    one, two = render_chat(turn1), render_chat(turn2)
    shared = one[: one.rindex("<|start_header_id|>assistant")]
    assert two.startswith(shared)
    assert "user" in one and "Hi" in one
    # Content parts are flattened too.
    assert "Hi" in render_chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])


def test_block_hashes_chain_extra_keys_and_seed() -> None:
    ids = list(range(64))
    base = block_hashes(ids, 16, ROOT)
    assert len(base) == 4
    assert block_hashes(ids + [1, 2, 3], 16, ROOT) == base  # a partial block is not hashed
    assert all(x != y for x, y in zip(block_hashes(ids, 16, ROOT, "adapter"), base))  # the LoRA name is an extra key
    changed = [99] + ids[1:]
    assert all(x != y for x, y in zip(block_hashes(changed, 16, ROOT), base))  # chained: all differ
    # A seed gives every server the same hashes (vLLM's PYTHONHASHSEED); no seed, a random root per start.
    assert chain_root("42") == chain_root("42") != chain_root("43")
    assert chain_root(None) != chain_root(None)
    assert block_hashes(ids, 16, chain_root("42")) != base

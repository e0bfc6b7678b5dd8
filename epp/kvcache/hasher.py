"""The EPP's own block keys ("request keys"): a chained hash over fixed-size token blocks.

Both sides of the precise prefix index compute keys with this one hasher: the KV-event
ingestion from each ``BlockStored`` event's ``token_ids``, and the request path from the
prompt's token IDs. That is llm-d's dual-key design: the engine's own block hashes are only
opaque names used to resolve evictions, so vLLM's hash algorithm, seed and block size never
have to match ours.

Key of block i = XXH64(the block's token IDs as unsigned 32-bit little-endian, seed = key of
block i-1); block 0 is seeded with a chain root derived from ``hashSeed``, the LoRA adapter
(its KV differs from the base model's) and the request's ``cache_salt``. Only full blocks
get keys. The keys never leave the process, so they only have to be stable for its lifetime:
upstream's ``cbor-fnv`` and ``xxh64`` names are both accepted and both give these keys
(FNV over canonical CBOR per block costs ~20x more in Python; see epp/kvcache/README.md).
"""

from __future__ import annotations

from array import array
from typing import Sequence

import xxhash

_xxh64 = xxhash.xxh64_intdigest
HASH_ALGORITHMS = ("cbor-fnv", "xxh64")


def token_bytes(tokens: Sequence[int]) -> bytes:
    """Token IDs as packed unsigned 32-bit integers (4 bytes per token, always)."""
    try:
        return array("I", tokens).tobytes()
    except OverflowError:  # negative or >= 2^32: no real vocabulary, but stay deterministic
        return array("I", [t & 0xFFFFFFFF for t in tokens]).tobytes()


class BlockHasher:
    """Chained request keys over blocks of ``block_size`` tokens."""

    __slots__ = ("block_size", "seed", "seed_text", "_step", "_roots")

    def __init__(self, block_size: int = 16, hash_seed: str = "") -> None:
        if block_size <= 0:
            raise ValueError("block size must be > 0")
        self.block_size = block_size
        self.seed_text = hash_seed
        self.seed = _xxh64(hash_seed.encode())
        self._step = block_size * 4
        self._roots: dict[tuple[str, str], int] = {}

    def root(self, lora: str = "", salt: str = "") -> int:
        """The chain's starting value for an adapter (``""`` = base model) and cache salt."""
        key = (lora, salt)
        r = self._roots.get(key)
        if r is None:
            r = _xxh64(lora.encode() + b"\x00" + salt.encode(), self.seed)
            if len(self._roots) < 4096:  # a few adapters x salts; never an unbounded map
                self._roots[key] = r
        return r

    def keys(self, tokens: Sequence[int], parent: int) -> list[int]:
        """Keys of every full block of ``tokens``, chained from ``parent``."""
        n = len(tokens) // self.block_size
        if n == 0:
            return []
        data = token_bytes(tokens if len(tokens) == n * self.block_size else tokens[: n * self.block_size])
        return self.keys_of_bytes(data, parent)

    def keys_of_bytes(self, data: bytes, parent: int) -> list[int]:
        """Like ``keys`` for tokens already packed by ``token_bytes`` (4 bytes each)."""
        step = self._step
        out = []
        append = out.append
        prev = parent
        for start in range(0, len(data) - step + 1, step):
            prev = _xxh64(data[start:start + step], prev)  # bytes slices beat memoryview slices here
            append(prev)
        return out

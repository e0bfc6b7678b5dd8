"""A deterministic stand-in tokenizer and the prefix-cache block hashes.

Real tokenizers average about 4 characters per token on English text. We cut
the UTF-8 bytes into fixed 4-byte pieces: it is the cheapest deterministic rule
(one ``struct.unpack`` call), and like a real tokenizer it maps a shared text
prefix to a shared token prefix, which is all prefix caching needs.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import xxhash

# Llama 3 vocabulary size; only used to keep ids in a plausible range.
VOCAB_SIZE = 128_256
BYTES_PER_TOKEN = 4

_BOS = "<|begin_of_text|>"


def tokenize(text: str) -> list[int]:
    """Same text -> same ids; ~1 token per 4 bytes; shared prefix -> shared ids."""
    data = text.encode("utf-8")
    pad = -len(data) % BYTES_PER_TOKEN
    if pad:
        data += b" " * pad
    n = len(data) // BYTES_PER_TOKEN
    words = struct.unpack(f"<{n}I", data)
    return [w % VOCAB_SIZE for w in words]


def _content_text(content: Any) -> str:
    """OpenAI message content is a string or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


def render_chat(messages: Iterable[Mapping[str, Any]]) -> str:
    """Flatten chat messages with role markers, Llama 3 style.

    The generation prompt for the assistant is appended, as vLLM does with
    ``add_generation_prompt=True``, so a conversation that grows by turns keeps
    the earlier turns as an exact text (and so token) prefix.
    """
    out = [_BOS]
    for message in messages:
        role = message.get("role", "user")
        out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n")
        out.append(_content_text(message.get("content")))
        out.append("<|eot_id|>")
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def chain_root(seed: str | None) -> int:
    """The hash the chain of block 0 hangs from (vLLM's ``NONE_HASH``).

    With a seed (vLLM reads ``PYTHONHASHSEED``) every server started with it
    computes the same hashes for the same blocks; without one each server
    start draws a random root, so hashes differ between servers and restarts,
    as they do in vLLM.
    """
    if seed is None:
        return int.from_bytes(os.urandom(8), "big")
    return xxhash.xxh3_64_intdigest(seed.encode("utf-8"))


def block_hashes(token_ids: Sequence[int], block_size: int, root: int, extra_key: str | None = None) -> list[int]:
    """Chained hashes of the *full* blocks of ``token_ids``, as unsigned 64-bit ints.

    Like vLLM, the hash of block i covers the hash of block i-1 (``root`` for
    block 0), the block's token ids and the request's extra keys, here the
    LoRA adapter name, so the same prompt under another adapter never shares
    KV. The function is our own: hash_i = xxh3_64(tokens ++ extra, seed=hash_{i-1}).
    A trailing partial block is not hashed: it cannot be reused, as in vLLM.
    """
    n_full = len(token_ids) // block_size
    if n_full == 0:
        return []
    ids = array("I", token_ids[: n_full * block_size])
    raw = ids.tobytes()
    step = block_size * ids.itemsize
    extra = b"" if extra_key is None else extra_key.encode("utf-8")
    h = root
    out: list[int] = []
    hash_fn = xxhash.xxh3_64_intdigest
    for start in range(0, len(raw), step):
        h = hash_fn(raw[start : start + step] + extra, seed=h)
        out.append(h)
    return out

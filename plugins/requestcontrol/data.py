"""Per-request data keys that producers write into ``Candidate.data`` and scorers read.

The key strings are upstream's data-key names, so ``consumes``/``produces`` declarations and
log lines read the same as upstream's. Values are small immutable records; a producer may
share one record between many candidates (e.g. every endpoint with no prefix match), so
consumers must never mutate them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PREFIX_CACHE_MATCH_INFO_KEY = "PrefixCacheMatchInfoKey"
# The prompt's token IDs (a ``TokenizedPrompt`` in the CycleState), from ``token-producer``.
TOKENIZED_PROMPT_KEY = "TokenizedPrompt"
INFLIGHT_LOAD_KEY = "InFlightLoadKey"
# Our own key (no upstream equivalent): requests routed to an endpoint still waiting for their
# first generated token, and their uncached prompt tokens (an ``InFlightLoad`` record).
PREFILL_BACKLOG_KEY = "PrefillBacklogKey"


def prefix_match_key(producer: str) -> str:
    """The data key of one named prefix producer (upstream: the key "with producer name").

    Every prefix producer writes its ``PrefixCacheMatchInfo`` under this key *and* the plain
    ``PREFIX_CACHE_MATCH_INFO_KEY``, so ``prefix-cache-scorer`` can name its producer
    (``prefixMatchInfoProducerName``) while other consumers read whichever one is configured.
    """
    return f"{PREFIX_CACHE_MATCH_INFO_KEY}/{producer}" if producer else PREFIX_CACHE_MATCH_INFO_KEY


class TokenizedPrompt:
    """The token IDs of a request's prompt, packed as uint32 little-endian (4 bytes each)."""

    __slots__ = ("data", "source")

    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.source = source  # "render" | "local" | "cache"

    def __len__(self) -> int:
        return len(self.data) // 4


class PrefixRequestState:
    """What the prefix producer learned about one request, shared by all its candidates.

    ``hashes`` are the request's chained block hashes (recorded into the index after the
    pick); ``max_match`` is the best match over the candidates, so a consumer can tell a
    cold request (no endpoint holds any block) from any candidate's record.
    """

    __slots__ = ("hashes", "total_blocks", "block_size_tokens", "block_size_chars", "max_match", "matches",
                 "producer")

    def __init__(self, hashes: tuple[int, ...], block_size_tokens: int, block_size_chars: int,
                 producer: str = "") -> None:
        self.hashes = hashes
        self.total_blocks = len(hashes)
        self.block_size_tokens = block_size_tokens
        self.block_size_chars = block_size_chars
        self.max_match = 0
        # endpoint -> matched blocks (endpoints without a match omitted), for /debug/decisions
        self.matches: dict[str, int] | None = None
        self.producer = producer


@dataclass(frozen=True, slots=True)
class PrefixCacheMatchInfo:
    """How many of the request's leading blocks an endpoint is believed to hold."""

    match_blocks: int
    total_blocks: int
    block_size_tokens: int
    request: PrefixRequestState | None = None
    ratio: float = field(init=False, compare=False)  # match / total (0 with no blocks): the scorer's score

    def __post_init__(self) -> None:
        total = self.total_blocks
        object.__setattr__(self, "ratio", self.match_blocks / total if total > 0 else 0.0)

    @property
    def matched_tokens(self) -> int:
        return self.match_blocks * self.block_size_tokens


@dataclass(frozen=True, slots=True)
class InFlightLoad:
    """Requests and estimated tokens this EPP has sent to an endpoint and not yet seen finish."""

    requests: int = 0
    tokens: int = 0


NO_INFLIGHT = InFlightLoad()

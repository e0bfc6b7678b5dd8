"""Why a request went where it went: the EPP's decision record, reduced to one line.

The EPP keeps its recent decisions at ``/debug/decisions`` (epp/observability/decisions.py):
per candidate endpoint, the total score and each scorer's raw and weighted score. ``explain``
turns one of those records into the pick's top contributions and the scorer that made the
difference against the runner-up; ``DecisionFeed`` fetches records by request id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# The weighted scores of tied endpoints are equal to the last printed digit more often than
# not; anything closer than this is a tie as far as a reader is concerned.
_TIE = 1e-9
_ALIASES = {"kv-cache-utilization": "kv-cache"}


def short_scorer(name: str) -> str:
    base = name.removesuffix("-scorer")
    return _ALIASES.get(base, base)


@dataclass(frozen=True)
class Why:
    pick: str  # endpoint name (or key when the name is unknown)
    total: float
    contributions: tuple[tuple[str, float], ...]  # the pick's weighted scores, largest first
    candidates: int
    tied: int  # endpoints sharing the best total, the pick included
    runner_up: str = ""
    margin: float = 0.0  # pick's total minus the runner-up's
    decisive: str = ""  # scorer whose weighted score gained the pick the most over the runner-up
    decisive_gain: float = 0.0
    filtered: Mapping[str, int] = field(default_factory=dict)  # filter -> endpoints removed

    def reason(self, short: bool = False) -> str:
        if self.candidates <= 1:
            return "the only candidate"
        if self.tied > 1:
            return f"tie among {self.tied}, random" if short else \
                f"tie at {self.total:.2f} among {self.tied}, broken at random"
        if self.decisive:
            head = f"{self.decisive} +{self.decisive_gain:.2f} over {self.runner_up}"
            return head if short else f"{head} (total +{self.margin:.2f})"
        return f"beats {self.runner_up} by {self.margin:.2f}"

    def scores(self) -> str:
        return " ".join(f"{n} {w:.2f}" for n, w in self.contributions)


def explain(decision: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Why | None:
    """Reduce a ``/debug/decisions`` record; ``names`` maps endpoint keys (host:port) to names.

    Returns None for a record without a scored primary profile (nothing to explain).
    """
    names = names or {}
    profiles = decision.get("profiles") or {}
    profile = profiles.get(decision.get("primary_profile")) if isinstance(profiles, Mapping) else None
    if not profile or not profile.get("candidates"):
        return None
    cands = sorted(profile["candidates"], key=lambda c: -float(c.get("total", 0.0)))
    pick_key = str(decision.get("pick", "")).split(",")[0]
    pick = next((c for c in cands if c.get("endpoint") == pick_key), cands[0])
    total = float(pick.get("total", 0.0))
    weighted = {short_scorer(n): float(s.get("weighted", 0.0)) for n, s in (pick.get("scorers") or {}).items()}
    contributions = tuple(sorted(weighted.items(), key=lambda kv: -kv[1]))
    tied = sum(1 for c in cands if abs(float(c.get("total", 0.0)) - total) <= _TIE)
    filtered = {n: len(v) for n, v in (profile.get("filtered_out") or {}).items() if v}
    name = names.get(pick["endpoint"], pick["endpoint"])
    others = [c for c in cands if c is not pick]
    if not others:
        return Why(name, total, contributions, len(cands), tied, filtered=filtered)
    rival = others[0]
    rival_w = {short_scorer(n): float(s.get("weighted", 0.0)) for n, s in (rival.get("scorers") or {}).items()}
    gains = {n: w - rival_w.get(n, 0.0) for n, w in weighted.items()}
    decisive, gain = max(gains.items(), key=lambda kv: kv[1], default=("", 0.0))
    if gain <= _TIE:
        decisive, gain = "", 0.0
    return Why(name, total, contributions, len(cands), tied, names.get(rival["endpoint"], rival["endpoint"]),
               total - float(rival.get("total", 0.0)), decisive, gain, filtered)


class DecisionFeed:
    """Decision records by request id, fetched from the EPP's ``/debug/decisions`` on demand.

    Lookups that miss trigger one fetch of the newest records; concurrent misses share it, so a
    burst of completions costs a handful of fetches, not one each.
    """

    def __init__(self, http: aiohttp.ClientSession, base_url: str, *, batch: int = 200) -> None:
        self._http = http
        self._url = f"{base_url.rstrip('/')}/debug/decisions"
        self._batch = batch
        self._known: dict[str, dict[str, Any]] = {}
        self._fetching: asyncio.Task[None] | None = None
        self.errors = 0

    async def _fetch(self) -> None:
        try:
            async with self._http.get(self._url, params={"n": str(self._batch)},
                                      timeout=aiohttp.ClientTimeout(total=5.0)) as resp:
                resp.raise_for_status()
                body = await resp.json()
            for d in body.get("decisions", []):
                self._known.setdefault(str(d.get("request_id")), d)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            self.errors += 1  # the demo shows "?" for the reason; the request itself still counts

    async def get(self, request_id: str, attempts: int = 2) -> dict[str, Any] | None:
        for _ in range(attempts):
            if request_id in self._known:
                break
            if self._fetching is None or self._fetching.done():
                self._fetching = asyncio.ensure_future(self._fetch())
            await asyncio.shield(self._fetching)
        return self._known.get(request_id)

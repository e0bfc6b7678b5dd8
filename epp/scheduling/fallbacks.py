"""Fallback endpoints: the destination as the protocol's ordered list (primary first).

The Endpoint Picker Protocol lets the EPP name more than one endpoint in
``x-gateway-destination-endpoint`` (and, identically, in the ``envoy.lb`` metadata):
``"ip:port,ip:port,..."``, the primary then ordered fallbacks that a proxy which understands
the list walks on retries. Stock Envoy's ORIGINAL_DST cluster does not: it takes the header as
one address and a list makes every request fail (503 UH, ``original_dst_host_invalid``).
So the list is opt-in (``epp serve --destination-fallbacks N``); by default the EPP names one
endpoint.

The fallbacks are the next best endpoints of the primary profile's own ranking: the
candidates it scored (so the subset hint, the scheduling tier that leaves out unreachable
and excluded endpoints, and the profile's filters all apply), highest total score first,
equal totals in random order so that a crashed primary's load spreads. The picker's own
targets (``maxNumOfEndpoints`` > 1) come first and count towards the 1 + N.
"""

from __future__ import annotations

import heapq
import random
from typing import Sequence

from epp.framework.scheduling import ProfileResult, ScoreBreakdown
from epp.scheduling.profile import Breakdown


def _ranking(breakdown: Sequence[ScoreBreakdown]) -> tuple[list[str], list[float]]:
    if isinstance(breakdown, Breakdown):
        candidates, totals = breakdown.scored()
        return [c.key for c in candidates], totals
    # A profile handler that built its own result: its explanation is the ranking.
    return [b.key for b in breakdown], [b.total for b in breakdown]


def destination_keys(result: ProfileResult, fallbacks: int, rng: random.Random) -> list[str]:
    """The picker's targets, then up to ``fallbacks`` more distinct endpoints best first, for a
    list of at most ``1 + fallbacks`` endpoints (never fewer than the picker's targets)."""
    keys = [t.key for t in result.targets]
    want = 1 + fallbacks - len(keys)
    if want <= 0:
        return keys
    ranked, totals = _ranking(result.breakdown)
    chosen = set(keys)
    rest = [i for i, key in enumerate(ranked) if key not in chosen]
    rnd = rng.random
    for i in heapq.nlargest(want, rest, key=lambda i: (totals[i], rnd())):
        key = ranked[i]
        if key not in chosen:  # keys are unique in a pool; a handler's own result may repeat one
            chosen.add(key)
            keys.append(key)
    return keys

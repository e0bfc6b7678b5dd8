"""The last N scheduling decisions, kept cheaply and rendered only when someone looks.

The request path appends a tuple of references (no formatting, no copies); the debug
endpoints (``/debug/decisions``, ``/debug``) and the ``x-epp-debug`` response header
render them on demand.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from epp.framework.scheduling import ProfileResult, SchedulingResult


@dataclass(slots=True)
class Decision:
    at: float  # wall clock (epoch seconds)
    request_id: str
    model: str
    target_model: str
    priority: int
    candidates: int
    result: SchedulingResult
    target: str
    scheduling_s: float  # Scheduler.schedule only
    total_s: float  # parse to pick, without the time spent queued in flow control
    queue_s: float = 0.0  # time queued in flow control


def _profile_json(pr: ProfileResult | None) -> dict[str, Any] | None:
    if pr is None:
        return None
    return {
        "targets": [c.key for c in pr.targets],
        "filtered_out": {k: list(v) for k, v in pr.filtered_out.items()},
        "candidates": [
            {"endpoint": b.key, "total": round(b.total, 6),
             "scorers": {name: {"raw": round(raw, 6), "weighted": round(w, 6)} for name, (raw, w) in b.scorers.items()}}
            for b in sorted(pr.breakdown, key=lambda b: -b.total)
        ],
    }


def prefix_matches_json(result: SchedulingResult) -> dict[str, Any] | None:
    """Per prefix producer: the request's blocks and each endpoint's matched blocks.

    Producers share one per-request state between all candidates' match records (it has
    ``producer``, ``total_blocks``, ``block_size_tokens`` and ``matches``); the pick's record
    leads to it, so nothing is copied on the request path.
    """
    pr = result.profile_results.get(result.primary_profile)
    if pr is None or not pr.targets:
        return None
    out: dict[str, Any] = {}
    for value in pr.targets[0].data.values():
        state = getattr(value, "request", None)
        matches = getattr(state, "matches", None)
        name = getattr(state, "producer", "") or "prefix"
        if matches is None or name in out:
            continue
        out[name] = {"total_blocks": state.total_blocks, "block_size_tokens": state.block_size_tokens,
                     "matched_blocks": dict(matches)}
    return out or None


def decision_json(d: Decision) -> dict[str, Any]:
    return {
        "time": d.at,
        "request_id": d.request_id,
        "model": d.model,
        "target_model": d.target_model,
        "priority": d.priority,
        "candidates": d.candidates,
        "pick": d.target,
        "primary_profile": d.result.primary_profile,
        "profiles": {name: _profile_json(pr) for name, pr in d.result.profile_results.items()},
        "prefix_matches": prefix_matches_json(d.result),
        "timing_ms": {"scheduling": round(d.scheduling_s * 1e3, 4), "total": round(d.total_s * 1e3, 4),
                      "queued": round(d.queue_s * 1e3, 3)},
    }


def debug_header_value(d: Decision, limit: int = 4000) -> str:
    """One header line: the pick, then each candidate's total and per-scorer raw->weighted score."""
    parts = [f"pick={d.target}", f"candidates={d.candidates}", f"profile={d.result.primary_profile}"]
    if d.queue_s:
        parts.append(f"queued={d.queue_s * 1e3:.1f}ms")
    pr = d.result.profile_results.get(d.result.primary_profile)
    if pr is not None:
        for b in sorted(pr.breakdown, key=lambda b: -b.total):
            scorers = ",".join(f"{n}:{raw:.3f}->{w:.3f}" for n, (raw, w) in b.scorers.items())
            parts.append(f"{b.key} total={b.total:.3f} [{scorers}]")
        for name, removed in pr.filtered_out.items():
            parts.append(f"filter {name} removed {','.join(removed)}")
    value = "; ".join(parts)
    # Header values must stay one printable ASCII line.
    value = value.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")
    return value if len(value) <= limit else value[: limit - 3] + "..."


class DecisionLog:
    def __init__(self, size: int = 200) -> None:
        self._items: deque[Decision] = deque(maxlen=max(1, size))

    def add(self, d: Decision) -> None:
        self._items.append(d)

    def recent(self, n: int | None = None) -> list[Decision]:
        items = list(self._items)
        items.reverse()  # newest first
        return items if n is None else items[:n]

    def as_json(self, n: int | None = None) -> list[dict[str, Any]]:
        return [decision_json(d) for d in self.recent(n)]

    def __len__(self) -> int:
        return len(self._items)


def wall_time() -> float:
    return time.time()

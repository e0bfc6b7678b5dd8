"""Shared scoring math."""

from __future__ import annotations

from typing import Sequence


def lower_is_better(values: Sequence[float]) -> list[float]:
    """Min-max over the candidates: (max - v) / (max - min); all equal -> 1.0 each."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


def higher_is_better(values: Sequence[float]) -> list[float]:
    """Min-max over the candidates: (v - min) / (max - min); all equal -> 1.0 each."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(v - lo) / span for v in values]

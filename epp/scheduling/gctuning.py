"""Garbage-collector settings for a serving process.

Every routing decision allocates a few objects per candidate (``Candidate`` and its
``data`` dict), i.e. thousands per request at 1024 endpoints. With CPython's default
thresholds (700, 10, 10) that triggers several young collections per request, promotes
the in-flight candidates to older generations, and every few dozen requests forces a
full collection that walks the whole heap (gRPC, protobuf and aiohttp objects included):
a 5-20 ms pause, which is what the scheduler benchmark's p99 shows without tuning.

``tune_gc_for_serving`` (call once, after the configuration is loaded and the server is
built): moves everything alive at startup into the permanent generation (``gc.freeze``),
so full collections skip it, and raises the young-generation threshold so collections
run every few dozen requests instead of several times per request. Cyclic garbage is
still collected; it just waits for 50k allocations.
"""

from __future__ import annotations

import gc

SERVING_THRESHOLDS = (50_000, 20, 10)


def tune_gc_for_serving(thresholds: tuple[int, int, int] = SERVING_THRESHOLDS) -> tuple[int, int, int]:
    """Apply the serving GC policy; returns the previous thresholds (for ``restore_gc``)."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    return previous  # type: ignore[return-value]


def restore_gc(previous: tuple[int, int, int]) -> None:
    """Undo ``tune_gc_for_serving`` (benchmarks and tests that compare both policies)."""
    gc.unfreeze()
    gc.set_threshold(*previous)

"""The memory benchmark of the ext_proc port runs against a real ``epp serve`` and accounts for
every step (the numbers themselves are for docs/benchmarks.md, not for assertions)."""

from __future__ import annotations

from epp.bench.h2memory import measure


def test_h2memory_measures_idle_connections_and_stream_bursts_over_the_stream_limit():
    out = measure(connections=3, streams=1200, bursts=2, settle=0.01)
    assert out["burst1_connections"] == out["burst2_connections"] == 2  # 1000 streams per connection at most
    for key in ("start_mib", "idle_connections_mib", "burst1_open_mib", "burst1_reset_mib", "burst2_closed_mib"):
        assert out[key] > 10, key

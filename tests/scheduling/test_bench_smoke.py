"""The scheduler benchmark runs end to end and writes its JSON and Markdown (no timing asserted)."""

from __future__ import annotations

import json

from epp.bench.scheduler import run_scheduler_bench


def test_smoke_run_writes_results(tmp_path) -> None:
    result = run_scheduler_bench(tmp_path, smoke=True)
    data = json.loads((tmp_path / "scheduler.json").read_text())
    assert data == json.loads(json.dumps(result))
    rows = data["results"]
    assert [(r["endpoints"], r["prompt"]) for r in rows] == [(8, "1KB"), (8, "32KB"), (64, "1KB"), (64, "32KB")]
    for r in rows:
        for policy in ("default", "serving"):
            m = r[policy]
            assert m["decisions"] == 40 and 0 < m["p50_ms"] <= m["p99_ms"] <= m["max_ms"]
            assert m["prefix_index_entries"] > 0  # the prefix producer really indexed the prompts
    md = (tmp_path / "scheduler.md").read_text()
    assert md.count("\n| 8 |") == 2 and "| 64 | 32KB |" in md

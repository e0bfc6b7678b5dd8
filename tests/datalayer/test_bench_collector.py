"""The collector benchmark's smoke mode runs end to end and writes its files."""

from __future__ import annotations

import json

from epp.bench.collector import run_collector_bench


async def test_collector_bench_smoke(tmp_path):
    result = await run_collector_bench(tmp_path, smoke=True)
    assert set(result["collector"]) == {"inprocess", "process"}
    for c in result["collector"].values():
        assert c["scrapes_per_s"] > 0 and c["staleness_samples"] > 0
    assert all({"none", "inprocess", "process"} <= set(run) for run in result["latency"])
    assert result["verdict"]["recommended_mode"] in ("inprocess", "process")
    assert json.loads((tmp_path / "result.json").read_text())["benchmark"] == "collector"
    assert "Scraping 4 endpoints" in (tmp_path / "summary.md").read_text()

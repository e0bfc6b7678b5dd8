"""`epp bench quality --workloads kv-pressure --smoke`: the kv-pressure harness end to end (pod-like
fleet of sim processes publishing KV events, direct traffic, a server restart mid-run, EPP replicas
behind one Envoy), in seconds. It checks that every cell ran and the report was written, never how
good any policy was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from epp.bench.kvpressure import tail_composition
from epp.bench.loadgen import RequestResult
from epp.bench.workloads import kv_pressure


def test_kv_pressure_workload_shape() -> None:
    wl = kv_pressure(seed=1, rate=10.0, duration=60.0, servers=4)
    direct = [r for r in wl.requests if r.direct >= 0]
    assert 0.25 < len(direct) / len(wl.requests) < 0.42  # about a third
    assert {r.direct for r in direct} == {0, 1, 2, 3}
    assert wl.params["prefix_working_set_tokens"] > 0.6 * 4 * 2048 * 16  # most of the fleet's KV cache
    again = kv_pressure(seed=1, rate=10.0, duration=60.0, servers=4)
    assert [(r.at, r.direct, r.group) for r in again.requests] == [(r.at, r.direct, r.group) for r in wl.requests]


def test_tail_composition_names_what_the_p90_is_made_of() -> None:
    def req(i: int, at: float, ttft: float, cached: int) -> RequestResult:
        return RequestResult(index=i, group="t", prompt_tokens=1000, scheduled=at, status=200, ttft=ttft,
                             e2e=ttft + 1, cached_tokens=cached)

    # 20 requests: 16 hits (0.1 s), 4 misses (2 s each, two sent in the warm-up that ends at 10 s).
    ok = [req(i, 5.0 + i, 0.1, 900) for i in range(16)]
    ok += [req(16, 1.0, 2.0, 16), req(17, 2.0, 2.0, 0), req(18, 30.0, 2.0, 400), req(19, 31.0, 2.0, 499)]
    c = tail_composition(ok, time_scale=1.0, warmup_end=10.0)
    assert c["miss_rate"] == 4 / 20 and c["miss_ttft_p50"] == 2.0
    assert c["tail_miss_share"] == 1.0 and c["tail_warmup_share"] == 0.5
    assert tail_composition([], 1.0, 10.0) == {}


def test_kv_pressure_smoke(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "epp", "bench", "quality", "--smoke", "--workloads", "kv-pressure",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    result = json.loads((tmp_path / "quality" / "result.json").read_text())
    entry = result["workloads"]["kv-pressure"]
    assert set(entry["cells"]) == {"approximate x1", "approximate x2", "precise x1", "precise x2"}
    for name, cell in entry["cells"].items():
        run = cell["runs"][0]
        assert "failed" not in run, f"{name}: {run.get('failed')}"
        assert run["routed_requests"] > 0 and run["direct_requests"] > 0, name
        assert run["restart_downtime_s"] is not None and run["scrape_errors"] == {}, name
        assert run["ok"] > 0 and 0.0 <= run["hit_rate"] <= 1.0
    # The EPP's decision for every routed request is kept for the tail diagnosis.
    run = entry["cells"]["precise x1"]["runs"][0]
    saved = json.loads((tmp_path / "quality" / "logs" / "kv-pressure" / "precisex1" / "run1" / "epp-0-decisions.txt")
                       .read_text())["decisions"]
    assert len({d["request_id"] for d in saved}) >= run["ok"]
    summary = (tmp_path / "quality" / "summary.md").read_text()
    assert "### kv-pressure" in summary and "| precise x2 |" in summary and "Targets:" in summary
    assert "Where the p90 comes from" in summary

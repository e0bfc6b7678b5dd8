"""Every benchmark that exists runs end to end through `epp bench <x> --smoke` (seconds, tiny parameters).

These keep the harness working; they assert that the files are written and the runs
succeeded, never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(out: Path, name: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "epp", "bench", name, "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"epp bench {name} --smoke failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert f"== {name}: ok" in r.stdout
    return r


def test_quality_smoke(tmp_path: Path) -> None:
    bench(tmp_path, "quality")
    out = tmp_path / "quality"
    result = json.loads((out / "result.json").read_text())
    assert result["smoke"] is True and set(result["workloads"]) == {"shared-prefix", "mixed-lengths", "lora"}
    for name, entry in result["workloads"].items():
        assert set(entry["runs"]) == {"envoy-round-robin", "epp-seed"}, name
        for policy, run in entry["runs"].items():
            assert "failed" not in run, f"{name}/{policy}: {run.get('failed')}"
            assert run["requests"] > 0 and run["ok"] == run["requests"], (name, policy, run["error_samples"])
            assert run["ttft_p50"] <= run["ttft_p90"] <= run["ttft_p99"]
            assert len(run["ttft_samples"]) == run["ok"]
            assert sum(run["served_per_server"]) == run["requests"]  # the sims saw every request
            assert run["cpu_cores"]["sim"] >= 0
        raw = json.loads((out / "raw" / name / "epp-seed.json").read_text())
        assert len(raw) == entry["workload"]["requests"]
    assert result["workloads"]["lora"]["runs"]["envoy-round-robin"]["lora_loads"] > 0
    summary = (out / "summary.md").read_text()
    assert "### shared-prefix" in summary and "| epp-seed |" in summary and "### Targets" in summary
    for png in ("quality_ttft_bars.png", "quality_prefix_hits.png", "quality_ttft_cdf_mixed-lengths.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_scheduler_smoke(tmp_path: Path) -> None:
    bench(tmp_path, "scheduler")
    assert json.loads((tmp_path / "scheduler" / "scheduler.json").read_text())["meta"]["smoke"] is True


def test_overhead_smoke(tmp_path: Path) -> None:
    bench(tmp_path, "overhead")
    assert any((tmp_path / "overhead").glob("*.json"))
    assert any((tmp_path / "overhead").glob("*.md"))


def test_collector_smoke(tmp_path: Path) -> None:
    # An async entry point: the CLI must await it.
    bench(tmp_path, "collector")
    assert json.loads((tmp_path / "collector" / "result.json").read_text())["benchmark"] == "collector"


def test_streaming_smoke(tmp_path: Path) -> None:
    bench(tmp_path, "streaming")
    assert any((tmp_path / "streaming").glob("*.json"))
    assert any((tmp_path / "streaming").glob("*.md"))


def test_kv_publisher_smoke(tmp_path: Path) -> None:
    bench(tmp_path, "kv-publisher")
    result = json.loads((tmp_path / "kv-publisher" / "result.json").read_text())
    assert result["engine"]["events"] > 0 and result["engine"]["block_removed"] > 0  # the cache did evict
    # Every event of the stream reached the subscriber, in both forms.
    assert [t["format"] for t in result["thread"]] == ["map", "array"]
    assert all(t["events"] == result["engine"]["events"] and t["payload_bytes"] > 0 for t in result["thread"])
    assert "kv-publisher" in (tmp_path / "kv-publisher" / "summary.md").read_text()


def test_idle_penalty_measures_the_real_request_path() -> None:
    from epp.bench.idlecost import MODES, markdown, measure_idle_penalty

    r = measure_idle_penalty(requests=40)
    assert set(r["request_us"]) == set(MODES) == set(r["chunk_us"])
    assert all(v > 0 for v in [*r["request_us"].values(), *r["chunk_us"].values()])
    # Every request completed (its in-flight count returned) and answers were written.
    assert r["in_flight_after_requests"] == 0
    assert r["bytes_written"] > 40 * 500
    assert "after idle" in markdown(r)


def test_flowcontrol_smoke(tmp_path: Path) -> None:
    bench(tmp_path, "flowcontrol")
    result = json.loads((tmp_path / "flowcontrol" / "result.json").read_text())
    assert result["queued_after_parking"] == result["parked"] > 0  # every request waited
    assert result["left_queued"] == 0 and result["left_in_flight"] == 0  # and every one was released
    assert result["outcomes"]["Dispatched"] == result["parked"] + 32
    assert "memory per parked request" in (tmp_path / "flowcontrol" / "summary.md").read_text()


def test_discovery_smoke(tmp_path: Path) -> None:
    bench(tmp_path, "discovery")
    result = json.loads((tmp_path / "discovery" / "result.json").read_text())
    assert result["initial_list"]["endpoints"] == result["pods"]
    assert result["watch_path"]["events"] > 0 and result["visible_ms"]["all"]["n"] > 0
    assert result["request_ms"]["no_churn"]["n"] > 0 and result["request_ms"]["churn"]["n"] > 0
    assert "Discovery under pod churn" in (tmp_path / "discovery" / "summary.md").read_text()


def test_soak_smoke(tmp_path: Path) -> None:
    bench(tmp_path, "soak")
    r = json.loads((tmp_path / "soak" / "result.json").read_text())["soak"]
    # Every replayed stream ran the whole lifecycle in the EPP: routed, answered, completed.
    assert r["succeeded"] == r["requests"] == r["epp_routed"] == r["epp_completed"] == 2000
    assert r["failed"] == r["epp_errors"] == r["epp_running_at_end"] == 0
    assert r["rss_warm_mb"] > 0 and len(r["rounds"]) == 2 and r["samples"]
    assert "RSS start (MiB)" in (tmp_path / "soak" / "summary.md").read_text()


def test_quality_overload_smoke(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "epp", "bench", "quality", "--smoke", "--workloads", "overload",
                        "--policies", "epp-flow-rr", "--no-peers", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    entry = json.loads((tmp_path / "quality" / "result.json").read_text())["workloads"]["overload"]
    run = entry["runs"]["epp-flow-rr"]
    assert set(run["groups"]) <= {"A", "B", "high"} and {"A", "B"} <= set(run["groups"])
    assert run["accounted"] is True  # one flow-control outcome per request, gauges back at zero
    assert run["accounting"]["flow_requests"] == run["requests"]
    assert entry["idle_baseline"]["groups"]["A"]["requests"] == run["groups"]["A"]["requests"]
    summary = (tmp_path / "quality" / "summary.md").read_text()
    assert "| epp-flow-rr | A |" in summary and "A TTFT p90 / idle" in summary

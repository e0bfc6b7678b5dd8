"""`epp bench`: dispatch, clear reports for missing or failing benchmarks, flag validation, docs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from epp.bench import cli


def epp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epp", "bench", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def fake_benches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three benchmarks: one that works, one that raises, one whose module does not exist."""
    (tmp_path / "fakebench_mod.py").write_text(
        "def run_good_bench(out_dir, smoke=False):\n"
        "    return {'benchmark': 'good', 'smoke': smoke}\n"
        "def run_bad_bench(out_dir, smoke=False):\n"
        "    raise RuntimeError('kaput')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "BENCHES", {
        "good": ("fakebench_mod", "run_good_bench"),
        "bad": ("fakebench_mod", "run_bad_bench"),
        "ghost": ("epp.bench.no_such_module", "run_ghost_bench"),
        "nofunc": ("fakebench_mod", "run_nofunc_bench"),
    })
    return tmp_path


def _args(out: Path, benchmark: str, **kw: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    ns = parser.parse_args(["all", "--out", str(out)])
    ns.benchmark = benchmark
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_each_outcome_is_reported(fake_benches: Path) -> None:
    out = fake_benches / "results"
    args = _args(out, "good", smoke=True)
    assert cli.run_one("good", args)[0] == "ok"
    assert json.loads((out / "good" / "result.json").read_text()) == {"benchmark": "good", "smoke": True}
    status, detail = cli.run_one("bad", args)
    assert status == "failed" and "RuntimeError: kaput" in detail
    assert "kaput" in (out / "bad" / "error.txt").read_text()
    assert cli.run_one("ghost", args) == ("missing", "module epp.bench.no_such_module does not exist yet")
    assert cli.run_one("nofunc", args) == ("missing", "fakebench_mod has no run_nofunc_bench(out_dir, smoke=...)")


def test_all_runs_every_benchmark_and_fails_if_any_did(fake_benches: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = fake_benches / "results"
    assert cli.run(_args(out, "all", docs=str(fake_benches / "docs" / "b.md"))) == 1
    text = capsys.readouterr().out
    for line in ("good       ok", "bad        failed", "ghost      missing", "nofunc     missing"):
        assert line in text
    assert (out / "good" / "result.json").exists()
    assert (fake_benches / "docs" / "b.md").exists()


def test_bad_quality_flags_fail_fast() -> None:
    r = epp("quality", "--policies", "epp-default,nope", "--no-peers")
    assert r.returncode == 2
    assert "unknown policies ['nope']" in r.stderr
    r = epp("quality", "--workloads", "huge")
    assert r.returncode == 2 and "unknown workloads ['huge']" in r.stderr
    r = epp("nonsense")
    assert r.returncode == 2 and "invalid choice: 'nonsense'" in r.stderr


def test_no_peers_drops_peer_policies() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    s = cli._quality_settings(parser.parse_args(["quality", "--no-peers", "--servers", "3", "--time-scale", "0.5"]))
    assert s.policies == ("envoy-round-robin", "epp-random", "epp-default", "epp-seed", "epp-inflight", "epp-ttft",
                          "epp-flow-strict", "epp-flow-rr")
    assert not s.install_peers and s.servers == 3 and s.time_scale == 0.5


def test_report_rebuilds_docs_from_results(tmp_path: Path) -> None:
    (tmp_path / "res" / "quality").mkdir(parents=True)
    (tmp_path / "res" / "quality" / "summary.md").write_text("## Routing quality\n")
    r = epp("report", "--out", str(tmp_path / "res"), "--docs", str(tmp_path / "bench.md"))
    assert r.returncode == 0, r.stderr
    assert "## Routing quality" in (tmp_path / "bench.md").read_text()

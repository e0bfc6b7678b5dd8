"""Report helpers: statistics, JSON without NaN, plots, and the docs/benchmarks.md assembler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.bench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_percentile_by_hand() -> None:
    assert report.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert report.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert report.percentile([7.0], 99) == 7.0
    assert math.isnan(report.percentile([], 50))


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=50), st.floats(min_value=0, max_value=100))
@settings(max_examples=100, deadline=None)
def test_percentile_is_bounded_and_monotone(values: list[float], q: float) -> None:
    p = report.percentile(values, q)
    assert min(values) <= p <= max(values)
    assert report.percentile(values, min(100.0, q + 5)) >= p


def test_json_has_no_nan(tmp_path: Path) -> None:
    path = report.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": tmp_path})
    data = json.loads(path.read_text())
    assert data == {"a": None, "b": [1.0, None], "c": str(tmp_path)}


def test_markdown_table_and_fmt() -> None:
    table = report.markdown_table(["a", "b"], [[1.23456, None], ["x", float("nan")]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.235 | – |", "| x | – |"]
    assert report.fmt(0.0001234) == "1.2e-04"


def test_plots_write_pngs(tmp_path: Path) -> None:
    bars = report.plot_grouped_bars(tmp_path / "bars.png", "t", ["w1", "w2"], {"p1": [1.0, 2.0], "p2": [float("nan"), 3.0]},
                                    "y", log=True)
    cdf = report.plot_cdfs(tmp_path / "cdf.png", "t", {"p1": [0.1, 0.2, 0.5], "empty": []}, "x")
    for p in (bars, cdf):
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_write_docs_assembles_sections_and_copies_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    (out / "quality").mkdir(parents=True)
    (out / "quality" / "summary.md").write_text("## Quality\n\n![cdf](q.png)\n")
    (out / "quality" / "q.png").write_bytes(PNG_MAGIC)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler.md").write_text("# Scheduler\n\n```yaml\n# not a heading\n```\n\n## Detail\n")
    docs = tmp_path / "docs" / "benchmarks.md"
    report.write_docs(out, docs, machine={"cpu": "TestCPU", "logical_cpus": 2})
    text = docs.read_text()
    assert "TestCPU, 2 logical CPUs" in text
    assert text.index("## Quality") < text.index("\n## Scheduler\n") < text.index("\n### Detail\n")
    assert "\n# not a heading\n" in text
    assert "![cdf](benchmarks/quality/q.png)" in text
    assert (tmp_path / "docs" / "benchmarks" / "quality" / "q.png").read_bytes() == PNG_MAGIC
    assert "No results were found for: `overhead`, `collector`, `streaming`." in text


def test_machine_info_describes_this_machine() -> None:
    m = report.machine_info()
    assert m["logical_cpus"] and m["python"] and m["cpu"]


def test_write_docs_replaces_sections_it_has_results_for_and_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "results"
    (out / "quality").mkdir(parents=True)
    (out / "quality" / "summary.md").write_text("## Quality\n\nnew quality table\n")
    (out / "discovery").mkdir()
    (out / "discovery" / "summary.md").write_text("# Discovery\n\nfirst discovery run\n")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nold machine line\n\n"
                    "## Overload study (hand-written)\n\nanalysis\n\n```\n## not a heading\n```\n\n"
                    "## Quality\n\nold quality table\n\n## Not included\n\nNo results were found for: `x`.\n")
    report.write_docs(out, docs, machine={"cpu": "TestCPU", "logical_cpus": 2})
    text = docs.read_text()
    assert "old machine line" not in text and "TestCPU" in text
    assert "old quality table" not in text
    # the kept section stays in place (before the regenerated one), with its fenced block intact
    assert text.index("## Overload study (hand-written)\n\nanalysis\n\n```\n## not a heading\n```") \
        < text.index("## Quality\n\nnew quality table") < text.index("## Discovery\n\nfirst discovery run")
    assert "## Not included" not in text  # the kept document has the older runs
    report.write_docs(out, docs, machine={"cpu": "TestCPU", "logical_cpus": 2})
    assert docs.read_text() == text  # regenerating from the same results changes nothing
    report.write_docs(tmp_path / "no-results", docs, machine={"cpu": "OtherCPU", "logical_cpus": 4})
    assert docs.read_text() == text  # nothing new: nothing changes, not even the machine line

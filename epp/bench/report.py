"""Benchmark reporting: statistics, JSON, Markdown summaries, matplotlib plots, docs/benchmarks.md.

Conventions every ``epp bench <x>`` follows (so ``write_docs`` can assemble the document):
- results go to ``<out>/<x>/``; a ``summary.md`` (or ``<x>.md``) there is that benchmark's
  Markdown section, with images referenced by bare file name (``![..](plot.png)``) in the same
  directory;
- machine-readable results go to a JSON file there (``result.json`` unless the benchmark names
  its own).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_ORDER = ("quality", "overhead", "scheduler", "collector", "streaming")


# -- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN when there are no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fmt(value: Any, digits: int = 3) -> str:
    """Compact number formatting for tables; NaN/None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and abs(value) < 10 ** -(digits - 1):
            return f"{value:.1e}"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


# -- files -----------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and math.isnan(obj):
        return None
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _nan_to_none(obj: Any) -> Any:
    # json.dumps writes NaN, which is not JSON; results use None for "no value".
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, Mapping):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(data), indent=1, default=_json_default) + "\n")
    return path


def policies_markdown(policies: Mapping[str, str], skipped: Mapping[str, str] | None = None) -> list[str]:
    """The lines naming a quality run's policies (and those it skipped), as Markdown paragraphs."""
    lines = ["Policies: " + "; ".join(f"`{k}`: {v}" for k, v in policies.items()) + ".", ""]
    if skipped:
        lines += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + ".", ""]
    return lines


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


# -- the machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _envoy_version() -> str:
    exe = Path(sys.executable).parent / "envoy"
    if not exe.exists():
        return "not installed"
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"version: \S+/(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip()[:80]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=False, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gb": _mem_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "envoy": _envoy_version(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "commit": _git_commit(),
    }


def machine_markdown(m: Mapping[str, Any]) -> str:
    return (f"Machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, {m.get('memory_gb')} GB RAM, "
            f"{m.get('os')}, Python {m.get('python')}, Envoy {m.get('envoy')}; commit {m.get('commit') or '?'}, "
            f"{m.get('date')}; 1-minute load average at the start: {m.get('load_average_1m')}.")


# -- plots -------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or servers
    import matplotlib.pyplot as plt

    return plt


def plot_grouped_bars(path: Path, title: str, groups: Sequence[str], series: Mapping[str, Sequence[float]],
                      ylabel: str, *, log: bool = False) -> Path:
    """One cluster of bars per group (e.g. workload), one bar per series (e.g. policy)."""
    plt = _pyplot()
    n_series = max(1, len(series))
    width = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(groups) * n_series * 0.45), 4.2))
    for k, (label, values) in enumerate(series.items()):
        xs = [g + (k - (n_series - 1) / 2) * width for g in range(len(groups))]
        ys = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]
        ax.bar(xs, ys, width=width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cdfs(path: Path, title: str, samples: Mapping[str, Sequence[float]], xlabel: str) -> Path:
    """Empirical CDFs, one line per series, log x axis (latencies span decades)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for label, values in samples.items():
        xs = sorted(v for v in values if v is not None and v > 0)
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.0)
    ax.axhline(0.9, color="grey", lw=0.6, ls="--")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- docs/benchmarks.md ---------------------------------------------------------------------------

def summary_file(bench_dir: Path) -> Path | None:
    """A benchmark's Markdown section: ``summary.md``, else ``<name>.md``, else its only ``*.md``."""
    for candidate in (bench_dir / "summary.md", bench_dir / f"{bench_dir.name}.md"):
        if candidate.is_file():
            return candidate
    mds = sorted(bench_dir.glob("*.md")) if bench_dir.is_dir() else []
    return mds[0] if len(mds) == 1 else None


_IMG = re.compile(r"(!\[[^\]]*\]\()([^)/\s]+\.png)(\))")


_HEADING = re.compile(r"^(#{1,6}) ")


def _demote_headings(text: str, top: int) -> str:
    """Shift Markdown headings so the section's highest one is level ``top`` (the page has the #).

    Lines inside fenced code blocks (a YAML comment, a shell prompt) are not headings.
    """
    lines = text.split("\n")
    fenced = False
    heading_at: list[int] = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and _HEADING.match(line):
            heading_at.append(i)
    if not heading_at:
        return text
    shift = top - min(len(_HEADING.match(lines[i]).group(1)) for i in heading_at)  # type: ignore[union-attr]
    if shift <= 0:
        return text
    for i in heading_at:
        level = len(_HEADING.match(lines[i]).group(1))  # type: ignore[union-attr]
        lines[i] = "#" * min(6, level + shift) + lines[i][level:]
    return "\n".join(lines)


def _top_sections(text: str) -> list[tuple[str, str]]:
    """Split a document at its level-2 headings (outside code fences): ``[(title, block), ...]``;
    the text before the first one comes first with the title ``""``."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            sections.append((line[3:].strip(), []))
        sections[-1][1].append(line)
    return [(title, "\n".join(lines).rstrip()) for title, lines in sections]


def write_docs(out_dir: Path, docs_path: Path, *, machine: Mapping[str, Any] | None = None) -> Path:
    """Assemble ``docs_path`` from every ``<out_dir>/<bench>/summary.md``; copy their plots beside it.

    Plots go to ``<docs dir>/benchmarks/<bench>/`` so the committed document shows them.
    A section of the existing document is replaced by the new section with the same title and
    kept, in place, otherwise: runs that ``epp bench all`` does not repeat (a long quality matrix,
    an overload study) and their written analyses survive a regeneration.
    """
    out_dir = Path(out_dir)
    docs_path = Path(docs_path)
    img_root = docs_path.parent / "benchmarks"
    m = machine or machine_info()
    preamble = "\n".join([
        "# Benchmarks",
        "",
        "Generated by `epp bench all` (`make bench`) and `epp bench report --docs docs/benchmarks.md`; "
        "raw results are under `bench-results/` when you run it yourself. A regeneration replaces the "
        "sections it has new results for and keeps the others.",
        "",
        machine_markdown(m),
    ])
    dirs = [out_dir / b for b in BENCH_ORDER]
    if out_dir.exists():
        dirs += sorted(d for d in out_dir.iterdir() if d.is_dir() and d.name not in BENCH_ORDER)
    found = {d.name: md for d in dirs if (md := summary_file(d)) is not None}
    missing = [b for b in BENCH_ORDER if b not in found]
    fresh: list[tuple[str, str]] = []
    for bench, md in found.items():
        text = md.read_text()
        dest = img_root / bench
        for png in (out_dir / bench).glob("*.png"):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, dest / png.name)
        rel = os.path.relpath(dest, docs_path.parent)
        text = _demote_headings(text, top=2)
        text = _IMG.sub(lambda mm: f"{mm.group(1)}{rel}/{mm.group(2)}{mm.group(3)}", text).rstrip()
        fresh += [s for s in _top_sections(text) if s[0] or s[1]]
    old = _top_sections(docs_path.read_text()) if docs_path.exists() else []
    if old and not fresh:
        preamble = old[0][1]  # nothing regenerated: the machine line still describes the kept runs
    new_by_title = {title: block for title, block in fresh}
    blocks = [preamble]
    for title, block in old:
        if title in ("", "Not included"):
            continue
        blocks.append(new_by_title.pop(title, block))
    blocks += [block for title, block in fresh if title in new_by_title]
    if missing and not old:  # a first document says what it lacks; a kept one has the older runs
        blocks.append("## Not included\n\nNo results were found for: "
                      + ", ".join(f"`{b}`" for b in missing) + ".")
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text("\n\n".join(blocks) + "\n")
    return docs_path

"""``epp bench``: run the benchmarks and write their result files.

    epp bench all                   every benchmark (what `make bench` runs)
    epp bench quality --smoke       one benchmark, tiny parameters (seconds; what the tests run)
    epp bench report --docs docs/benchmarks.md   re-render summaries, rebuild the document from existing results

Each benchmark lives in its own module, ``epp.bench.<name>``, exposing
``run_<name>_bench(out_dir, smoke=...)``; it writes ``result.json``, ``summary.md`` and plots
under ``<out>/<name>/``. Modules are imported only when their benchmark runs, so a missing or
broken one is reported by name and does not stop the others.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

DESCRIPTION = "Run the benchmarks and write JSON results, Markdown summaries and PNG plots."

# In the order `all` runs them: quick micro-benchmarks first, the long quality run last.
BENCHES: dict[str, tuple[str, str]] = {
    "overhead": ("epp.bench.overhead", "run_overhead_bench"),
    "scheduler": ("epp.bench.scheduler", "run_scheduler_bench"),
    "collector": ("epp.bench.collector", "run_collector_bench"),
    "streaming": ("epp.bench.streaming", "run_streaming_bench"),
    "kv-publisher": ("epp.bench.kvpublisher", "run_kv_publisher_bench"),
    "flowcontrol": ("epp.bench.flowcontrol", "run_flowcontrol_bench"),
    "discovery": ("epp.bench.discovery", "run_discovery_bench"),
    "chaos": ("epp.bench.chaos", "run_chaos_bench"),
    "soak": ("epp.bench.soak", "run_soak_bench"),
    "quality": ("epp.bench.quality", "run_quality_bench"),
}


class BenchUnavailable(Exception):
    """The benchmark's module or entry point does not exist (yet)."""


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=[*BENCHES, "all", "report"],
                        help="which benchmark to run; 'all' runs every one; 'report' only rebuilds --docs")
    parser.add_argument("--out", default="bench-results", metavar="DIR",
                        help="results directory; each benchmark writes to DIR/<name>/ (default %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny parameters: checks the harness in seconds, the numbers mean nothing")
    parser.add_argument("--docs", metavar="FILE",
                        help="afterwards, (re)write this Markdown document from all results in --out "
                             "(e.g. docs/benchmarks.md)")
    q = parser.add_argument_group("quality benchmark")
    q.add_argument("--policies", type=_csv, metavar="A,B", help="only these policies (default: all)")
    q.add_argument("--workloads", type=_csv, metavar="A,B", help="only these workloads (default: all)")
    q.add_argument("--servers", type=int, metavar="N", help="simulated servers in the fleet (default 8)")
    q.add_argument("--time-scale", type=float, metavar="X", help="wall seconds per model second (default 1)")
    q.add_argument("--duration", type=float, metavar="S", help="model seconds of arrivals per workload (default 30)")
    q.add_argument("--envoy-template", metavar="NAME", help="Envoy template in envoy/ for the EPP policies")
    q.add_argument("--no-peers", action="store_true", help="skip the peer routers (no venv, no installs)")
    q.add_argument("--runs", type=int, metavar="N", help="kv-pressure: runs per cell (default 3)")


def _entry_point(name: str) -> Callable[..., Any]:
    module_name, func_name = BENCHES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise BenchUnavailable(f"module {module_name} does not exist yet") from None
        raise
    func = getattr(module, func_name, None)
    if not callable(func):
        raise BenchUnavailable(f"{module_name} has no {func_name}(out_dir, smoke=...)")
    return func


def _quality_settings(args: argparse.Namespace) -> Any:
    from epp.bench.quality import POLICIES, QualitySettings, smoke_settings

    s = smoke_settings() if args.smoke else QualitySettings()
    changes: dict[str, Any] = {}
    for arg, key in (("policies", "policies"), ("workloads", "workloads"), ("servers", "servers"),
                     ("time_scale", "time_scale"), ("duration", "duration"), ("envoy_template", "envoy_template")):
        value = getattr(args, arg, None)
        if value is not None:
            changes[key] = value
    if args.no_peers:
        changes["install_peers"] = False
        kinds = {p.name: p.kind for p in POLICIES}
        changes["policies"] = tuple(p for p in changes.get("policies", s.policies) if kinds.get(p) != "peer")
    # kv-pressure has its own fleet size and policies; the shared flags apply to it too when given.
    kv_changes = {k: changes[k] for k in ("servers", "time_scale", "duration") if k in changes}
    if getattr(args, "runs", None) is not None:
        kv_changes["runs"] = args.runs
    if args.no_peers:
        from epp.bench.kvpressure import KV_POLICIES

        kv_changes["policies"] = tuple(p for p in s.kv_pressure.policies if KV_POLICIES[p].kind != "peer")
    if kv_changes:
        changes["kv_pressure"] = replace(s.kv_pressure, **kv_changes)
    s = replace(s, **changes)
    s.validate()
    return s


def run_one(name: str, args: argparse.Namespace) -> tuple[str, str]:
    """Run one benchmark; returns (status, detail) with status 'ok', 'missing' or 'failed'."""
    out_dir = Path(args.out) / name
    try:
        func = _entry_point(name)
    except BenchUnavailable as exc:
        return "missing", str(exc)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"smoke": args.smoke}
    if name == "quality":
        kwargs["settings"] = _quality_settings(args)
    started = time.perf_counter()
    try:
        result = func(out_dir, **kwargs)
        if inspect.isawaitable(result):  # async entry points (e.g. run_collector_bench)
            result = asyncio.run(result)
    except KeyboardInterrupt:
        raise
    except Exception:  # noqa: BLE001 - report it and go on with the other benchmarks
        tb = traceback.format_exc()
        (out_dir / "error.txt").write_text(tb)
        return "failed", tb.strip().splitlines()[-1] + f" (traceback in {out_dir / 'error.txt'})"
    if result is not None and not any(out_dir.glob("*.json")):
        from epp.bench.report import write_json

        try:
            write_json(out_dir / "result.json", result)
        except TypeError:
            pass  # not JSON-shaped; the benchmark wrote its own files
    return "ok", f"{time.perf_counter() - started:.0f}s, results in {out_dir}"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.benchmark == "report":
        from epp.bench.report import write_docs

        quality_json = out / "quality" / "result.json"
        if quality_json.exists():  # re-render with the current report code (tables, plots)
            from epp.bench.quality import write_quality_report

            write_quality_report(json.loads(quality_json.read_text()), out / "quality")
        path = write_docs(out, Path(args.docs or "docs/benchmarks.md"))
        print(f"wrote {path}")
        return 0
    if args.benchmark == "quality" or args.benchmark == "all":
        try:
            _quality_settings(args)  # fail on bad quality flags before anything slow starts
        except ValueError as exc:
            print(f"epp bench: error: {exc}", file=sys.stderr)
            return 2
    names = list(BENCHES) if args.benchmark == "all" else [args.benchmark]
    statuses: dict[str, tuple[str, str]] = {}
    for name in names:
        print(f"== epp bench {name}{' (smoke)' if args.smoke else ''}", flush=True)
        statuses[name] = run_one(name, args)
        status, detail = statuses[name]
        print(f"== {name}: {status}: {detail}", flush=True)
    if len(names) > 1:
        print("\nsummary:")
        for name, (status, detail) in statuses.items():
            print(f"  {name:10s} {status:8s} {detail}")
    if args.docs:
        from epp.bench.report import write_docs

        print(f"wrote {write_docs(out, Path(args.docs))}")
    return 0 if all(s == "ok" for s, _ in statuses.values()) else 1

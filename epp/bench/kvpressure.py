"""The ``kv-pressure`` workload of ``epp bench quality``: precise vs approximate prefix routing,
with one and with two EPP replicas, where the cache changes behind the router's back (issue 16).

Per run, a fresh pod-like fleet: one ``epp sim`` process per server, each on its own loopback
address (a random ``127.a.b.0/24`` block per run), all on one HTTP port, publishing vLLM KV events
on 5557 when that port is free on the block (else another free port, and the precise config is
rewritten to match). The request stream (``workloads.kv_pressure``) sends about a third of the
requests straight to a random server, and halfway through one server process is stopped and
started again (empty cache, event sequence from 0; requests that reach it meanwhile fail like
they would in a real restart, and count as errors).

Cells: policy x replicas. ``approximate`` is the EPP's built-in default (upstream's default
profile: queue x2, KV cache x2, prefix x3 on ``approx-prefix-cache-producer``); ``precise`` is
``config/precise-prefix.yaml`` (the issue's config as written plus ``speculativeIndexing``); ``vllm-router-cache_aware`` is the
best peer of the shared-prefix workload. With 2 replicas, EPPs sit behind one Envoy with both in
its ext_proc cluster (round robin per request); vllm-router replicas are two processes the client
alternates between. ``runs`` runs per cell, interleaved (run 1 of every cell, then run 2, ...) so
that drift in the shared machine's load spreads over all cells; the report gives the median and
the spread (min-max).

Latencies are of the routed requests (the ones the policy decided), in model seconds; the direct
ones are reported apart. The prefix-cache hit rate is client-side: cached prompt tokens / prompt
tokens of the routed requests, from the servers' usage (``prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epp.bench import peers as peers_mod
from epp.bench import report, stacks, workloads
from epp.bench.loadgen import RequestResult, run_workload
from epp.bench.procs import ManagedProcess, ProcessGroup, free_port

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
PRECISE_CONFIG = CONFIG_DIR / "precise-prefix.yaml"
VLLM_EVENT_PORT = 5557
DECISION_LOG = 5000  # decisions an EPP keeps: more than a run routes (~550 at the defaults)
MODEL = workloads.DEFAULT_MODEL


@dataclass(frozen=True)
class KVPolicy:
    name: str
    kind: str  # "epp" | "peer"
    description: str
    config: Path | None = None
    peer: str = ""
    peer_policy: str = ""


KV_POLICIES: dict[str, KVPolicy] = {p.name: p for p in (
    KVPolicy("approximate", "epp", "EPP built-in default profile (approx-prefix-cache-producer: prefix x3, queue x2, "
             "kv-cache x2), upstream's default"),
    KVPolicy("precise", "epp", "EPP with config/precise-prefix.yaml (precise-prefix-cache-producer from the engines' "
             "KV events, speculativeIndexing on; the same weights)", config=PRECISE_CONFIG),
    KVPolicy("vllm-router-cache_aware", "peer", "vllm-router --policy cache_aware (the best peer of shared-prefix)",
             peer="vllm-router", peer_policy="cache_aware"),
)}
TARGET_TEXT = ("precise TTFT p90 at least 1.5x better than approximate, with 1 and with 2 replicas; precise's "
               "prefix-cache hit rate with 2 replicas within 5 points of 1 replica; precise at least 1.3x better "
               "than the best peer; EPP CPU per request of precise at most 1.5x approximate's")


@dataclass
class KVPressureSettings:
    servers: int = 4
    time_scale: float = 1.0
    # Model seconds of arrivals. Every tenant's first request is a miss whatever the router, and 16
    # of them arrive in the first ~10 s: over 60 s they were 13% of the routed requests and the p90
    # measured that cold start; 180 s keeps the same shape (one restart, at half time) and measures
    # the steady state the policies differ in, with 3x the samples behind each p90.
    duration: float = 180.0
    seed: int = 4
    rate_per_server: float = 0.8  # routed + direct arrivals per model second per server
    runs: int = 3
    policies: tuple[str, ...] = tuple(KV_POLICIES)
    replicas: tuple[int, ...] = (1, 2)
    envoy_template: str = "envoy.yaml"
    request_timeout: float = 300.0
    restart_server: int = 0
    idle_window: float = 4.0  # seconds of EPP background CPU measured before and after the load
    workload: Mapping[str, Any] = field(default_factory=dict)  # overrides of workloads.kv_pressure()

    def build(self) -> workloads.Workload:
        kw = {"seed": self.seed, "rate": self.rate_per_server * self.servers, "duration": self.duration,
              "servers": self.servers, **self.workload}
        return workloads.kv_pressure(**kw)


def smoke_kv_settings() -> KVPressureSettings:
    """Seconds: 2 servers, short prompts, one run per cell, the EPP policies only."""
    return KVPressureSettings(servers=2, time_scale=0.1, duration=4.0, runs=1, rate_per_server=2.0,
                              policies=("approximate", "precise"), request_timeout=30.0, idle_window=0.2,
                              workload={"tenants": 4, "system_tokens": (300, 500), "user_tokens": (20, 60),
                                        "output_median": 8.0, "output_max": 16})


# -- the fleet -----------------------------------------------------------------------------------

class PodFleet:
    """One ``epp sim`` process per server, on distinct loopback addresses, sharing ports."""

    def __init__(self, group: ProcessGroup, count: int, *, time_scale: float, seed: int) -> None:
        self.group = group
        self.time_scale = time_scale
        self.seed = seed
        rng = random.SystemRandom()
        block = f"127.{rng.randint(16, 250)}.{rng.randint(0, 255)}."
        self.hosts = [block + str(i + 2) for i in range(count)]
        self.port = common_free_port(self.hosts)
        self.event_port = VLLM_EVENT_PORT if _free_everywhere(self.hosts, VLLM_EVENT_PORT) else common_free_port(self.hosts)
        self.replay_port = common_free_port(self.hosts)
        self.procs: list[ManagedProcess] = []
        self.downtime_s: list[float] = []

    @property
    def addresses(self) -> list[str]:
        return [f"{h}:{self.port}" for h in self.hosts]

    @property
    def urls(self) -> list[str]:
        return [f"http://{a}" for a in self.addresses]

    def argv(self, i: int) -> list[str]:
        events = {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{self.event_port}",
                  "replay_endpoint": f"tcp://*:{self.replay_port}", "topic": "kv@$(POD_IP):$(POD_PORT)@" + MODEL}
        return [sys.executable, "-m", "epp", "sim", "--hosts", self.hosts[i], "--port", str(self.port),
                "--name", f"sim-{i}", "--seed", str(self.seed + i), "--time-scale", f"{self.time_scale:g}",
                "--kv-events-config", json.dumps(events)]

    def start(self) -> None:
        self.procs = [self.group.start(f"sim-{i}", self.argv(i)) for i in range(len(self.hosts))]
        for p in self.procs:
            self.group.wait_for_log(p, stacks.SIM_READY, timeout=60)

    async def restart(self, i: int) -> None:
        """Stop server i and start it again on the same address, without blocking the load."""
        t0 = time.perf_counter()
        await asyncio.to_thread(self.group.stop, self.procs[i])
        proc = self.group.start(f"sim-{i}-restarted", self.argv(i))
        self.procs[i] = proc
        await self.group.await_until(proc, lambda: "sim ready" in proc.log_text(), timeout=60, what="ready again")
        self.downtime_s.append(time.perf_counter() - t0)


def _free_everywhere(hosts: Sequence[str], port: int) -> bool:
    import socket

    for h in hosts:
        with socket.socket() as s:
            try:
                s.bind((h, port))
            except OSError:
                return False
    return True


def common_free_port(hosts: Sequence[str]) -> int:
    for _ in range(100):
        port = free_port(hosts[0])
        if _free_everywhere(hosts[1:], port):
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


# -- one run ---------------------------------------------------------------------------------------

@dataclass
class Routers:
    urls: list[str]
    epp: list[stacks.EppHandle]


def _epp_config(policy: KVPolicy, fleet: PodFleet, log_dir: Path) -> Path | None:
    if policy.config is None or policy.config != PRECISE_CONFIG or fleet.event_port == VLLM_EVENT_PORT:
        return policy.config
    doc = yaml.safe_load(policy.config.read_text())  # the config, on the port this fleet got
    for p in doc["plugins"]:
        if p["type"] == "precise-prefix-cache-producer":
            p["parameters"]["kvEventsConfig"]["podDiscoveryConfig"]["socketPort"] = fleet.event_port
    path = log_dir / "precise-prefix.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_routers(group: ProcessGroup, policy: KVPolicy, replicas: int, fleet: PodFleet, settings: KVPressureSettings,
                  installs: Mapping[str, peers_mod.PeerInstall]) -> Routers:
    if policy.kind == "epp":
        config = _epp_config(policy, fleet, group.log_dir)
        # Every decision of the run is kept for the tail diagnosis (/debug/decisions, saved at the end).
        epps = [stacks.start_epp(group, fleet.addresses, config_file=config, name=f"epp-{i}",
                                 extra=["--request-timeout", f"{settings.request_timeout:g}s",
                                        "--decision-log-size", str(DECISION_LOG)])
                for i in range(replicas)]
        envoy = stacks.start_envoy_template(group, settings.envoy_template, backends=fleet.addresses,
                                            epp_replicas=[f"127.0.0.1:{e.grpc_port}" for e in epps])
        if policy.config is not None:
            _wait_subscribed(group, epps, len(fleet.hosts))
        return Routers([envoy.url], epps)
    install = installs[policy.peer]
    urls = []
    for i in range(replicas):
        def argv(port: int, prom_port: int) -> list[str]:
            return peers_mod.command(install, policy.peer_policy, port=port, prometheus_port=prom_port,
                                     worker_urls=fleet.urls)
        urls.append(stacks.start_peer_router(group, argv, name=f"{policy.name}-{i}").url)
    return Routers(urls, [])


def _wait_subscribed(group: ProcessGroup, epps: Sequence[stacks.EppHandle], servers: int) -> None:
    """Every precise replica connected to every server's event socket before the load starts."""
    import urllib.request

    def ok(e: stacks.EppHandle) -> bool:
        try:
            with urllib.request.urlopen(e.metrics_url + "/debug/plugins", timeout=2) as r:  # noqa: S310
                plugins = json.loads(r.read())["plugins"]
        except OSError:
            return False
        subs = [s for p in plugins for s in p.get("subscriptions", [])]
        return sum(1 for s in subs if s.get("connected")) >= servers

    for e in epps:
        group.wait_until(e.process, lambda e=e: ok(e), timeout=30, what="subscribing to every server's KV events")


def run_cell(policy: KVPolicy, replicas: int, wl: workloads.Workload, settings: KVPressureSettings, log_dir: Path,
             installs: Mapping[str, peers_mod.PeerInstall]) -> dict[str, Any]:
    from epp.bench.quality import scrape_sim_counters

    with ProcessGroup(log_dir) as group:
        fleet = PodFleet(group, settings.servers, time_scale=settings.time_scale, seed=settings.seed)
        fleet.start()
        routers = start_routers(group, policy, replicas, fleet, settings, installs)
        epp_procs = [e.process for e in routers.epp]
        # The EPPs' background CPU (scrapes, subscriptions), before and after the load, to subtract.
        idle_before = _idle_rate(epp_procs, settings.idle_window)
        cpu0 = [p.cpu_seconds() for p in epp_procs]
        restart_at = float(wl.params.get("restart_at", 0.5)) * wl.duration

        async def restart() -> None:
            await fleet.restart(settings.restart_server)

        t0 = time.perf_counter()
        results = asyncio.run(run_workload(routers.urls, wl, time_scale=settings.time_scale,
                                           request_timeout=settings.request_timeout, direct_urls=fleet.urls,
                                           events=[(restart_at, restart)] if restart_at > 0 else []))
        wall = time.perf_counter() - t0
        epp_cpu = sum(p.cpu_seconds() - c for p, c in zip(epp_procs, cpu0))
        idle_rate = (idle_before + _idle_rate(epp_procs, settings.idle_window)) / 2
        epp_busy = max(0.0, epp_cpu - idle_rate * wall)
        per_server = {}
        scrape_errors = {}
        for u in fleet.urls:
            try:
                per_server[u] = scrape_sim_counters(u)
            except OSError as e:
                scrape_errors[u] = str(e)
                per_server[u] = dict.fromkeys(("prefix_queries", "prefix_hits", "preemptions", "requests",
                                               "lora_loads"), 0.0)
        if routers.epp:
            _save_debug(routers.epp, log_dir)
    summary = summarize_run(results, wl, settings, per_server, wall)
    summary["restart_downtime_s"] = round(fleet.downtime_s[0], 2) if fleet.downtime_s else None
    summary["scrape_errors"] = scrape_errors
    summary["epp_cpu_s"] = round(epp_cpu, 3) if routers.epp else None
    summary["epp_idle_cores"] = round(idle_rate, 4) if routers.epp else None
    # Per routed request, above the idle rate: the request path plus the KV events it causes.
    summary["epp_cpu_us_per_request"] = (round(epp_busy / summary["routed_requests"] * 1e6, 1)
                                         if routers.epp and summary["routed_requests"] else None)
    summary["load_average_1m"] = round(os.getloadavg()[0], 2)
    report.write_json(log_dir / "results.json", [r.as_dict() for r in results])
    return summary


WARMUP = 0.25  # the first quarter of the run: every tenant's first request is a miss for every policy


def summarize_run(results: Sequence[RequestResult], wl: workloads.Workload, settings: KVPressureSettings,
                  per_server: Mapping[str, Mapping[str, float]], wall: float) -> dict[str, Any]:
    """Routed-request latencies and hit rate (all of them, and after the warm-up), direct ones apart."""
    from epp.bench.quality import summarize

    by_index = {r.index: r for r in wl.requests}
    routed = [r for r in results if by_index[r.index].direct < 0]
    direct = [r for r in results if by_index[r.index].direct >= 0]
    summary = summarize(routed, settings.time_scale, per_server, wall)
    summary.pop("ttft_samples", None)
    summary["routed_requests"] = len(routed)
    summary["direct_requests"] = len(direct)
    ok_direct = [r.ttft / settings.time_scale for r in direct if r.ok]
    summary["direct_ttft_p90"] = report.percentile(ok_direct, 90) if ok_direct else None
    summary["direct_errors"] = sum(1 for r in direct if not r.ok)
    summary["hit_rate"] = summary["client_cached_fraction"]  # routed requests, client side
    summary["server_hit_rate"] = summary["prefix_hit_rate"]  # every request, server counters (restart resets one)
    start = WARMUP * wl.duration * settings.time_scale
    steady = [r for r in routed if r.ok and r.scheduled >= start]
    ttft = [r.ttft / settings.time_scale for r in steady]
    prompt = sum(r.prompt_tokens for r in steady)
    summary["steady_ttft_p50"] = report.percentile(ttft, 50) if ttft else None
    summary["steady_ttft_p90"] = report.percentile(ttft, 90) if ttft else None
    summary["steady_hit_rate"] = sum(r.cached_tokens or 0 for r in steady) / prompt if prompt else None
    summary.update(tail_composition([r for r in routed if r.ok], settings.time_scale, start))
    return summary


MISS = 0.5  # a routed request that found less than half its prompt cached paid (most of) a full prefill


def tail_composition(ok: Sequence[RequestResult], time_scale: float, warmup_end: float) -> dict[str, Any]:
    """Where the TTFT p90 comes from: how many requests missed the prefix cache, what a miss
    costs, and what the requests at or above the p90 were (misses, sent during the warm-up)."""
    if not ok:
        return {}
    ttft = {id(r): r.ttft / time_scale for r in ok}
    p90 = report.percentile(list(ttft.values()), 90)
    misses = {id(r) for r in ok if (r.cached_tokens or 0) < MISS * r.prompt_tokens}
    tail = [r for r in ok if ttft[id(r)] >= p90]
    return {
        "miss_rate": len(misses) / len(ok),
        "miss_ttft_p50": report.percentile([ttft[i] for i in misses], 50) if misses else None,
        "tail_miss_share": sum(1 for r in tail if id(r) in misses) / len(tail),
        "tail_warmup_share": sum(1 for r in tail if r.scheduled < warmup_end) / len(tail),
    }


def _idle_rate(procs: Sequence[ManagedProcess], window: float) -> float:
    """CPU cores the processes use with no requests (their scrapes and subscriptions)."""
    if not procs:
        return 0.0
    c0, t0 = [p.cpu_seconds() for p in procs], time.perf_counter()
    time.sleep(window)
    return sum(p.cpu_seconds() - c for p, c in zip(procs, c0)) / (time.perf_counter() - t0)


def _save_debug(epps: Sequence[stacks.EppHandle], log_dir: Path) -> None:
    import urllib.request

    for i, e in enumerate(epps):
        for path, name in (("/debug/plugins", "plugins"), (f"/debug/decisions?n={DECISION_LOG}", "decisions"),
                           ("/metrics", "metrics")):
            try:
                with urllib.request.urlopen(e.metrics_url + path, timeout=5) as r:  # noqa: S310
                    (log_dir / f"epp-{i}-{name}.txt").write_bytes(r.read())
            except OSError:
                pass


# -- the cells, repeated -------------------------------------------------------------------------------

def cell_name(policy: str, replicas: int) -> str:
    return f"{policy} x{replicas}"


AGGREGATE = ("ttft_p50", "ttft_p90", "ttft_p99", "e2e_p90", "direct_ttft_p90", "hit_rate", "server_hit_rate",
             "steady_ttft_p50", "steady_ttft_p90", "steady_hit_rate",
             "miss_rate", "miss_ttft_p50", "tail_miss_share", "tail_warmup_share",
             "errors", "direct_errors", "epp_cpu_us_per_request", "throughput_rps", "restart_downtime_s",
             "load_average_1m")


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median and spread (min, max) of each metric over the runs that did not fail."""
    good = [r for r in runs if "failed" not in r]
    out: dict[str, Any] = {"runs": len(runs), "failed_runs": len(runs) - len(good)}
    for key in AGGREGATE:
        vals = [float(r[key]) for r in good if r.get(key) is not None and not _nan(r[key])]
        if vals:
            out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def run_kv_pressure(out: Path, settings: KVPressureSettings, installs: Mapping[str, peers_mod.PeerInstall],
                    say=print) -> dict[str, Any]:
    """Every (policy, replicas) cell ``settings.runs`` times; returns the workload's result entry."""
    wl = settings.build()
    policies = [KV_POLICIES[p] for p in settings.policies if p in KV_POLICIES]
    skipped = {p.name: (installs[p.peer].detail if p.peer in installs else "peer installation disabled")
               for p in policies if p.kind == "peer" and not (p.peer in installs and installs[p.peer].ok)}
    policies = [p for p in policies if p.name not in skipped]
    cells = [(p, r) for p in policies for r in settings.replicas]
    runs: dict[str, list[dict[str, Any]]] = {cell_name(p.name, r): [] for p, r in cells}
    direct = sum(1 for r in wl.requests if r.direct >= 0)
    say(f"kv-pressure: {len(wl.requests)} requests ({direct} direct) at {wl.rate:.2f}/s on {settings.servers} "
        f"servers, {len(cells)} cells x {settings.runs} runs")
    for k in range(settings.runs):
        for policy, replicas in cells:
            name = cell_name(policy.name, replicas)
            t = time.perf_counter()
            log_dir = out / "logs" / "kv-pressure" / name.replace(" ", "") / f"run{k + 1}"
            try:
                summary = run_cell(policy, replicas, wl, settings, log_dir, installs)
            except Exception as exc:  # noqa: BLE001 - one broken run must not lose the others
                runs[name].append({"failed": f"{type(exc).__name__}: {exc}"[:2000]})
                say(f"  {name:32s} run {k + 1}: FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                continue
            runs[name].append(summary)
            say(f"  {name:32s} run {k + 1}: TTFT p90 {summary['ttft_p90']:.3f}s hit {summary['hit_rate']:.0%} "
                f"errors {summary['errors']}/{summary['routed_requests']} ({time.perf_counter() - t:.0f}s)")
    cells_out = {name: {"aggregate": aggregate(rs), "runs": rs} for name, rs in runs.items()}
    entry = {
        "kind": "kv-pressure",
        "workload": wl.summary(),
        "settings": {"servers": settings.servers, "time_scale": settings.time_scale, "duration": settings.duration,
                     "runs": settings.runs, "replicas": list(settings.replicas), "seed": settings.seed,
                     "rate_per_server": settings.rate_per_server, "envoy_template": settings.envoy_template},
        "policies": {p.name: p.description for p in policies},
        "skipped_policies": skipped,
        "cells": cells_out,
    }
    entry["targets"] = evaluate_kv_targets(entry)
    return entry


# -- targets and report ------------------------------------------------------------------------------

def _median(entry: Mapping[str, Any], cell: str, key: str) -> float | None:
    agg = (entry["cells"].get(cell) or {}).get("aggregate", {})
    v = agg.get(key)
    return None if v is None else float(v["median"])


def evaluate_kv_targets(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    replicas = entry["settings"]["replicas"]
    for r in replicas:
        p, a = _median(entry, cell_name("precise", r), "ttft_p90"), _median(entry, cell_name("approximate", r), "ttft_p90")
        if p is not None and a is not None:
            out.append({"target": f"precise vs approximate TTFT p90, {r} replica(s)", "value": a / p if p else math.inf,
                        "required": 1.5, "met": p > 0 and a / p >= 1.5, "detail": f"{p:.3f}s vs {a:.3f}s"})
        peer = _median(entry, cell_name("vllm-router-cache_aware", r), "ttft_p90")
        if p is not None and peer is not None:
            out.append({"target": f"precise vs best peer TTFT p90, {r} replica(s)", "value": peer / p if p else math.inf,
                        "required": 1.3, "met": p > 0 and peer / p >= 1.3, "detail": f"{p:.3f}s vs {peer:.3f}s"})
    h1, h2 = _median(entry, cell_name("precise", 1), "hit_rate"), _median(entry, cell_name("precise", 2), "hit_rate")
    if h1 is not None and h2 is not None:
        out.append({"target": "precise hit rate, 2 replicas vs 1 (points)", "value": (h2 - h1) * 100, "required": -5.0,
                    "met": h2 >= h1 - 0.05, "detail": f"{h2:.1%} vs {h1:.1%}"})
    for r in replicas:
        p = _median(entry, cell_name("precise", r), "steady_ttft_p90")
        a = _median(entry, cell_name("approximate", r), "steady_ttft_p90")
        if p is not None and a is not None:
            out.append({"target": f"(after warm-up) precise vs approximate TTFT p90, {r} replica(s)",
                        "value": a / p if p else math.inf, "required": 1.5, "met": p > 0 and a / p >= 1.5,
                        "detail": f"{p:.3f}s vs {a:.3f}s"})
    for r in replicas:
        cp, ca = (_median(entry, cell_name(n, r), "epp_cpu_us_per_request") for n in ("precise", "approximate"))
        if cp is not None and ca is not None:
            out.append({"target": f"EPP CPU per request, precise / approximate, {r} replica(s)",
                        "value": cp / ca if ca else math.inf, "required": 1.5, "met": ca > 0 and cp / ca <= 1.5,
                        "detail": f"{cp:.0f} vs {ca:.0f} µs"})
    return out


def add_steady_metrics(entry: dict[str, Any], out: Path, settings: KVPressureSettings) -> None:
    """Recompute the after-warm-up metrics of every run from its raw results (runs made before
    those metrics existed), then the aggregates and targets."""
    wl = settings.build()
    for name, cell in entry["cells"].items():
        for k, run in enumerate(cell["runs"]):
            path = out / "logs" / "kv-pressure" / name.replace(" ", "") / f"run{k + 1}" / "results.json"
            if "failed" in run or not path.exists():
                continue
            results = [RequestResult(**r) for r in json.loads(path.read_text())]
            fresh = summarize_run(results, wl, settings, {}, run.get("wall_s", 1.0))
            run.update({key: fresh[key] for key in ("steady_ttft_p50", "steady_ttft_p90", "steady_hit_rate",
                                                    "miss_rate", "miss_ttft_p50", "tail_miss_share",
                                                    "tail_warmup_share") if key in fresh})
        cell["aggregate"] = aggregate(cell["runs"])
    entry["targets"] = evaluate_kv_targets(entry)


def _fmt_agg(agg: Mapping[str, Any], key: str, pct: bool = False, digits: int = 3) -> str:
    v = agg.get(key)
    if v is None:
        return "–"
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.{digits}f}")
    if v["min"] == v["max"]:
        return f(v["median"])
    return f"{f(v['median'])} ({f(v['min'])}–{f(v['max'])})"


def report_lines(entry: Mapping[str, Any]) -> list[str]:
    w, s = entry["workload"], entry["settings"]
    lines = [
        "### kv-pressure",
        "",
        f"{w['description']}; {w['requests']} requests over {w['duration_model_s']:g} model seconds "
        f"(mean prompt {w['mean_prompt_tokens']:.0f} tokens, mean output {w['mean_output_tokens']:.0f}); "
        f"{s['servers']} servers, one `epp sim` process each on its own loopback address (pod-like), publishing "
        f"vLLM KV events; time scale {s['time_scale']:g}; {s['runs']} runs per cell, fresh fleet each run, cells "
        "interleaved. Values: median (min–max) over the runs. TTFT is of the routed requests (the direct third is "
        "the `direct p90` column); the hit rate is client-side, cached / prompt tokens of the routed requests.",
        "",
        *report.policies_markdown(entry["policies"], entry.get("skipped_policies")),
    ]
    rows = []
    for name, cell in entry["cells"].items():
        a = cell["aggregate"]
        rows.append([name, _fmt_agg(a, "ttft_p50"), _fmt_agg(a, "ttft_p90"), _fmt_agg(a, "ttft_p99"),
                     _fmt_agg(a, "direct_ttft_p90"), _fmt_agg(a, "hit_rate", pct=True),
                     _fmt_agg(a, "steady_ttft_p90"), _fmt_agg(a, "steady_hit_rate", pct=True),
                     _fmt_agg(a, "errors", digits=0), _fmt_agg(a, "epp_cpu_us_per_request", digits=0),
                     f"{a['runs'] - a['failed_runs']}/{a['runs']}"])
    lines += [report.markdown_table(
        ["cell", "TTFT p50 (s)", "TTFT p90 (s)", "TTFT p99 (s)", "direct p90 (s)", "hit rate (routed)",
         "after warm-up: TTFT p90 (s)", "hit rate", "errors", "EPP CPU µs/req", "runs ok"], rows), "",
              f"\"After warm-up\": routed requests sent after the first {WARMUP:.0%} of the run, when every tenant's "
              "first request (a miss whatever the policy) is behind us. EPP CPU per routed request is the EPP "
              "processes' CPU (children included: the KV-event subscriber, the collector) above their idle rate, "
              "measured before and after the load; for precise it includes decoding the events that the direct "
              "third of the traffic causes.", ""]
    rows = []
    for name, cell in entry["cells"].items():
        a = cell["aggregate"]
        if "miss_rate" in a:
            rows.append([name, _fmt_agg(a, "miss_rate", pct=True), _fmt_agg(a, "miss_ttft_p50"),
                         _fmt_agg(a, "tail_miss_share", pct=True), _fmt_agg(a, "tail_warmup_share", pct=True)])
    if rows:
        lines += [f"Where the p90 comes from: a *miss* is a routed request that found less than {MISS:.0%} of its "
                  "prompt cached and paid (most of) a full prefill; the *tail* is the routed requests at or above the "
                  "run's TTFT p90. With more than 10% misses the p90 is a miss's TTFT, whatever the router.", "",
                  report.markdown_table(["cell", "misses (routed)", "miss TTFT p50 (s)", "tail: misses",
                                         "tail: sent in the warm-up"], rows), ""]
    targets = entry.get("targets") or []
    if targets:
        lines += ["Targets: " + TARGET_TEXT + ".", "", report.markdown_table(
            ["target", "value", "required", "verdict", "detail"],
            [[t["target"], f"{t['value']:.2f}", f"{t['required']:g}", "**met**" if t["met"] else "**missed**",
              t["detail"]] for t in targets]), ""]
    return lines

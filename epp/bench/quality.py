"""``epp bench quality``: does the EPP route better than the alternatives, on the same fleet?

For every workload (epp/bench/workloads.py) and every policy, a fresh simulated fleet (so every
policy starts with cold caches) is put behind the policy's router and the same seeded, open-loop
request stream is replayed through it:

    (a) envoy-round-robin       Envoy ROUND_ROBIN cluster, no EPP
    (b) epp-random              Envoy + EPP, random-picker (the EPP path without intelligence)
    (c) epp-default             Envoy + EPP, built-in default profile (queue x2, KV x2, prefix x3)
    (d) epp-seed                Envoy + EPP, config/seed-pipeline.yaml
        epp-inflight            extra: the default profile + the EPP's own in-flight counts
        epp-ttft                extra: epp-inflight + the prefill backlog awaiting a first token
    (e) vllm-router-*, smg-*    peer routers from PyPI (separate venv), when installable

The offered load is a fixed fraction of fleet capacity computed from the sim's own physics
(epp/bench/capacity.py); nothing about the sim is tuned here. Latencies are reported in model
seconds (wall seconds / time scale), i.e. what an 8B model on H100s would see.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from epp.bench import kvpressure
from epp.bench import overload as overload_mod
from epp.bench import peers as peers_mod
from epp.bench import report, stacks, workloads
from epp.bench.capacity import saturation_capacity, simulate_round_robin
from epp.bench.loadgen import RequestResult, run_workload
from epp.bench.procs import ProcessFailed, ProcessGroup

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str  # "envoy-rr" | "epp" | "peer"
    description: str
    epp_config: str | None = None  # file under config/; None = the EPP's built-in default
    peer: str = ""
    peer_policy: str = ""


POLICIES: tuple[Policy, ...] = (
    Policy("envoy-round-robin", "envoy-rr", "Envoy ROUND_ROBIN, no EPP"),
    Policy("epp-random", "epp", "Envoy + EPP, random-picker", epp_config="random-picker.yaml"),
    Policy("epp-default", "epp", "Envoy + EPP, built-in default profile (queue x2, kv-cache x2, prefix x3)"),
    Policy("epp-seed", "epp", "Envoy + EPP, seed pipeline (prometheus-metric -> metric-scorer + queue, kv, prefix)",
           epp_config="seed-pipeline.yaml"),
    Policy("epp-inflight", "epp", "Envoy + EPP, default profile + active-request-scorer (the EPP's own in-flight "
           "counts; an extra policy, not one of issue 7's)", epp_config="inflight-aware.yaml"),
    Policy("epp-ttft", "epp", "Envoy + EPP, in-flight profile + prefill-backlog-scorer (uncached prompt tokens "
           "routed and awaiting a first token; an extra policy)", epp_config="ttft-aware.yaml"),
    Policy("epp-flow-strict", "epp", "Envoy + EPP, flow control (concurrency-detector at the servers' batch size), "
           "global-strict fairness: one FCFS queue per priority band", epp_config="flow-control.yaml"),
    Policy("epp-flow-rr", "epp", "Envoy + EPP, flow control (concurrency-detector at the servers' batch size), "
           "round-robin fairness between tenants", epp_config="flow-control-round-robin.yaml"),
    *(Policy(f"{spec.name}-{pol}", "peer", f"{spec.name} {spec.requirement.split('==')[-1]}, --policy {pol}",
             peer=spec.name, peer_policy=pol)
      for spec in peers_mod.PEERS.values() for pol in spec.policies),
)
POLICY_NAMES = tuple(p.name for p in POLICIES)
WORKLOAD_NAMES = tuple(workloads.WORKLOADS)
# Workloads with a harness of their own (fleet, policies, repeats): name -> runner module.
SPECIAL_WORKLOADS = {"kv-pressure": kvpressure}
# Offered load as a fraction of the fleet's load-blind saturation capacity (see capacity.py).
# LoRA is lower: its saturation capacity counts on the sim batching requests of the same adapter
# out of a long queue, which a moderately loaded server cannot do. The virtual round-robin
# replay (simulate_round_robin) shows the knee: TTFT p90 0.34 s at 0.4, 1.4 s at 0.5, 3.7 s at
# 0.6, 6.2 s at 0.7 (queues grow until batching catches up).
DEFAULT_LOAD = {"shared-prefix": 0.7, "mixed-lengths": 0.8, "lora": 0.5, "overload": 2.0}
TARGETS = {
    "shared-prefix": "TTFT p90 at least 3x better than envoy-round-robin and no worse than the best peer policy",
    "mixed-lengths": "TTFT p90 at least 1.5x better than envoy-round-robin",
    "overload": "with flow control and round-robin fairness, tenant A's TTFT p90 at most 2x its idle-fleet value "
                "with at least 99 % success; high-priority requests never wait behind lower bands; every request "
                "accounted for",
}
EPP_SMART = ("epp-default", "epp-seed", "epp-inflight", "epp-ttft")
EXTRA_POLICIES = ("epp-inflight", "epp-ttft")  # beyond issue 7's list; shown, but marked as extra


@dataclass
class QualitySettings:
    servers: int = 8
    time_scale: float = 1.0  # wall seconds per model second
    duration: float = 30.0  # model seconds of arrivals per workload
    seed: int = 1
    load: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LOAD))
    workloads: tuple[str, ...] = WORKLOAD_NAMES
    policies: tuple[str, ...] = POLICY_NAMES
    # The Envoy config the EPP policies run behind (a template in envoy/, see epp/envoyconfig.py).
    envoy_template: str = "envoy.yaml"
    request_timeout: float = 300.0  # wall seconds
    install_peers: bool = True
    kv_pressure: kvpressure.KVPressureSettings = field(default_factory=kvpressure.KVPressureSettings)

    def validate(self) -> None:
        unknown = [p for p in self.policies if p not in POLICY_NAMES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; known: {', '.join(POLICY_NAMES)}")
        unknown = [w for w in self.workloads if w not in WORKLOAD_NAMES]
        if unknown:
            raise ValueError(f"unknown workloads {unknown}; known: {', '.join(WORKLOAD_NAMES)}")
        if self.servers < 1 or self.time_scale <= 0 or self.duration <= 0:
            raise ValueError("servers, time scale and duration must be positive")


def smoke_settings() -> QualitySettings:
    """Seconds, not minutes: 2 servers, a few requests per workload, the two baseline-vs-EPP policies."""
    return QualitySettings(servers=2, time_scale=0.1, duration=3.0,
                           policies=("envoy-round-robin", "epp-seed"), install_peers=False,
                           request_timeout=30.0, kv_pressure=kvpressure.smoke_kv_settings(),
                           # kv-pressure has its own smoke (`--workloads kv-pressure --smoke`)
                           # overload has its own smoke too (`--workloads overload --policies epp-flow-rr`)
                           workloads=tuple(w for w in WORKLOAD_NAMES
                                           if w not in SPECIAL_WORKLOADS and w != "overload"))


# -- planning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedWorkload:
    workload: workloads.Workload
    capacity_per_server: float  # requests per model second, load-blind
    load_fraction: float
    # TTFT percentiles of round-robin replayed on the sim's scheduler with a virtual clock: the
    # physics alone, to compare with the measured envoy-round-robin run.
    predicted_round_robin: Mapping[str, float]


def plan_workload(name: str, settings: QualitySettings) -> PlannedWorkload:
    """Pick the arrival rate as ``load`` x fleet capacity for this workload's request mix."""
    # A fixed seed per workload, whichever subset of workloads runs.
    seed = settings.seed + WORKLOAD_NAMES.index(name)
    # A large sample of the same mix (same seed: same tenants/adapters) to measure capacity on.
    probe = workloads.build(name, seed=seed, rate=10.0, duration=80.0)
    cap = saturation_capacity(probe.requests, lora_adapters=probe.lora_adapters)
    fraction = settings.load[name]
    rate = fraction * settings.servers * cap.requests_per_s
    wl = workloads.build(name, seed=seed, rate=rate, duration=settings.duration)
    predicted = simulate_round_robin(wl.requests, settings.servers, lora_adapters=wl.lora_adapters)
    return PlannedWorkload(wl, cap.requests_per_s, fraction,
                           {f"ttft_p{q}": report.percentile(predicted, q) for q in (50, 90, 99)})


# -- one run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartedPolicy:
    url: str  # where clients send requests
    epp_metrics_url: str | None = None  # the EPP's metrics/debug port, for EPP policies


def start_policy(group: ProcessGroup, policy: Policy, fleet: stacks.SimFleetHandle,
                 settings: QualitySettings, installs: Mapping[str, peers_mod.PeerInstall]) -> StartedPolicy:
    """Start ``policy``'s router in front of ``fleet``."""
    if policy.kind == "envoy-rr":
        return StartedPolicy(stacks.start_envoy_template(group, "envoy-direct.yaml", backends=fleet.addresses).url)
    if policy.kind == "epp":
        config = CONFIG_DIR / policy.epp_config if policy.epp_config else None
        epp = stacks.start_epp(group, fleet.addresses, config_file=config)
        envoy = stacks.start_envoy_template(group, settings.envoy_template, backends=fleet.addresses,
                                            epp_port=epp.grpc_port)
        return StartedPolicy(envoy.url, epp.metrics_url)
    if policy.kind == "peer":
        install = installs[policy.peer]

        def argv(port: int, prom_port: int) -> list[str]:
            return peers_mod.command(install, policy.peer_policy, port=port, prometheus_port=prom_port,
                                     worker_urls=fleet.urls)

        return StartedPolicy(stacks.start_peer_router(group, argv, name=policy.name).url)
    raise ValueError(f"unknown policy kind {policy.kind!r}")


async def _watch_epp(metrics_url: str, stop: asyncio.Event, samples: list[dict[str, Any]], every: float = 1.0) -> None:
    """Sample the EPP's view of the endpoints (data age, reachability) while the load runs.

    Stale endpoint data is the usual reason a metric-driven policy herds onto one server, so
    the report shows how fresh the EPP's data stayed.
    """
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                async with http.get(metrics_url + "/debug/endpoints") as resp:
                    rows = (await resp.json()).get("endpoints", [])
                ages = [r["metrics_age_s"] for r in rows if r.get("metrics_age_s") is not None]
                samples.append({"t": t, "max_age_s": max(ages, default=None),
                                "unreachable": sum(1 for r in rows if not r.get("reachable", True))})
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                samples.append({"t": t, "max_age_s": None, "unreachable": None, "error": True})
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass


def _save_epp_diagnostics(metrics_url: str, log_dir: Path) -> dict[str, float]:
    """Keep the EPP's last decisions and metrics next to the logs; return its error counters."""
    out: dict[str, float] = {}
    for path, fname in (("/debug/decisions?n=200", "epp-decisions.json"), ("/debug/endpoints", "epp-endpoints.json"),
                        ("/metrics", "epp-metrics.txt")):
        try:
            with urllib.request.urlopen(metrics_url + path, timeout=5) as resp:  # noqa: S310
                body = resp.read()
        except OSError:
            continue
        (log_dir / fname).write_bytes(body)
        if fname == "epp-metrics.txt":
            for line in body.decode().splitlines():
                for prefix, key in (("llm_d_inference_scheduler_datalayer_poll_errors_total", "epp_poll_errors"),
                                    ("epp_scorer_stale_or_missing_metric_total", "epp_stale_scores")):
                    if line.startswith(prefix):
                        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


SIM_COUNTERS = {
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:request_success_total": "requests",
    "sim:lora_adapter_loads_total": "lora_loads",
}


def scrape_sim_counters(url: str, timeout: float = 5.0) -> dict[str, float]:
    """The few counters the report needs from one sim's /metrics (blocking; not on the sim's loop)."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as resp:  # noqa: S310
        return parse_sim_counters(resp.read().decode())


def parse_sim_counters(text: str) -> dict[str, float]:
    """Sum the SIM_COUNTERS samples of a Prometheus text page over their label sets."""
    out = dict.fromkeys(SIM_COUNTERS.values(), 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        key = SIM_COUNTERS.get(line[:end]) if end > 0 else None
        if key is not None:
            out[key] += float(line.rsplit(" ", 1)[1])
    return out


@dataclass
class RunOutcome:
    policy: str
    workload: str
    summary: dict[str, Any]
    results: list[RequestResult]


def run_one(policy: Policy, planned: PlannedWorkload, settings: QualitySettings, log_dir: Path,
            installs: Mapping[str, peers_mod.PeerInstall],
            progress: Callable[[int, int], None] | None = None) -> RunOutcome:
    wl = planned.workload
    with ProcessGroup(log_dir) as group:
        fleet = stacks.start_sim_fleet(group, settings.servers, time_scale=settings.time_scale,
                                       seed=settings.seed, lora_adapters=wl.lora_adapters)
        started = start_policy(group, policy, fleet, settings, installs)
        procs = list(group.processes)
        cpu0 = [p.cpu_seconds() for p in procs]
        samples: list[dict[str, Any]] = []

        async def drive() -> list[RequestResult]:
            stop = asyncio.Event()
            watcher = (asyncio.create_task(_watch_epp(started.epp_metrics_url, stop, samples))
                       if started.epp_metrics_url else None)
            try:
                return await run_workload(started.url, wl, time_scale=settings.time_scale,
                                          request_timeout=settings.request_timeout, progress=progress)
            finally:
                stop.set()
                if watcher is not None:
                    await watcher

        t0 = time.perf_counter()
        results = asyncio.run(drive())
        wall = time.perf_counter() - t0
        cpu = {p.name: (p.cpu_seconds() - c) / wall for p, c in zip(procs, cpu0)}
        per_server = {u: scrape_sim_counters(u) for u in fleet.urls}
        diagnostics = _save_epp_diagnostics(started.epp_metrics_url, log_dir) if started.epp_metrics_url else {}
    summary = summarize(results, settings.time_scale, per_server, wall)
    summary["cpu_cores"] = {k: round(v, 3) for k, v in cpu.items()}
    # Other work on the machine skews latencies; record how busy it was.
    summary["load_average_1m"] = round(os.getloadavg()[0], 2)
    if wl.name == "overload":
        summary["groups"] = overload_mod.group_stats(results, settings.time_scale)
        metrics_file = log_dir / "epp-metrics.txt"
        acc = (overload_mod.epp_accounting(metrics_file.read_text())
               if started.epp_metrics_url and metrics_file.exists() else None)
        summary["accounting"] = acc
        summary["accounted"] = overload_mod.accounted(results, acc, policy.name in overload_mod.FLOW_POLICIES)
    if started.epp_metrics_url:
        ages = [x["max_age_s"] for x in samples if x.get("max_age_s") is not None]
        summary["epp_data_age_max_s"] = max(ages, default=None)
        summary["epp_data_age_p90_s"] = report.percentile(ages, 90) if ages else None
        summary["epp_unreachable_samples"] = sum(1 for x in samples if x.get("unreachable"))
        summary.update(diagnostics)
    return RunOutcome(policy.name, wl.name, summary, results)


def summarize(results: Sequence[RequestResult], time_scale: float, per_server: Mapping[str, Mapping[str, float]],
              wall: float) -> dict[str, Any]:
    """Client-side latencies (model seconds) and server-side counters of one run."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft / time_scale for r in ok if r.ttft is not None]
    e2e = [r.e2e / time_scale for r in ok if r.e2e is not None]
    totals = {k: sum(s[k] for s in per_server.values()) for k in SIM_COUNTERS.values()}
    if ok:
        start = min(r.scheduled for r in results)
        end = max(r.scheduled + r.lag + (r.e2e or 0.0) for r in ok)
        span_model = max(end - start, 1e-9) / time_scale
    else:
        span_model = float("nan")
    served = [s["requests"] for s in per_server.values()]
    mean_served = sum(served) / len(served) if served else 0.0
    prompt = sum(r.prompt_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = (r.error or f"HTTP {r.status}")[:120]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "ttft_p50": report.percentile(ttft, 50),
        "ttft_p90": report.percentile(ttft, 90),
        "ttft_p99": report.percentile(ttft, 99),
        "ttft_mean": sum(ttft) / len(ttft) if ttft else float("nan"),
        "e2e_p50": report.percentile(e2e, 50),
        "e2e_p90": report.percentile(e2e, 90),
        "throughput_rps": len(ok) / span_model,
        "throughput_output_tps": sum(r.output_tokens for r in ok) / span_model,
        "prefix_hit_rate": totals["prefix_hits"] / totals["prefix_queries"] if totals["prefix_queries"] else 0.0,
        "client_cached_fraction": (sum(r.cached_tokens or 0 for r in ok) / prompt) if prompt else 0.0,
        "preemptions": int(totals["preemptions"]),
        "lora_loads": int(totals["lora_loads"]),
        "served_per_server": [int(x) for x in served],
        "load_imbalance": (max(served) / mean_served) if mean_served else float("nan"),
        "max_client_lag_s": max((r.lag for r in results), default=0.0),
        "wall_s": round(wall, 2),
        "ttft_samples": [round(x, 5) for x in ttft],
    }


# -- the whole benchmark -----------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


def run_quality_bench(out_dir: str | Path, smoke: bool = False, *,
                      settings: QualitySettings | None = None) -> dict[str, Any]:
    """Run every (workload, policy) pair; write result.json, summary.md and plots to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = settings or (smoke_settings() if smoke else QualitySettings())
    s.validate()
    policies = [p for p in POLICIES if p.name in s.policies]
    skipped: dict[str, str] = {}
    installs: dict[str, peers_mod.PeerInstall] = {}
    wanted_peers = sorted({p.peer for p in policies if p.kind == "peer"}
                          | ({kvpressure.KV_POLICIES[n].peer for n in s.kv_pressure.policies
                              if n in kvpressure.KV_POLICIES and kvpressure.KV_POLICIES[n].kind == "peer"}
                             if "kv-pressure" in s.workloads else set()))
    if wanted_peers:
        if s.install_peers:
            _say(f"installing peer routers {wanted_peers} into {out.parent / '.peers-venv'} (once)")
            installs = peers_mod.ensure_installed(out.parent / ".peers-venv", wanted_peers)
        for p in policies:
            if p.kind == "peer" and not (p.peer in installs and installs[p.peer].ok):
                skipped[p.name] = installs[p.peer].detail if p.peer in installs else "peer installation disabled"
        policies = [p for p in policies if p.name not in skipped]

    result: dict[str, Any] = {
        "benchmark": "quality",
        "smoke": smoke,
        "machine": report.machine_info(),
        "settings": {k: v for k, v in asdict(s).items()} | {"load": dict(s.load)},
        "policies": {p.name: p.description for p in policies},
        "skipped_policies": skipped,
        "workloads": {},
    }
    started = time.perf_counter()
    for name in s.workloads:
        if name in SPECIAL_WORKLOADS:
            result["workloads"][name] = SPECIAL_WORKLOADS[name].run_kv_pressure(out, s.kv_pressure, installs, say=_say)
            continue
        planned = plan_workload(name, s)
        wl = planned.workload
        entry: dict[str, Any] = {
            "workload": wl.summary(),
            "capacity_per_server_rps": planned.capacity_per_server,
            "load_fraction": planned.load_fraction,
            "predicted_round_robin": dict(planned.predicted_round_robin),
            "runs": {},
        }
        result["workloads"][name] = entry
        _say(f"{name}: {len(wl.requests)} requests at {wl.rate:.2f}/s "
             f"({planned.load_fraction:.0%} of {s.servers} x {planned.capacity_per_server:.2f}/s), "
             f"{len(policies)} policies")
        for policy in policies:
            if not overload_mod.runs_on(policy.name, name):
                continue
            t = time.perf_counter()
            try:
                try:
                    outcome = run_one(policy, planned, s, out / "logs" / name / policy.name, installs)
                except ProcessFailed as exc:
                    # Usually a port taken by another process between our pick and the bind
                    # (the peers need explicit ports); one retry with fresh ports.
                    _say(f"  {policy.name}: start-up failed ({str(exc).splitlines()[0]}); retrying once")
                    outcome = run_one(policy, planned, s, out / "logs" / name / policy.name, installs)
            except Exception as exc:  # noqa: BLE001 - one broken policy must not lose the others' results
                entry["runs"][policy.name] = {"failed": f"{type(exc).__name__}: {exc}"[:2000]}
                _say(f"  {policy.name}: FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                continue
            entry["runs"][policy.name] = outcome.summary
            report.write_json(out / "raw" / name / f"{policy.name}.json", [r.as_dict() for r in outcome.results])
            m = outcome.summary
            _say(f"  {policy.name:28s} TTFT p50 {m['ttft_p50']:.3f}s p90 {m['ttft_p90']:.3f}s "
                 f"hit {m['prefix_hit_rate']:.0%} ok {m['ok']}/{m['requests']} ({time.perf_counter() - t:.0f}s)")
        if name == "overload" and overload_mod.IDLE_POLICY in s.policies:
            _run_idle_baseline(planned, s, out, installs, entry)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["targets"] = evaluate_targets(result)
    report.write_json(out / "result.json", result)
    write_quality_report(result, out)
    return result


def _run_idle_baseline(planned: PlannedWorkload, s: QualitySettings, out: Path,
                       installs: Mapping[str, peers_mod.PeerInstall], entry: dict[str, Any]) -> None:
    """Tenant A's requests alone on a fresh fleet: the idle-fleet yardstick of the overload targets."""
    wl = planned.workload
    alone = replace(wl, requests=tuple(r for r in wl.requests if r.group == "A"))
    policy = next(p for p in POLICIES if p.name == overload_mod.IDLE_POLICY)
    try:
        outcome = run_one(policy, replace(planned, workload=alone), s, out / "logs" / wl.name / "idle-A", installs)
    except Exception as exc:  # noqa: BLE001
        entry["idle_baseline"] = {"failed": f"{type(exc).__name__}: {exc}"[:2000]}
        return
    entry["idle_baseline"] = {k: v for k, v in outcome.summary.items() if k != "ttft_samples"}
    a = outcome.summary["groups"].get("A", {})
    _say(f"  idle fleet, tenant A alone: TTFT p50 {a.get('ttft_p50') or float('nan'):.3f}s "
         f"p90 {a.get('ttft_p90') or float('nan'):.3f}s")


# -- targets and report ------------------------------------------------------------------------


def _p90(runs: Mapping[str, Any], name: str) -> float | None:
    run = runs.get(name) or {}
    v = run.get("ttft_p90")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def evaluate_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Check issue 7's targets for each smart EPP policy that ran."""
    out: list[dict[str, Any]] = []
    for wl_name, factor in (("shared-prefix", 3.0), ("mixed-lengths", 1.5)):
        entry = result["workloads"].get(wl_name)
        if not entry or "runs" not in entry:
            continue
        runs = entry["runs"]
        rr = _p90(runs, "envoy-round-robin")
        peer_p90 = {n: v for n in runs if n.startswith(tuple(peers_mod.PEERS)) if (v := _p90(runs, n)) is not None}
        best_peer = min(peer_p90.items(), key=lambda kv: kv[1]) if peer_p90 else None
        for epp in EPP_SMART:
            p = _p90(runs, epp)
            if p is None or rr is None:
                continue
            speedup = rr / p if p > 0 else float("inf")
            row: dict[str, Any] = {
                "workload": wl_name, "policy": epp, "ttft_p90": p, "round_robin_ttft_p90": rr,
                "speedup_vs_round_robin": speedup, "required_speedup": factor, "speedup_met": speedup >= factor,
            }
            if wl_name == "shared-prefix":
                if best_peer is None:
                    row["best_peer"] = None
                    row["peer_met"] = None
                else:
                    row["best_peer"] = best_peer[0]
                    row["best_peer_ttft_p90"] = best_peer[1]
                    row["peer_met"] = p <= best_peer[1]
            out.append(row)
    return out


def _verdict(v: bool | None) -> str:
    return "n/a" if v is None else ("**met**" if v else "**missed**")


def write_quality_report(result: Mapping[str, Any], out: Path) -> Path:
    s = result["settings"]
    special = [n for n in result["workloads"] if "runs" not in result["workloads"][n]]
    names = [n for n in result["workloads"] if n not in special]
    all_policies = [p for p in POLICY_NAMES if any(p in result["workloads"][w]["runs"] for w in names)]
    lines = [
        "## Routing quality (`epp bench quality`)",
        "",
        f"{s['servers']} simulated vLLM servers (`epp sim`, default physics of an 8B model on one H100 each: "
        "max 32 sequences, 2048-token step budget, 2048 KV blocks of 16 tokens, prefix caching, 4 LoRA slots), "
        f"time scale {s['time_scale']:g} (wall seconds per model second). Every policy gets a fresh fleet (cold caches) "
        "and the same seeded open-loop Poisson request stream, streamed, with fixed output lengths (`ignore_eos`). "
        "Latencies are client-side, in model seconds; TTFT is the time to the first generated token. "
        "Prefix-cache hit rate and preemptions come from the servers' own counters "
        "(`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`, `vllm:num_preemptions_total`). "
        f"EPP policies run behind Envoy with `envoy/{s['envoy_template']}`. "
        "Offered load is a fraction of the fleet's load-blind capacity, computed by running the sim's own "
        "scheduler on a virtual clock with the workload's request mix (`epp/bench/capacity.py`).",
        "",
        *report.policies_markdown(result["policies"], result.get("skipped_policies")),
    ]
    if result.get("smoke"):
        lines += ["**Smoke run**: tiny parameters to keep the harness working; the numbers mean nothing.", ""]
    for wl_name in names:
        entry = result["workloads"][wl_name]
        w = entry["workload"]
        lines += [
            f"### {wl_name}",
            "",
            f"{w['description']}; {w['requests']} requests over {w['duration_model_s']:g} model seconds, "
            f"mean prompt {w['mean_prompt_tokens']:.0f} tokens, mean output {w['mean_output_tokens']:.0f} tokens; "
            f"offered load {entry['load_fraction']:.0%} of {s['servers']} x {entry['capacity_per_server_rps']:.2f} req/s.",
            "",
        ]
        rows = []
        for p in all_policies:
            m = entry["runs"].get(p)
            if m is None:
                continue
            if "failed" in m:
                rows.append([p, "failed: " + m["failed"].splitlines()[0][:80], *[""] * 10])
                continue
            rows.append([p, m["ttft_p50"], m["ttft_p90"], m["ttft_p99"], m["e2e_p90"], m["throughput_rps"],
                         m["throughput_output_tps"], f"{m['prefix_hit_rate']:.1%}", m["preemptions"], m["lora_loads"],
                         m["load_imbalance"], f"{m['errors']}/{m['requests']}"])
        lines += [report.markdown_table(
            ["policy", "TTFT p50 (s)", "TTFT p90 (s)", "TTFT p99 (s)", "e2e p90 (s)", "req/s", "output tok/s",
             "prefix hit", "preemptions", "LoRA loads", "max/mean per server", "errors"], rows), ""]
        for p in all_policies:
            m = entry["runs"].get(p) or {}
            if m.get("errors"):
                sample, count = next(iter(m["error_samples"].items()))
                lines += [f"Errors with `{p}`: {m['errors']} of {m['requests']}, most often ({count}x): `{sample}`", ""]
        pred = entry.get("predicted_round_robin") or {}
        if pred:
            lines += [f"Round-robin replayed on the sim's scheduler with a virtual clock (the physics alone, no "
                      f"processes): TTFT p50 {report.fmt(pred.get('ttft_p50'))} s, p90 {report.fmt(pred.get('ttft_p90'))} s, "
                      f"p99 {report.fmt(pred.get('ttft_p99'))} s; compare with the measured `envoy-round-robin` row.", ""]
        if wl_name == "overload":
            lines += overload_mod.markdown(entry, all_policies)
        lines += [f"![TTFT CDF, {wl_name}](quality_ttft_cdf_{wl_name}.png)", ""]
        if wl_name in TARGETS:
            lines += [f"Target: {TARGETS[wl_name]}.", ""]
    targets = evaluate_targets(result)  # with the current rules, also when re-rendering old results
    if targets:
        rows = []
        for t in targets:
            peer = "–"
            if t["workload"] == "shared-prefix":
                peer = (f"{_verdict(t['peer_met'])} (best peer `{t['best_peer']}` {t['best_peer_ttft_p90']:.3f}s)"
                        if t.get("best_peer") else "n/a (no peer ran)")
            label = t["policy"] + (" (extra)" if t["policy"] in EXTRA_POLICIES else "")
            rows.append([t["workload"], label, t["ttft_p90"], t["round_robin_ttft_p90"],
                         f"{t['speedup_vs_round_robin']:.2f}x (need {t['required_speedup']:g}x) "
                         f"{_verdict(t['speedup_met'])}", peer])
        lines += ["### Targets", "", report.markdown_table(
            ["workload", "policy", "TTFT p90 (s)", "round-robin TTFT p90 (s)", "vs round-robin", "vs best peer"], rows), ""]
    for wl_name in special:
        lines += SPECIAL_WORKLOADS[wl_name].report_lines(result["workloads"][wl_name])
    if names:
        lines += ["![TTFT percentiles](quality_ttft_bars.png)", "", "![Prefix-cache hit rate](quality_prefix_hits.png)", ""]
    lines += _cpu_section(result, names, all_policies)
    lines += [
        "Notes on fairness: the peers are their own data-plane proxies; the EPP policies add Envoy plus an "
        "ext_proc round trip per request. Peer retries and circuit breakers are disabled (our Envoy has none); "
        "smg's load monitor polls worker /metrics every 1 s (its fastest; default 10 s); other peer settings are "
        "their defaults (vllm-router balances on its own in-flight counts). No policy here does LoRA-affinity "
        "routing (the EPP profiles above have no lora-affinity-scorer).",
        "",
    ]
    md = out / "summary.md"
    md.write_text("\n".join(lines))
    if names:
        _plots(result, out, names, all_policies)
    return md


def _cpu_section(result: Mapping[str, Any], names: Sequence[str], policies: Sequence[str]) -> list[str]:
    rows = []
    for p in policies:
        usage: dict[str, list[float]] = {}
        for w in names:
            m = result["workloads"][w]["runs"].get(p) or {}
            for proc, cores in (m.get("cpu_cores") or {}).items():
                usage.setdefault(proc if proc in ("sim", "epp", "envoy") else "router", []).append(cores)
        if usage:
            rows.append([p, *(max(usage.get(k, [float("nan")])) for k in ("sim", "envoy", "epp", "router"))])
    if not rows:
        return []
    return ["CPU used during the runs (cores, the most any workload used; the machine has "
            f"{result['machine'].get('logical_cpus')}; the load generator runs in the benchmark process):", "",
            report.markdown_table(["policy", "sim fleet", "envoy", "epp", "peer router"], rows), ""]


def _plots(result: Mapping[str, Any], out: Path, names: Sequence[str], policies: Sequence[str]) -> None:
    def metric(p: str, w: str, key: str) -> float:
        m = result["workloads"][w]["runs"].get(p) or {}
        v = m.get(key)
        return float("nan") if v is None else float(v)

    for key, fname, title, ylabel, log in (
        ("ttft_p90", "quality_ttft_bars.png", "TTFT p90 per workload and policy", "TTFT p90 (model s, log)", True),
        ("prefix_hit_rate", "quality_prefix_hits.png", "Prefix-cache hit rate (server counters)", "hit rate", False),
    ):
        series = {p: [metric(p, w, key) for w in names] for p in policies}
        report.plot_grouped_bars(out / fname, title, list(names), series, ylabel, log=log)
    for w in names:
        samples = {p: (result["workloads"][w]["runs"].get(p) or {}).get("ttft_samples") or [] for p in policies}
        report.plot_cdfs(out / f"quality_ttft_cdf_{w}.png", f"TTFT CDF, {w}", samples, "TTFT (model s)")


__all__ = ["POLICIES", "Policy", "QualitySettings", "run_quality_bench", "smoke_settings"]

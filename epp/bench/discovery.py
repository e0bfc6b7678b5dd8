"""Discovery benchmark: Kubernetes pod churn against the request path.

The in-memory API server (``epp.bench.kubeapi``) runs in its own process with 1,000 Ready pods
of one InferencePool, and patches 50 pods per second (a label carrying the wall time of the
write). This process runs what the EPP runs on its serving loop: ``KubernetesDiscovery`` (pool
and pod informers) feeding an ``EndpointPool``, and the default scheduling pipeline (parse,
prefix producer, admission, queue/kv/prefix scorers, max-score picker) over that pool.

Phases:

1. churn only, ``seconds`` long: the CPU the watch path costs (process CPU over the phase, per
   event), and the time from an update's write to the pool (what the scheduler reads) holding it;
2. paced decisions (``request_rate`` per second, evenly spaced) for ``seconds`` without churn
   and ``seconds`` with it, interleaved in ``rounds`` slices so that the load of a shared
   machine drifts over both alike.

A request's latency runs from its scheduled start to the end of its decision, so time spent
behind watch processing on the event loop counts; the same timer granularity (~1 ms) is in
both phases. With two or more CPUs the API server is pinned to one of them and this process to
the others: in a cluster the API server does not share the EPP's cores, and on a 2-core machine
its own CPU during the churn slices would otherwise land on the request path's tail.
Targets: update visible within 100 ms p99; request p99 within 10% of no churn.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from epp.bench.kubeapi import CHURN_LABEL, write_kubeconfig
from epp.bench.report import machine_info, percentile
from epp.bench.scheduler import DefaultPipeline, make_bodies
from epp.datalayer.endpoint import Endpoint, now
from epp.datalayer.pool import EndpointPool
from epp.discovery.kubeclient import KubeClient
from epp.discovery.kubernetes import KubernetesDiscovery
from epp.observability import deferred
from epp.scheduling.gctuning import tune_gc_for_serving

TARGET_VISIBLE_P99_MS = 100.0
TARGET_REQUEST_P99_RATIO = 1.10
NAMESPACE = "bench"
POOL = "bench-pool"


class _Visibility:
    """Pool listener: when an updated endpoint carrying a write stamp appears, how late it is."""

    def __init__(self, rng: random.Random) -> None:
        self.samples_ms: list[float] = []
        self.recording = False
        self._rng = rng

    def __call__(self, event: str, ep: Endpoint) -> None:
        if event == "added":  # give new endpoints plausible metrics so the scorers do real work
            ep.update_metrics(waiting_queue_size=self._rng.randrange(0, 8), running_requests=self._rng.randrange(64),
                              kv_cache_usage=self._rng.random() * 0.9, cache_block_size=16, cache_num_blocks=8192,
                              update_time=now() + 3600)
        stamp = ep.metadata.labels.get(CHURN_LABEL)
        if self.recording and stamp and ep.metadata.name.endswith("-rank-0"):
            self.samples_ms.append((time.time() - float(stamp)) * 1e3)


async def _paced_requests(pipeline: DefaultPipeline, bodies: list[bytes], rate: float, seconds: float) -> list[float]:
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    clock = time.perf_counter
    headers = {":path": "/v1/chat/completions", ":method": "POST", "content-type": "application/json"}
    latencies: list[float] = []
    start = clock() + 0.01
    i = 0
    while True:
        due = start + i / rate
        if due > start + seconds:
            break
        # Always give the loop a turn, as a server does between two requests' callbacks: a
        # decision run back to back behind schedule would starve the watch (and flatter nothing).
        await asyncio.sleep(max(0.0, due - clock()))
        pipeline.decide(bodies[i % len(bodies)], headers)
        latencies.append((clock() - due) * 1e3)
        i += 1
        if i % 100 == 0:
            deferred.flush()
    return latencies


def _stats(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"n": len(s), "p50_ms": round(percentile(s, 50), 3), "p90_ms": round(percentile(s, 90), 3),
            "p99_ms": round(percentile(s, 99), 3), "max_ms": round(s[-1], 3) if s else 0.0}


def _split_cpus(api_pid: int) -> dict[str, Any]:
    """Pin the API server to the last CPU we may use and this process to the rest (see the module doc)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"pinned": False, "cpus": cpus}
    os.sched_setaffinity(api_pid, {cpus[-1]})
    os.sched_setaffinity(0, set(cpus[:-1]))
    return {"pinned": True, "api_server_cpus": cpus[-1:], "epp_cpus": cpus[:-1], "restore": cpus}


def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


async def _run(out_dir: Path, *, pods: int, churn_rate: float, seconds: float, request_rate: float,
               prompt_bytes: int, rounds: int) -> dict[str, Any]:
    rng = random.Random(7)
    api = subprocess.Popen([sys.executable, "-m", "epp.bench.kubeapi", "--pods", str(pods), "--pool", POOL,
                            "--namespace", NAMESPACE, "--bookmark-interval", "5"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    placement: dict[str, Any] = {"pinned": False}
    try:
        assert api.stdout is not None and api.stdin is not None
        line = api.stdout.readline().decode()
        if "url=" not in line:
            raise RuntimeError(f"the API server did not start: {line!r}")
        url = line.split("url=")[1].split()[0]
        placement = _split_cpus(api.pid)
        with tempfile.TemporaryDirectory() as tmp:
            client = KubeClient.from_options(write_kubeconfig(Path(tmp) / "kubeconfig", url))
        pool = EndpointPool()
        visibility = _Visibility(rng)
        pool.subscribe(visibility)
        disc = KubernetesDiscovery(client, NAMESPACE, pool_name=POOL)
        c0, t0 = time.process_time(), time.perf_counter()
        task = asyncio.create_task(disc.run(pool))
        while not disc.ready():
            await asyncio.sleep(0.005)
        initial = {"seconds": round(time.perf_counter() - t0, 3), "cpu_ms": round((time.process_time() - c0) * 1e3, 1),
                   "endpoints": len(pool)}
        pipeline = DefaultPipeline(pool)
        bodies = make_bodies(prompt_bytes, rng)
        tune_gc_for_serving()  # as `epp serve` does once it is up
        await _paced_requests(pipeline, bodies, request_rate, min(2.0, seconds))  # warm-up

        def churn(duration: float) -> None:
            api.stdin.write(f"churn {churn_rate} {duration}\n".encode())
            api.stdin.flush()

        loads = {"before": _load_note()}
        informer = disc.pod_informer
        assert informer is not None
        events0 = informer.stats.events
        visibility.recording = True
        churn(seconds)
        c0 = time.process_time()
        await asyncio.sleep(seconds + 0.5)
        watch_cpu = time.process_time() - c0
        watch_events = informer.stats.events - events0
        visible_alone = list(visibility.samples_ms)
        visibility.samples_ms.clear()
        loads["churn only"] = _load_note()

        baseline: list[float] = []
        under_churn: list[float] = []
        slice_s = seconds / rounds
        for _ in range(rounds):
            visibility.recording = False
            baseline += await _paced_requests(pipeline, bodies, request_rate, slice_s)
            visibility.recording = True
            churn(slice_s)
            under_churn += await _paced_requests(pipeline, bodies, request_rate, slice_s)
            await asyncio.sleep(0.3)  # the slice's last writes land before the next baseline
        visible_busy = list(visibility.samples_ms)
        loads["requests, with and without churn"] = _load_note()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
    finally:
        api.kill()
        api.wait()
        if placement["pinned"]:
            os.sched_setaffinity(0, set(placement.pop("restore")))
    base, churned = _stats(baseline), _stats(under_churn)
    visible_all = _stats(visible_alone + visible_busy)
    return {
        "pods": pods, "churn_updates_per_s": churn_rate, "seconds": seconds, "request_rate": request_rate,
        "rounds": rounds,
        "initial_list": initial,
        "watch_path": {"events": watch_events, "cpu_s": round(watch_cpu, 3),
                       "cores": round(watch_cpu / (seconds + 0.5), 4),
                       "cpu_us_per_event": round(watch_cpu / max(1, watch_events) * 1e6, 1)},
        "visible_ms": {"churn_only": _stats(visible_alone), "with_requests": _stats(visible_busy), "all": visible_all},
        "request_ms": {"no_churn": base, "churn": churned},
        "request_p99_ratio": round(churned["p99_ms"] / base["p99_ms"], 3) if base["p99_ms"] else None,
        "targets": {"visible_p99_ms": TARGET_VISIBLE_P99_MS, "request_p99_ratio": TARGET_REQUEST_P99_RATIO},
        "meets": {"visible": visible_all["p99_ms"] <= TARGET_VISIBLE_P99_MS,
                  "request": bool(base["p99_ms"]) and churned["p99_ms"] <= base["p99_ms"] * TARGET_REQUEST_P99_RATIO},
        "load": loads,
        "placement": placement,
    }


def _markdown(r: dict[str, Any]) -> str:
    w, v, q = r["watch_path"], r["visible_ms"], r["request_ms"]
    yes = {True: "yes", False: "**no**"}
    return "\n".join([
        "# Discovery under pod churn (`epp bench discovery`)",
        "",
        f"{r['pods']} Ready pods in one InferencePool, {r['churn_updates_per_s']:g} pod updates/s (in-memory API "
        f"server in its own process): {r['seconds']:g} s of churn alone, then the default scheduling pipeline over "
        f"the discovered pool at {r['request_rate']:g} decisions/s (evenly spaced, on the same event loop as the "
        f"watches) for {r['seconds']:g} s without and {r['seconds']:g} s with churn, interleaved in {r['rounds']} "
        "slices. Request latency = scheduled start to decision done.",
        "",
        f"- initial list and sync: {r['initial_list']['endpoints']} endpoints in {r['initial_list']['seconds']} s "
        f"({r['initial_list']['cpu_ms']} ms CPU)",
        f"- watch path: {w['events']} events, {w['cpu_us_per_event']} µs CPU per event, {w['cores']} cores",
        "",
        "| | p50 ms | p90 ms | p99 ms | max ms | target | met |",
        "|---|---:|---:|---:|---:|---|---|",
        f"| update visible to the scheduler, churn only | {v['churn_only']['p50_ms']} | {v['churn_only']['p90_ms']} | "
        f"{v['churn_only']['p99_ms']} | {v['churn_only']['max_ms']} | | |",
        f"| update visible, churn and requests | {v['with_requests']['p50_ms']} | {v['with_requests']['p90_ms']} | "
        f"{v['with_requests']['p99_ms']} | {v['with_requests']['max_ms']} | | |",
        f"| update visible, all | {v['all']['p50_ms']} | {v['all']['p90_ms']} | {v['all']['p99_ms']} | "
        f"{v['all']['max_ms']} | p99 ≤ {r['targets']['visible_p99_ms']:g} ms | {yes[r['meets']['visible']]} |",
        f"| request, no churn | {q['no_churn']['p50_ms']} | {q['no_churn']['p90_ms']} | {q['no_churn']['p99_ms']} | "
        f"{q['no_churn']['max_ms']} | | |",
        f"| request, churn | {q['churn']['p50_ms']} | {q['churn']['p90_ms']} | {q['churn']['p99_ms']} | "
        f"{q['churn']['max_ms']} | p99 ≤ {r['targets']['request_p99_ratio']:g}× no churn "
        f"(got {r['request_p99_ratio']}×) | {yes[r['meets']['request']]} |",
        "",
        "Machine load during the phases: " + "; ".join(f"{k}: {val}" for k, val in r["load"].items()) + ".",
        "",
        (f"CPU placement: API server on CPU {r['placement']['api_server_cpus']}, this process on "
         f"{r['placement']['epp_cpus']}." if r["placement"].get("pinned")
         else "CPU placement: one CPU only, the API server shares it."),
        "",
    ])


def run_discovery_bench(out_dir: Path, *, smoke: bool = False) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = (dict(pods=100, churn_rate=50.0, seconds=1.5, request_rate=50.0, prompt_bytes=1024, rounds=1) if smoke
              else dict(pods=1000, churn_rate=50.0, seconds=60.0, request_rate=100.0, prompt_bytes=1024, rounds=6))
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    result = runner(_run(out_dir, **params))
    result.update(benchmark="discovery", smoke=smoke, machine=machine_info())
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "summary.md").write_text(_markdown(result))
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-results/discovery")
    run_discovery_bench(out, smoke="--smoke" in sys.argv)
    print((out / "summary.md").read_text())

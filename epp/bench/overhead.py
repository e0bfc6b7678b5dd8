"""`epp bench overhead`: what the EPP adds to a request, through a real Envoy.

The same trivial backend is reached three ways: Envoy direct (round-robin, no ext_proc),
Envoy + EPP in full duplex (``envoy/envoy.yaml``, the upstream shape) and Envoy + EPP
buffered (``envoy/envoy-buffered.yaml``). Each is driven closed-loop (as fast as possible,
fixed concurrency; ``hey`` when installed, else a Python load generator) and open-loop at a
fixed rate with evenly spaced and with Poisson arrivals (``epp.bench.pacedload``). When ``hey``
is installed, ``hey -q`` rows are added for comparison: its workers' tickers are aligned, so its
"fixed rate" is a burst of ``c`` requests every ``c / rate`` seconds. Reported: req/s, p50/p99
latency, the p99 added over direct, and EPP CPU microseconds per request from
``/proc/<pid>/stat`` (minus the EPP's idle CPU, i.e. the collector scraping the backend,
measured before the runs).

    run_overhead_bench(Path("bench-out/overhead"), smoke=True)  -> dict, plus overhead.json/.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from epp.bench.backend import serve_backend, start_backend
from epp.bench.idlecost import markdown as idle_markdown
from epp.bench.idlecost import measure_idle_penalty
from epp.bench.pacedload import run_paced
from epp.bench.procs import ProcessGroup, free_port

BODY = json.dumps({"model": "bench-model", "prompt": "The quick brown fox jumps over the lazy dog. " * 4,
                   "max_tokens": 16}).encode()
CONFIGS = (("direct", "envoy-direct.yaml"), ("duplex", "envoy.yaml"), ("buffered", "envoy-buffered.yaml"))


@dataclass
class RunResult:
    config: str
    mode: str  # closed-cN | rate-R (even spacing) | poisson-R | hey-q-R (hey's aligned bursts)
    core: str  # the EPP's ext_proc server core ("-" for direct)
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    epp_cpu_us_per_req: float | None = None
    added_p99_ms: float | None = None
    tool: str = ""


# --- the trivial backend ------------------------------------------------------------------------
def _backend_main(port: int) -> None:
    from aiohttp import web

    from epp.bench.metric_pages import vllm_page

    answer = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": "bench-model",
                         "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41}}).encode()
    page = vllm_page()

    from epp.sim.tokenizer import tokenize

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        if request.path.endswith("/completions/render"):  # vLLM's render endpoint, for precise routing
            ids = tokenize(json.loads(body).get("prompt", ""))
            return web.json_response([{"token_ids": ids}])
        return web.Response(body=answer, content_type="application/json")

    serve_backend("overhead", port, post, page)


# Precise prefix routing on the same request path: upstream's weights, with token IDs from the
# backend's render endpoint on every request (no token cache: the benchmark repeats one prompt).
# Nothing publishes KV events here, so the index lookup finds nothing; its cost at realistic sizes
# is measured in epp/kvcache/README.md and in the kv-pressure runs.
PRECISE_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    kvEventsConfig: {{podDiscoveryConfig: {{socketPort: {port}}}}}
- type: token-producer
  parameters: {{cacheSize: 0}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer, weight: 3}}, {{pluginRef: queue-scorer, weight: 2}}, {{pluginRef: kv-cache-utilization-scorer, weight: 2}}]
"""


# --- load generation ----------------------------------------------------------------------------
_HEY_LAT = re.compile(r"^\s+(\d+)%% in ([\d.]+) secs".replace("%%", "%"), re.M)


def _hey(url: str, seconds: float, concurrency: int, rate: float | None) -> tuple[int, int, float, list[tuple[int, float]]]:
    argv = ["hey", "-z", f"{seconds:g}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json",
            "-d", BODY.decode()]
    if rate:
        argv += ["-q", f"{max(1.0, rate / concurrency):g}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60).stdout
    ok = sum(int(n) for n in re.findall(r"\[200\]\s+(\d+) responses", out))
    total = sum(int(n) for n in re.findall(r"\[\d+\]\s+(\d+) responses", out))
    errors = total - ok + sum(int(n) for n in re.findall(r"^\s+\[\d+\]\s+(\d+)\s+errors", out, re.M))
    rps = float(m.group(1)) if (m := re.search(r"Requests/sec:\s+([\d.]+)", out)) else 0.0
    lat = [(int(p), float(s) * 1e3) for p, s in _HEY_LAT.findall(out)]
    return ok, errors, rps, lat


async def _python_load(url: str, seconds: float, concurrency: int) -> tuple[int, int, list[float]]:
    """Closed loop: ``concurrency`` workers, each sending its next request when the last ends."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=BODY, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
        except aiohttp.ClientError:
            errors += 1
            return
        latencies.append((time.perf_counter() - t0) * 1e3)

    conn = aiohttp.TCPConnector(limit=concurrency * 4)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker() -> None:
            while time.perf_counter() < end:
                await one(session)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), errors, latencies


def _load(url: str, seconds: float, concurrency: int, rate: float | None,
          arrivals: str = "") -> tuple[int, int, float, float, float, str]:
    """(ok, errors, rps, p50 ms, p99 ms, tool). ``arrivals`` ``uniform``/``poisson``: paced
    open loop at ``rate``; ``hey``: ``hey -q`` (aligned bursts); else closed loop."""
    from epp.bench.report import percentile

    if arrivals in ("uniform", "poisson"):
        res = run_paced(url, BODY, rate=float(rate or 0), seconds=seconds, arrivals=arrivals)
        return (res.ok, res.errors, res.rps, percentile(res.latencies_ms, 50), percentile(res.latencies_ms, 99),
                f"paced-{arrivals}")
    if shutil.which("hey"):
        ok, errors, rps, lat = _hey(url, seconds, concurrency, rate)
        pct = dict(lat)
        return ok, errors, rps, pct.get(50, float("nan")), pct.get(99, float("nan")), "hey"
    t0 = time.perf_counter()
    ok, errors, lat = asyncio.run(_python_load(url, seconds, concurrency))
    elapsed = time.perf_counter() - t0
    return ok, errors, ok / elapsed, percentile(lat, 50), percentile(lat, 99), "python"


# --- the benchmark --------------------------------------------------------------------------------
@contextlib.contextmanager
def _core_env(core: str):
    """Children inherit the environment: select the EPP's server core for the next start."""
    old = os.environ.get("EPP_EXTPROC_CORE")
    os.environ["EPP_EXTPROC_CORE"] = core
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EPP_EXTPROC_CORE", None)
        else:
            os.environ["EPP_EXTPROC_CORE"] = old


def run_overhead_bench(out_dir: Path, *, smoke: bool = False, cores: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``cores``: which ext_proc server cores to measure (default: ``fast``, plus ``grpcio`` for
    comparison unless ``smoke``)."""
    from epp.bench.report import machine_info, markdown_table, write_json
    from epp.bench.stacks import start_envoy_template, start_epp

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = 2.0 if smoke else 10.0
    rate = 200.0 if smoke else 500.0
    closed_c = 16
    cores = cores or (("fast",) if smoke else ("fast", "grpcio"))
    results: list[RunResult] = []
    with ProcessGroup(out_dir / "logs") as group:
        address = start_backend(group, "epp.bench.overhead", "overhead")
        direct = start_envoy_template(group, "envoy-direct.yaml", backends=[address], name="envoy-direct")
        stacks = []
        for core in cores:
            with _core_env(core):
                epp = start_epp(group, [address], name=f"epp-{core}")
            envoys = {name: start_envoy_template(group, template, backends=[address], epp_port=epp.grpc_port,
                                                 name=f"envoy-{name}-{core}")
                      for name, template in CONFIGS if name != "direct"}
            stacks.append((core, epp, envoys))
        # The same duplex path with precise prefix routing (the default profile above is approximate).
        config = out_dir / "logs" / "precise.yaml"
        config.write_text(PRECISE_CONFIG.format(port=free_port()))
        with _core_env(cores[0]):
            epp = start_epp(group, [address], name="epp-precise", config_file=config)
        stacks.append((f"{cores[0]}-precise", epp, {"duplex-precise": start_envoy_template(
            group, "envoy.yaml", backends=[address], epp_port=epp.grpc_port, name="envoy-duplex-precise")}))
        # Warm up every path (connections, caches, the EPP's gRPC connection).
        for url in [direct.url] + [e.url for _, _, envoys in stacks for e in envoys.values()]:
            _load(url + "/v1/completions", 1.0, 4, None)
        idle_window = 2.0
        idle: dict[str, float] = {}
        for core, epp, _ in stacks:
            c0 = epp.process.cpu_seconds()
            time.sleep(idle_window)
            idle[core] = (epp.process.cpu_seconds() - c0) / idle_window  # background: the collector

        modes = [(f"closed-c{closed_c}", closed_c, None, ""), (f"rate-{rate:g}", 0, rate, "uniform"),
                 (f"poisson-{rate:g}", 0, rate, "poisson")]
        if shutil.which("hey") and not smoke:
            modes.append((f"hey-q-{rate:g}", 8, rate, "hey"))
        for mode, conc, r, arrivals in modes:
            ok, errors, rps, p50, p99, tool = _load(direct.url + "/v1/completions", seconds, conc, r, arrivals)
            results.append(RunResult("direct", mode, "-", ok, errors, seconds, round(rps, 1), round(p50, 3),
                                     round(p99, 3), tool=tool))
            for key, epp, envoys in stacks:
                core = key.removesuffix("-precise")
                for name, envoy in envoys.items():
                    c0, t0 = epp.process.cpu_seconds(), time.perf_counter()
                    ok, errors, rps, p50, p99, tool = _load(envoy.url + "/v1/completions", seconds, conc, r, arrivals)
                    elapsed = time.perf_counter() - t0
                    cpu = epp.process.cpu_seconds() - c0 - idle[key] * elapsed
                    results.append(RunResult(name, mode, core, ok, errors, round(elapsed, 2), round(rps, 1),
                                             round(p50, 3), round(p99, 3),
                                             round(max(0.0, cpu) / ok * 1e6, 1) if ok else None, tool=tool))
        for res in results:
            base = next(x for x in results if x.mode == res.mode and x.config == "direct")
            if res.config != "direct":
                res.added_p99_ms = round(res.p99_ms - base.p99_ms, 3)
        idle_rate = max(idle.values())
    # Why the fixed-rate rows cost more EPP CPU than the closed loop: the same path, in-process.
    idle_penalty = measure_idle_penalty(200 if smoke else 2000)

    data = {
        "benchmark": "overhead",
        "smoke": smoke,
        "seconds_per_run": seconds,
        "fixed_rate": rate,
        "closed_loop_concurrency": closed_c,
        "epp_idle_cpu_fraction": round(idle_rate, 4),
        "cores": list(cores),
        "load_average_at_end": os.getloadavg()[0],
        "machine": machine_info(),
        "results": [asdict(r) for r in results],
        "idle_penalty": idle_penalty,
        "targets": {"duplex_epp_cpu_us_per_req": 250, "added_p99_ms_at_500rps": 2.0},
    }
    write_json(out_dir / "overhead.json", data)
    rows = [(r.config, r.core, r.mode, r.rps, r.p50_ms, r.p99_ms, "-" if r.added_p99_ms is None else r.added_p99_ms,
             "-" if r.epp_cpu_us_per_req is None else r.epp_cpu_us_per_req, r.errors, r.tool) for r in results]
    md = ["# EPP overhead through Envoy", "",
          f"Trivial backend; {seconds:g}s per run; closed loop at concurrency {closed_c}; open loop at {rate:g} req/s "
          f"with evenly spaced (`rate-`) and Poisson (`poisson-`) arrivals, latency from send to response end "
          f"(`epp.bench.pacedload`); `hey-q-` rows: `hey -c 8 -q {rate / 8:g}`, whose aligned worker tickers send "
          f"bursts of 8 requests every {8 / rate * 1e3:g} ms (burst queueing, shown for comparison). "
          f"EPP CPU is user+system time of the EPP process per request, minus its idle rate "
          f"(up to {idle_rate * 100:.1f}% of a core: the collector scraping the backend). Cores: `fast` is our "
          f"HTTP/2 server (default), `grpcio` grpcio's asyncio server (EPP_EXTPROC_CORE=grpcio). "
          f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work on the "
          f"machine inflates latencies).", "",
          markdown_table(["config", "core", "mode", "req/s", "p50 ms", "p99 ms", "added p99 ms", "EPP CPU us/req", "errors",
                          "tool"], rows), "", idle_markdown(idle_penalty)]
    (out_dir / "overhead.md").write_text("\n".join(md))
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="EPP overhead benchmark (or its trivial backend)")
    ap.add_argument("--backend", type=int, metavar="PORT", help="run the trivial backend on PORT")
    ap.add_argument("--out", default="bench-out/overhead")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--cores", default="", help="comma-separated: fast,grpcio")
    args = ap.parse_args(argv)
    if args.backend:
        _backend_main(args.backend)
        return 0
    cores = tuple(c for c in args.cores.split(",") if c) or None
    data = run_overhead_bench(Path(args.out), smoke=args.smoke, cores=cores)
    print((Path(args.out) / "overhead.md").read_text())
    return 0 if data["results"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``epp bench collector``: what scraping the pool costs, and where the collector should run.

Setup: ``endpoints`` model-server stand-ins serve a realistic vLLM page (~59 KB, 600
lines, rendered by prometheus_client with vLLM's families and buckets) from a SEPARATE
process (minimal HTTP/1.1 keep-alive servers, so their CPU is not counted). The collector
under test is the EPP's default data layer (``metrics-data-source`` +
``core-metrics-extractor`` from the built-in config), every ``interval``, for ``duration``.

Measured:
1. parser CPU per page: selective (what the default extractor asks for) vs full parse vs
   prometheus_client's parser;
2. per collector mode (``inprocess`` on this loop, ``process`` in a child process):
   achieved scrapes/s counted by the servers vs the ideal ``endpoints / interval``, CPU
   (process CPU time; for the process mode the child's plus what applying updates costs
   here), and the staleness (``now - update_time``) of every endpoint sampled every 10 ms;
3. the request-path cost of sharing the loop: a gRPC bidi-stream server shaped like
   ext_proc (3 round trips per stream, a pick over the pool's snapshots on the body) in
   its own process, driven at a fixed rate from here, with no collector, the collector on
   its loop, and the collector in a child process; p50/p99 stream latency each.

Writes ``result.json`` and ``summary.md`` into ``out_dir``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence

from epp.bench.metric_pages import EngineState, vllm_page

IDEAL_FRACTION_TARGET = 0.95
STALENESS_P99_TARGET = 0.150
CPU_TARGET = 0.5
LATENCY_TARGET = 0.10  # p99 may grow at most 10 % with the collector on the serving loop

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _pct(values: Sequence[float], q: float) -> float:
    from epp.bench.report import percentile

    return percentile(values, q)


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of another process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


# -- page servers (separate process) ------------------------------------------------------------

def _page_server_main(n: int, page: bytes, counts: Any, conn: Any) -> None:
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    run(_serve_pages(n, page, counts, conn))


async def _serve_pages(n: int, page: bytes, counts: Any, conn: Any) -> None:
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                b"Content-Length: %d\r\n\r\n" % len(page)) + page

    class Page(asyncio.Protocol):
        def __init__(self, index: int) -> None:
            self.index = index
            self.buf = b""

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.buf = self.buf[end + 4:]
                counts[self.index] += 1  # a GET has no body
                self.transport.write(response)

    loop = asyncio.get_running_loop()
    ports = []
    for i in range(n):
        server = await loop.create_server(lambda i=i: Page(i), "127.0.0.1", 0, backlog=256)
        ports.append(server.sockets[0].getsockname()[1])
    conn.send(ports)
    await loop.run_in_executor(None, conn.recv)  # anything (or EOF) = stop


class PageServers:
    """``n`` vLLM page servers in a child process; ``counts()`` = GETs served per server."""

    def __init__(self, n: int, page: bytes) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._counts = ctx.Array("Q", n, lock=False)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_page_server_main, args=(n, page, self._counts, child), daemon=True,
                                 name="bench-page-servers")
        self._proc.start()
        child.close()
        self.ports: list[int] = self._conn.recv()

    def counts(self) -> list[int]:
        return list(self._counts)

    def stop(self) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2)


# -- parser cost ------------------------------------------------------------------------------

def measure_parser(page: bytes, iterations: int) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    from epp.datalayer.promparse import families_wanted_by, parse
    from plugins.datalayer.core_metrics import CoreMetricsExtractor

    wanted = families_wanted_by([CoreMetricsExtractor()])
    text = page.decode()

    def cpu_per_call(fn: Any, n: int) -> float:
        fn()
        t0 = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t0) / n

    return {
        "page_bytes": len(page),
        "page_lines": page.count(b"\n"),
        "families_on_page": len(parse(page)),
        "families_wanted_by_core_extractor": len(wanted or ()),
        "selective_parse_ms": cpu_per_call(lambda: parse(page, wanted), iterations * 10) * 1e3,
        "full_parse_ms": cpu_per_call(lambda: parse(page), iterations) * 1e3,
        "prometheus_client_parse_ms": cpu_per_call(lambda: list(text_string_to_metric_families(text)),
                                                   max(3, iterations // 5)) * 1e3,
    }


# -- collector runs -----------------------------------------------------------------------------

def _default_wirings() -> list[Any]:
    from epp.config import load_config

    return list(load_config().sources)  # the built-in config: metrics-data-source + core-metrics-extractor


async def measure_collector(mode: str, servers: PageServers, *, interval: float, duration: float,
                            warmup: float) -> dict[str, Any]:
    from epp.datalayer.endpoint import EndpointMetadata, now
    from epp.datalayer.pool import EndpointPool
    from epp.datalayer.process import make_collector

    pool = EndpointPool("bench")
    pool.sync(EndpointMetadata("127.0.0.1", p, labels={"llm-d.ai/engine-type": "vllm"}) for p in servers.ports)
    wirings = _default_wirings()
    collector = make_collector(mode, pool, wirings, interval=interval, timeout=1.0, unreachable_after=5.0)
    await collector.start()
    try:
        await asyncio.sleep(warmup)
        child = getattr(collector, "child_pid", None)
        c0 = sum(servers.counts())
        cpu0, child0, t0 = time.process_time(), _proc_cpu(child) if child else 0.0, time.monotonic()
        staleness: list[float] = []
        never = 0
        eps = pool.endpoints()
        while time.monotonic() - t0 < duration:
            await asyncio.sleep(0.01)
            t = now()
            for ep in eps:
                ut = ep.metrics.update_time
                if ut:
                    staleness.append(t - ut)
                else:
                    never += 1
        elapsed = time.monotonic() - t0
        here = time.process_time() - cpu0
        in_child = (_proc_cpu(child) - child0) if child else 0.0
        scrapes = sum(servers.counts()) - c0
    finally:
        await collector.stop()
        for w in wirings:
            await w.source.close()
    ideal = len(servers.ports) / interval
    return {
        "mode": mode,
        "endpoints": len(servers.ports),
        "interval_s": interval,
        "duration_s": elapsed,
        "scrapes_per_s": scrapes / elapsed,
        "ideal_scrapes_per_s": ideal,
        "fraction_of_ideal": scrapes / elapsed / ideal,
        "cpu_cores_total": (here + in_child) / elapsed,
        "cpu_cores_serving_process": here / elapsed,
        "cpu_cores_collector_process": in_child / elapsed if child else None,
        "cpu_ms_per_scrape": (here + in_child) / max(scrapes, 1) * 1e3,
        "staleness_p50_ms": _pct(staleness, 50) * 1e3,
        "staleness_p99_ms": _pct(staleness, 99) * 1e3,
        "staleness_max_ms": max(staleness) * 1e3 if staleness else float("nan"),
        "staleness_samples": len(staleness),
        "samples_without_data": never,
    }


# -- request-path latency with and without the collector on the serving loop -----------------------

_METHOD = "/epp.bench.ExtProcLike/Process"


def _standin_main(conn: Any, ports: list[int], interval: float) -> None:
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    run(_standin(conn, ports, interval))


async def _standin(conn: Any, ports: list[int], interval: float) -> None:
    """An ext_proc-shaped gRPC server whose collector placement the harness switches."""
    import grpc

    from epp.datalayer.endpoint import EndpointMetadata
    from epp.datalayer.pool import EndpointPool
    from epp.datalayer.process import make_collector

    pool = EndpointPool("bench")
    pool.sync(EndpointMetadata("127.0.0.1", p, labels={"llm-d.ai/engine-type": "vllm"}) for p in ports)
    rng = random.Random(1)

    def pick() -> str:
        # What a scheduling cycle does with the data layer: read every snapshot, score, pick.
        best, best_score = "", -1.0
        for ep in pool.schedulable():
            m = ep.metrics
            score = 2.0 / (1.0 + m.waiting_queue_size) + 2.0 * (1.0 - m.kv_cache_usage) + rng.random() * 1e-6
            if score > best_score:
                best, best_score = ep.key, score
        return best

    async def process(requests: Any, context: Any) -> Any:
        async for msg in requests:
            if msg[:1] == b"B":
                yield pick().encode()
            else:
                yield msg[:8]

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "epp.bench.ExtProcLike", {"Process": grpc.stream_stream_rpc_method_handler(process)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    conn.send(port)
    collector: Any = None
    wirings: list[Any] = []
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if collector is not None:
            await collector.stop()
            for w in wirings:
                await w.source.close()
            collector = None
        if cmd == "stop":
            break
        if cmd in ("inprocess", "process"):
            wirings = _default_wirings()
            collector = make_collector(cmd, pool, wirings, interval=interval)
            await collector.start()
            await asyncio.sleep(1.0)  # let the loops reach steady state
        conn.send(os.getpid())
    await server.stop(0.5)


async def _drive(port: int, rate: float, seconds: float) -> list[float]:
    """Open-loop load: ``rate`` streams/s, each 3 round trips; returns stream latencies (s)."""
    import grpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.stream_stream(_METHOD)

        async def one() -> None:
            t = time.perf_counter()
            call = method()
            for msg in (b"H" * 600, b"B" * 2000, b"R" * 300):
                await call.write(msg)
                await call.read()
            await call.done_writing()
            await call.code()
            latencies.append(time.perf_counter() - t)

        for _ in range(20):
            await one()  # warm the channel
        latencies.clear()
        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks, return_exceptions=True)
    return latencies


async def measure_latency(ports: list[int], *, interval: float, rate: float, seconds: float,
                          rounds: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    # Not a daemon: it starts the collector process of the "process" placement itself.
    proc = ctx.Process(target=_standin_main, args=(child, ports, interval), daemon=False,
                       name="bench-extproc-standin")
    proc.start()
    child.close()
    loop = asyncio.get_running_loop()
    try:
        port = await loop.run_in_executor(None, conn.recv)
        samples: dict[str, list[float]] = {"none": [], "inprocess": [], "process": []}
        cpu: dict[str, list[float]] = {k: [] for k in samples}
        # Interleave the placements over several rounds so drift on a shared machine hits all alike.
        for _ in range(rounds):
            for mode in samples:
                conn.send(mode)
                await loop.run_in_executor(None, conn.recv)
                c0, t0 = _proc_cpu(proc.pid), time.monotonic()
                samples[mode] += await _drive(port, rate, seconds)
                cpu[mode].append((_proc_cpu(proc.pid) - c0) / (time.monotonic() - t0))
        conn.send("stop")
        await loop.run_in_executor(None, proc.join, 10)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(2)
    base = _pct(samples["none"], 99)
    out: dict[str, Any] = {"endpoints": len(ports), "rate_streams_per_s": rate, "seconds_per_round": seconds,
                           "rounds": rounds}
    for mode, lat in samples.items():
        p99 = _pct(lat, 99)
        out[mode] = {
            "streams": len(lat),
            "p50_ms": _pct(lat, 50) * 1e3,
            "p90_ms": _pct(lat, 90) * 1e3,
            "p99_ms": p99 * 1e3,
            "p99_increase": p99 / base - 1 if base else float("nan"),
            "serving_process_cpu_cores": sum(cpu[mode]) / len(cpu[mode]) if cpu[mode] else float("nan"),
        }
    return out


# -- entry point ------------------------------------------------------------------------------

async def run_collector_bench(out_dir: Path, *, endpoints: int = 64, interval: float = 0.05,
                              duration: float = 30.0, smoke: bool = False) -> dict[str, Any]:
    """Run everything; write ``result.json`` and ``summary.md`` into ``out_dir``; return the result."""
    from epp.bench.report import machine_info, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if smoke:
        endpoints, duration = min(endpoints, 4), min(duration, 1.0)
    warmup = 0.3 if smoke else 3.0
    page = vllm_page(EngineState())
    result: dict[str, Any] = {
        "benchmark": "collector",
        "smoke": smoke,
        "machine": machine_info(),
        "parser": measure_parser(page, 5 if smoke else 200),
        "targets": {"fraction_of_ideal": IDEAL_FRACTION_TARGET, "staleness_p99_ms": STALENESS_P99_TARGET * 1e3,
                    "cpu_cores": CPU_TARGET, "p99_latency_increase": LATENCY_TARGET},
    }
    servers = await asyncio.get_running_loop().run_in_executor(None, PageServers, endpoints, page)
    try:
        result["collector"] = {}
        for mode in ("inprocess", "process"):
            result["collector"][mode] = await measure_collector(mode, servers, interval=interval,
                                                                duration=duration, warmup=warmup)
        # Full size (CPU is tight on small machines, so processes also compete for cores), and a
        # quarter of the pool (CPU to spare: what remains is the cost of sharing the loop).
        result["latency"] = []
        sizes = [endpoints] if smoke else sorted({endpoints, max(1, endpoints // 4)}, reverse=True)
        for n in sizes:
            result["latency"].append(await measure_latency(
                servers.ports[:n], interval=interval,
                rate=50.0 if smoke else 200.0,
                seconds=0.5 if smoke else max(2.0, duration / 3),
                rounds=1 if smoke else 3,
            ))
    finally:
        servers.stop()
    result["verdict"] = _verdict(result)
    write_json(out_dir / "result.json", result)
    (out_dir / "summary.md").write_text(render_summary(result))
    return result


def _verdict(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, c in r["collector"].items():
        out[mode] = {
            "scrapes_ok": c["fraction_of_ideal"] >= IDEAL_FRACTION_TARGET,
            "staleness_ok": c["staleness_p99_ms"] < STALENESS_P99_TARGET * 1e3,
            "cpu_ok": c["cpu_cores_total"] < CPU_TARGET,
        }
    incs = [run["inprocess"]["p99_increase"] for run in r["latency"]]
    out["inprocess_p99_increase"] = {str(run["endpoints"]): i for run, i in zip(r["latency"], incs)}
    out["process_p99_increase"] = {str(run["endpoints"]): run["process"]["p99_increase"] for run in r["latency"]}
    out["collector_may_share_the_serving_loop"] = all(i == i and i <= LATENCY_TARGET for i in incs)
    out["recommended_mode"] = "inprocess" if out["collector_may_share_the_serving_loop"] else "process"
    return out


def render_summary(r: dict[str, Any]) -> str:
    from epp.bench.report import fmt, machine_markdown, markdown_table

    p = r["parser"]
    lines = [
        "## Collector: scraping cost and placement" + (" (smoke run: numbers mean nothing)" if r["smoke"] else ""),
        "",
        machine_markdown(r["machine"]),
        "",
        f"### Parsing one vLLM page ({p['page_bytes'] / 1024:.1f} KiB, {p['page_lines']} lines, "
        f"{p['families_on_page']} families)",
        "",
        markdown_table(["parser", "CPU per page (ms)"], [
            [f"selective (the {p['families_wanted_by_core_extractor']} families core-metrics-extractor reads)",
             p["selective_parse_ms"]],
            ["full parse (ours)", p["full_parse_ms"]],
            ["prometheus_client text parser", p["prometheus_client_parse_ms"]],
        ]),
        "",
    ]
    any_c = next(iter(r["collector"].values()))
    lines += [
        f"### Scraping {any_c['endpoints']} endpoints every {any_c['interval_s'] * 1e3:g} ms "
        f"for {any_c['duration_s']:.0f} s (ideal {any_c['ideal_scrapes_per_s']:g} scrapes/s)",
        "",
        markdown_table(
            ["collector mode", "scrapes/s", "% of ideal", "CPU (cores)", "of which serving process",
             "CPU per scrape (ms)", "staleness p50 (ms)", "p99 (ms)", "max (ms)"],
            [[m, c["scrapes_per_s"], f"{c['fraction_of_ideal'] * 100:.1f} %", c["cpu_cores_total"],
              c["cpu_cores_serving_process"], c["cpu_ms_per_scrape"], c["staleness_p50_ms"], c["staleness_p99_ms"],
              c["staleness_max_ms"]] for m, c in r["collector"].items()],
        ),
        "",
        f"Targets: >= {IDEAL_FRACTION_TARGET * 100:g} % of ideal scrapes, staleness p99 < "
        f"{STALENESS_P99_TARGET * 1e3:g} ms, < {CPU_TARGET:g} core.",
        "",
    ]
    for lat in r["latency"]:
        lines += [
            f"### Request path: ext_proc-shaped gRPC streams at {lat['rate_streams_per_s']:g}/s, "
            f"collector scraping {lat['endpoints']} endpoints ({lat['rounds']} interleaved rounds of "
            f"{lat['seconds_per_round']:g} s per placement)",
            "",
            markdown_table(
                ["collector placement", "streams", "p50 (ms)", "p90 (ms)", "p99 (ms)", "p99 vs none",
                 "serving process CPU (cores)"],
                [[mode, lat[mode]["streams"], lat[mode]["p50_ms"], lat[mode]["p90_ms"], lat[mode]["p99_ms"],
                  f"{lat[mode]['p99_increase'] * 100:+.0f} %" if mode != "none" else "–",
                  lat[mode]["serving_process_cpu_cores"]] for mode in ("none", "inprocess", "process")],
            ),
            "",
        ]
    v = r["verdict"]
    incs = ", ".join(f"{fmt(i * 100, 3)} % at {n} endpoints" for n, i in v["inprocess_p99_increase"].items())
    lines += [
        f"Collector on the serving loop costs the request path {incs} of p99 (limit {LATENCY_TARGET * 100:g} %): "
        + ("it may share the loop." if v["collector_may_share_the_serving_loop"]
           else "it must run in its own process.")
        + f" Recommended `--collector-mode`: **{v['recommended_mode']}**.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - manual runs
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/collector")
    ap.add_argument("--endpoints", type=int, default=64)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    r = asyncio.run(run_collector_bench(Path(a.out), endpoints=a.endpoints, interval=a.interval,
                                        duration=a.duration, smoke=a.smoke))
    print(render_summary(r))


if __name__ == "__main__":  # pragma: no cover
    main()

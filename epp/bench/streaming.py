"""`epp bench streaming`: EPP CPU per streamed (SSE) answer, by Envoy mode and answer length.

One backend process streams OpenAI-style SSE answers of N events (``delay`` apart, so Envoy
forwards each event as its own body chunk, as a model server streaming tokens does), then a
usage event and ``[DONE]``; ``N = 0`` is a plain JSON answer (the non-streaming cost). The
same EPP sits behind three Envoys:

- ``duplex``: ``envoy/envoy.yaml`` (FULL_DUPLEX_STREAMED both ways, the upstream shape: every
  response chunk crosses the EPP);
- ``efficient``: ``envoy/envoy-efficient.yaml`` (BUFFERED request, STREAMED response with
  ``allow_mode_override``; the EPP drops SSE bodies at the response headers, policy
  ``non-streaming``);
- ``buffered``: ``envoy/envoy-buffered.yaml`` (response body NONE: the reference floor; the
  EPP's stream still lasts until the response ends, but it never sees a response body);

and, in a full run, a second EPP with ``--response-body-policy always`` behind the efficient
config (what reading every streamed body costs in STREAMED mode).

EPP CPU is the CPU time of the EPP's main process (``/proc/<pid>/task/*/schedstat``; the metrics
collector runs in its own process and is not counted) over a cell, minus the process's idle
rate, divided by the requests. It is CPU time, not wall time, so other work on the machine
matters less; each cell is still repeated and the median reported. Envoy's own ext_proc
counters give the messages per request.

    run_streaming_bench(Path("bench-out/streaming"), smoke=True)  -> dict, plus streaming.json/.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from epp.bench.backend import serve_backend, start_backend
from epp.bench.procs import ProcessGroup

MODEL = "bench-model"
DELAY = 0.002  # between events: Envoy then forwards each event as its own chunk
TARGETS = {"duplex_ms_per_256_chunks": 8.0, "efficient_ms_per_request": 1.0}

# (row name, Envoy template, which EPP)
CONFIGS = (("duplex", "envoy.yaml", "main"), ("efficient", "envoy-efficient.yaml", "main"),
           ("buffered", "envoy-buffered.yaml", "main"), ("efficient-always", "envoy-efficient.yaml", "always"))


@dataclass
class Settings:
    lengths: tuple[int, ...] = (0, 16, 256, 1024)
    configs: tuple[str, ...] = ("duplex", "efficient", "buffered", "efficient-always")
    concurrency: int = 4
    repeats: int = 3
    # requests per cell: enough chunks that a cell is ~1-2 s of streaming
    min_requests: int = 12
    chunk_budget: int = 8192
    nonstream_requests: int = 200
    idle_window: float = 2.0

    def requests_for(self, length: int) -> int:
        if length == 0:
            return self.nonstream_requests
        return max(self.min_requests, self.chunk_budget // length)


def smoke_settings() -> Settings:
    return Settings(lengths=(0, 16, 256), configs=("duplex", "efficient"), repeats=1, min_requests=4,
                    chunk_budget=512, nonstream_requests=40, idle_window=0.5)


@dataclass
class Cell:
    config: str
    chunks: int  # SSE events per answer; 0 = non-streamed JSON
    requests: int
    errors: int
    epp_cpu_ms_per_req: float  # median over repeats
    epp_cpu_ms_runs: list[float] = field(default_factory=list)
    us_per_chunk: float | None = None  # (streamed cost - non-streamed cost) / chunks
    extproc_msgs_per_req: float | None = None  # Envoy -> EPP and back, per request
    wall_s: float = 0.0


# --- the backend ------------------------------------------------------------------------------
METRICS_PAGE = b"""# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="bench-model"} 0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="bench-model"} 0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="bench-model"} 0.0
"""


def _backend_main(port: int) -> None:
    from aiohttp import web

    usage = {"prompt_tokens": 40, "completion_tokens": 0, "total_tokens": 40}

    async def post(request: web.Request) -> web.StreamResponse:
        doc = json.loads(await request.read() or b"{}")
        n = int(doc.get("max_tokens", 0))
        if not doc.get("stream"):
            answer = {"id": "cmpl-1", "object": "text_completion", "model": doc.get("model", MODEL),
                      "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                      "usage": dict(usage, completion_tokens=1, total_tokens=41)}
            return web.json_response(answer)
        delay = float(doc.get("delay", DELAY))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        model = json.dumps(doc.get("model", MODEL))
        for i in range(n):
            # An OpenAI chat.completion.chunk of one token, ~200 bytes like vLLM's.
            event = ('data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
                     f'"model":{model},"choices":[{{"index":0,"delta":{{"content":"tok{i} "}},'
                     '"logprobs":null,"finish_reason":null}]}\n\n')
            await resp.write(event.encode())
            if delay:
                await asyncio.sleep(delay)
        final = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": doc.get("model", MODEL),
                 "choices": [], "usage": dict(usage, completion_tokens=n, total_tokens=40 + n)}
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    serve_backend("streaming", port, post, METRICS_PAGE)


# --- measuring ------------------------------------------------------------------------------
def process_cpu_seconds(pid: int) -> float:
    """CPU time of one process (all its threads): the scheduler's nanosecond run time from
    /proc/<pid>/task/*/schedstat, else user+system clock ticks from /proc/<pid>/stat (10 ms
    resolution: too coarse for sub-millisecond costs over a few requests)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # a thread that just exited
        if total:
            return total / 1e9
    except OSError:
        pass
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_body(chunks: int) -> bytes:
    doc: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
                           "max_tokens": chunks}
    if chunks:
        doc["stream"] = True
        doc["delay"] = DELAY
    return json.dumps(doc).encode()


async def _drive(url: str, chunks: int, requests: int, concurrency: int) -> tuple[int, int]:
    """Send ``requests`` requests, ``concurrency`` at a time; returns (complete, errors).

    A streamed answer counts as complete only with all its events, in order, and ``[DONE]``.
    """
    import aiohttp

    body = request_body(chunks)
    headers = {"content-type": "application/json"}
    ok = errors = 0
    queue = list(range(requests))

    async def one(session: aiohttp.ClientSession) -> bool:
        async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
            if r.status != 200:
                await r.read()
                return False
            if not chunks:
                return b'"usage"' in await r.read()
            seen = 0
            done = False
            async for line in r.content:
                if line.startswith(b"data: {") and b'"delta"' in line:
                    if f'"tok{seen} "'.encode() not in line:
                        return False
                    seen += 1
                elif line.startswith(b"data: [DONE]"):
                    done = True
            return done and seen == chunks

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok, errors
        while queue:
            queue.pop()
            try:
                good = await one(session)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                good = False
            if good:
                ok += 1
            else:
                errors += 1

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency * 2)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return ok, errors


def _extproc_messages(admin_port: int) -> float:
    """Envoy's ext_proc message counters (sent + received), summed."""
    url = f"http://127.0.0.1:{admin_port}/stats?filter=ext_proc.*stream_msgs&format=json"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            stats = json.loads(r.read()).get("stats", [])
    except (OSError, ValueError):
        return float("nan")
    return float(sum(s.get("value", 0) for s in stats if "stream_msgs" in s.get("name", "")))


def _idle_rate(pid: int, seconds: float) -> float:
    c0 = process_cpu_seconds(pid)
    time.sleep(seconds)
    return (process_cpu_seconds(pid) - c0) / seconds


# --- the benchmark ------------------------------------------------------------------------------
def run_streaming_bench(out_dir: Path, *, smoke: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    from epp.bench.report import machine_info, markdown_table, write_json
    from epp.bench.stacks import start_envoy_template, start_epp

    s = settings or (smoke_settings() if smoke else Settings())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = [c for c in CONFIGS if c[0] in s.configs]
    cells: list[Cell] = []
    with ProcessGroup(out_dir / "logs") as group:
        address = start_backend(group, "epp.bench.streaming", "streaming")
        epps = {"main": start_epp(group, [address], name="epp",
                                  extra=["--response-body-policy", "non-streaming"])}
        if any(which == "always" for _, _, which in wanted):
            epps["always"] = start_epp(group, [address], name="epp-always", extra=["--response-body-policy", "always"])
        envoys = {name: start_envoy_template(group, template, backends=[address], epp_port=epps[which].grpc_port,
                                             name=f"envoy-{name}")
                  for name, template, which in wanted}
        # Warm up every path (connections, HPACK tables, caches).
        for name in envoys:
            asyncio.run(_drive(envoys[name].url, 0, 20, s.concurrency))
            asyncio.run(_drive(envoys[name].url, 16, 4, s.concurrency))
        idle = {which: _idle_rate(epp.process.pid, s.idle_window) for which, epp in epps.items()}

        # Repeats go round every cell in turn, so a change in the machine's load (other work on
        # a shared machine) spreads over all cells instead of skewing one.
        runs: dict[tuple[str, int], list[float]] = {}
        msgs: dict[tuple[str, int], list[float]] = {}
        errors: dict[tuple[str, int], int] = {}
        wall: dict[tuple[str, int], float] = {}
        for _ in range(s.repeats):
            for name, _template, which in wanted:
                pid = epps[which].process.pid
                envoy = envoys[name]
                for length in s.lengths:
                    key = (name, length)
                    m0 = _extproc_messages(envoy.admin_port)
                    c0, t0 = process_cpu_seconds(pid), time.perf_counter()
                    ok, err = asyncio.run(_drive(envoy.url, length, s.requests_for(length), s.concurrency))
                    elapsed = time.perf_counter() - t0
                    cpu = process_cpu_seconds(pid) - c0 - idle[which] * elapsed
                    errors[key] = errors.get(key, 0) + err
                    wall[key] = wall.get(key, 0.0) + elapsed
                    if ok:
                        runs.setdefault(key, []).append(max(0.0, cpu) / ok * 1e3)
                        msgs.setdefault(key, []).append((_extproc_messages(envoy.admin_port) - m0) / (ok + err))
        for name, _template, _which in wanted:
            for length in s.lengths:
                key = (name, length)
                r, mm = runs.get(key, []), msgs.get(key, [])
                cells.append(Cell(name, length, s.requests_for(length) * s.repeats, errors.get(key, 0),
                                  round(statistics.median(r), 3) if r else float("nan"), [round(x, 3) for x in r],
                                  None, round(statistics.median(mm), 1) if mm else None, round(wall.get(key, 0.0), 2)))
    for c in cells:
        base = next((b for b in cells if b.config == c.config and b.chunks == 0), None)
        if c.chunks and base is not None:
            c.us_per_chunk = round((c.epp_cpu_ms_per_req - base.epp_cpu_ms_per_req) * 1e3 / c.chunks, 2)

    def cost(config: str, chunks: int) -> float | None:
        hit = next((c for c in cells if c.config == config and c.chunks == chunks), None)
        return hit.epp_cpu_ms_per_req if hit else None

    efficient = [c.epp_cpu_ms_per_req for c in cells if c.config == "efficient"]
    met = {
        "duplex_ms_per_256_chunks": cost("duplex", 256),
        "efficient_max_ms_per_request": max(efficient) if efficient else None,
    }
    data = {
        "benchmark": "streaming",
        "smoke": smoke,
        "settings": asdict(s),
        "event_delay_s": DELAY,
        "epp_idle_cpu_fraction": {k: round(v, 4) for k, v in idle.items()},
        "load_average_at_end": os.getloadavg()[0],
        "machine": machine_info(),
        "cells": [asdict(c) for c in cells],
        "targets": TARGETS,
        "measured": met,
    }
    write_json(out_dir / "streaming.json", data)
    (out_dir / "streaming.md").write_text(_markdown(data, cells, s, markdown_table))
    return data


def _markdown(data: dict[str, Any], cells: list[Cell], s: Settings, markdown_table: Any) -> str:
    rows = [(c.config, "JSON" if c.chunks == 0 else c.chunks, c.epp_cpu_ms_per_req,
             "-" if c.us_per_chunk is None else c.us_per_chunk,
             "-" if c.extproc_msgs_per_req is None else c.extproc_msgs_per_req,
             " / ".join(f"{r:g}" for r in c.epp_cpu_ms_runs), c.requests, c.errors) for c in cells]
    met = data["measured"]
    lines = [
        "# EPP CPU per streamed answer", "",
        f"SSE answers of N events {DELAY * 1e3:g} ms apart (one Envoy body chunk each) plus a usage event, "
        f"or a JSON answer; {s.concurrency} concurrent requests; each cell repeated {s.repeats}x, median shown. "
        "EPP CPU = CPU time (schedstat) of the EPP's main process per request, minus its idle rate "
        f"({', '.join(f'{k}: {v * 100:.1f}% of a core' for k, v in data['epp_idle_cpu_fraction'].items())}). "
        f"Load average at the end: {data['load_average_at_end']:.1f} on {os.cpu_count()} CPUs.", "",
        "Configs: `duplex` = envoy.yaml (FULL_DUPLEX_STREAMED both ways); `efficient` = envoy-efficient.yaml "
        "(request BUFFERED, response STREAMED + mode_override NONE for SSE, policy `non-streaming`); `buffered` = "
        "envoy-buffered.yaml (response body NONE: no response body ever reaches the EPP); `efficient-always` = "
        "envoy-efficient.yaml with `--response-body-policy always` (every chunk read).", "",
        markdown_table(["config", "chunks", "EPP CPU ms/req", "us/chunk over JSON", "ext_proc msgs/req",
                        "runs (ms/req)", "requests", "errors"], rows), "",
        f"Targets: duplex <= {TARGETS['duplex_ms_per_256_chunks']:g} ms per 256-chunk answer "
        f"(measured: {met['duplex_ms_per_256_chunks']}); efficient <= {TARGETS['efficient_ms_per_request']:g} ms "
        f"per request at any length (measured max: {met['efficient_max_ms_per_request']}).", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="EPP streaming-cost benchmark (or its SSE backend)")
    ap.add_argument("--backend", type=int, metavar="PORT", help="run the SSE backend on PORT")
    ap.add_argument("--out", default="bench-out/streaming")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--configs", default="", help="comma-separated subset of " + ",".join(c[0] for c in CONFIGS))
    ap.add_argument("--lengths", default="", help="comma-separated chunk counts (0 = JSON)")
    ap.add_argument("--repeats", type=int, default=0)
    args = ap.parse_args(argv)
    if args.backend:
        _backend_main(args.backend)
        return 0
    s = smoke_settings() if args.smoke else Settings()
    if args.configs:
        s.configs = tuple(c for c in args.configs.split(",") if c)
    if args.lengths:
        s.lengths = tuple(int(x) for x in args.lengths.split(",") if x)
    if args.repeats:
        s.repeats = args.repeats
    data = run_streaming_bench(Path(args.out), smoke=args.smoke, settings=s)
    print((Path(args.out) / "streaming.md").read_text())
    return 0 if data["cells"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``epp bench flowcontrol``: what a parked request costs, and how fast the queue drains.

In-process, through the real ext_proc stream state machine (``ExtProcStream``) and the real
Director with flow control on (concurrency-detector, 8 endpoints x 4 slots): the slots are
filled, then N more requests arrive and park (each holds its stream, its routing coroutine,
its queue entry). Measured:

- memory per parked request (tracemalloc, Python allocations; in a second run, since tracing
  slows allocation) and the process RSS growth;
- CPU per request to arrive and park, against routing the same request with flow control off
  and with flow control on but capacity free (the fast path);
- draining: each finished request frees a slot, the controller releases the next, its stream
  resumes and answers; CPU per release and releases per second.

The HTTP/2 stream state of the transport (a few hundred bytes per stream in
``epp/extproc/fastserver.py``) is not included.
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import time
import tracemalloc
from pathlib import Path
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.bench import report
from epp.config import load_config
from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.pool import EndpointPool
from epp.extproc import messages as msg
from epp.extproc.stream import ExtProcStream, StreamSettings
from epp.requestcontrol.director import Director, DirectorOptions

ENDPOINTS = 8
SLOTS = 4  # concurrency-detector maxConcurrency per endpoint

GATE_ON = f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- {{name: slots, type: concurrency-detector, parameters: {{maxConcurrency: {SLOTS}}}}}
- type: queue-scorer
- type: max-score-picker
flowControl:
  saturationDetector: {{pluginRef: slots}}
  defaultRequestTTL: 0s
  defaultPriorityBand: {{maxRequests: 100k, fairnessPolicyRef: round-robin-fairness-policy}}
"""
GATE_OFF = GATE_ON.replace("featureGates: [flowControl]\n", "")


def _messages(i: int) -> tuple[pb.ProcessingRequest, pb.ProcessingRequest]:
    body = json.dumps({"model": "m", "prompt": f"request {i}: " + "hello " * 40, "max_tokens": 16}).encode()
    headers = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=msg_headers({":method": "POST", ":path": "/v1/completions",
                                                            "content-type": "application/json",
                                                            "x-llm-d-inference-fairness-id": f"t{i % 4}"})),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=msg.FULL_DUPLEX, response_body_mode=msg.FULL_DUPLEX))
    return headers, pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))


def msg_headers(values: dict[str, str]) -> Any:
    from envoy.config.core.v3 import base_pb2

    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()])


def _director(config_text: str) -> Director:
    pool = EndpointPool("bench")
    pool.sync([EndpointMetadata(f"10.1.0.{i + 1}", 8000) for i in range(ENDPOINTS)])
    return Director(load_config(config_text), pool, DirectorOptions(pool_name="bench"))


def _route_cost(director: Director, n: int) -> float:
    """CPU µs per request routed without waiting (each completes at once, freeing its slot)."""
    settings = StreamSettings()
    msgs = [_messages(i) for i in range(n)]
    t0 = time.process_time()
    for h, b in msgs:
        s = ExtProcStream(director, settings)
        s.on_message(h)
        out = s.on_message(b)
        assert out and s.ctx is not None, "expected an immediate route"
        s.ctx.complete("complete")
        s.finish()
    return (time.process_time() - t0) / n * 1e6


async def _park_and_drain(n: int, *, trace: bool) -> dict[str, Any]:
    """Park ``n`` requests, then drain them. ``trace``: measure Python allocations (tracemalloc
    slows allocation down, so CPU and RSS come from a run without it)."""
    director = _director(GATE_ON)
    settings = StreamSettings(request_timeout=1e9)
    busy = []
    for i in range(ENDPOINTS * SLOTS):  # fill every slot
        h, b = _messages(-1 - i)
        s = ExtProcStream(director, settings)
        s.on_message(h)
        assert s.on_message(b), "slots should be free"
        busy.append(s)
    msgs = [_messages(i) for i in range(n)]
    released: list[ExtProcStream] = []

    def wake(stream: ExtProcStream) -> None:
        out = stream.resume()
        if out:
            released.append(stream)
        elif stream.parked is not None:
            stream.parked.wake_me(lambda: wake(stream))

    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace:
        tracemalloc.start()
    mem0 = tracemalloc.get_traced_memory()[0]
    t0 = time.process_time()
    parked = []
    for h, b in msgs:
        s = ExtProcStream(director, settings)
        s.on_message(h)
        assert not s.on_message(b) and s.parked is not None, "expected the request to wait"
        s.parked.wake_me(lambda s=s: wake(s))
        parked.append(s)
    park_us = (time.process_time() - t0) / n * 1e6
    mem1 = tracemalloc.get_traced_memory()[0]
    if trace:
        tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queued = director.flow_snapshot()["queued"]  # type: ignore[index]

    # Drain: finishing a request frees its slot; the next is released, resumes and answers,
    # and is itself finished at once (a zero-length response), until the queue is empty.
    loop = asyncio.get_running_loop()
    t0, w0 = time.process_time(), time.perf_counter()
    for s in busy:
        s.ctx.complete("complete")  # type: ignore[union-attr]
        s.finish()
    done = 0
    while done < n:
        await asyncio.sleep(0)
        while released:
            s = released.pop()
            s.ctx.complete("complete")  # type: ignore[union-attr]
            s.finish()
            done += 1
        if time.perf_counter() - w0 > 120:
            raise RuntimeError(f"drain stalled at {done}/{n}")
    drain_cpu, drain_wall = time.process_time() - t0, time.perf_counter() - w0
    del loop
    snap = director.flow_snapshot() or {}
    return {
        "parked": n, "queued_after_parking": queued,
        "bytes_per_parked_request": (mem1 - mem0) / n,
        "rss_growth_kib_per_1000": (rss1 - rss0) / n * 1000,
        "park_cpu_us": park_us,
        "release_cpu_us": drain_cpu / n * 1e6,
        "releases_per_s": n / drain_wall,
        "left_queued": snap.get("queued"), "left_in_flight": sum((snap.get("in_flight") or {}).values()),
        "outcomes": snap.get("outcomes"),
    }


def run_flowcontrol_bench(out_dir: str | Path, smoke: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 500 if smoke else 10_000
    route_n = 300 if smoke else 5000
    result: dict[str, Any] = {"benchmark": "flowcontrol", "smoke": smoke, "machine": report.machine_info()}
    _route_cost(_director(GATE_OFF), 200)  # warm up imports and caches
    result["route_cpu_us_gate_off"] = _route_cost(_director(GATE_OFF), route_n)
    result["route_cpu_us_fast_path"] = _route_cost(_director(GATE_ON), route_n)
    result.update(asyncio.run(_park_and_drain(n, trace=False)))
    result["bytes_per_parked_request"] = asyncio.run(_park_and_drain(n, trace=True))["bytes_per_parked_request"]
    report.write_json(out / "result.json", result)
    write_summary(result, out)
    return result


def write_summary(r: dict[str, Any], out: Path) -> Path:
    lines = [
        "## Flow control: cost of a parked request (`epp bench flowcontrol`)",
        "",
        f"In-process through the real ext_proc stream state machine and Director, flow control on "
        f"(concurrency-detector, {ENDPOINTS} endpoints x {SLOTS} slots, round-robin fairness over 4 tenants): "
        f"the slots are filled, then {r['parked']} requests arrive and wait; then every finished request frees a "
        "slot and the next is released, resumes and answers. The HTTP/2 stream of the transport is not counted.",
        "",
    ]
    if r.get("smoke"):
        lines += ["**Smoke run**: tiny parameters; the numbers mean nothing.", ""]
    lines += [report.markdown_table(["what", "value"], [
        ["routing CPU per request, flow control off", f"{r['route_cpu_us_gate_off']:.0f} µs"],
        ["routing CPU per request, flow control on, capacity free (fast path)", f"{r['route_cpu_us_fast_path']:.0f} µs"],
        ["CPU to arrive and park, per request", f"{r['park_cpu_us']:.0f} µs"],
        ["memory per parked request (Python allocations)", f"{r['bytes_per_parked_request'] / 1024:.2f} KiB"],
        ["RSS growth per 1000 parked requests", f"{r['rss_growth_kib_per_1000'] / 1024:.2f} MiB"],
        ["CPU per release (slot freed -> next request released, resumed, answered)", f"{r['release_cpu_us']:.0f} µs"],
        ["releases per second (one core)", f"{r['releases_per_s']:.0f}"],
        ["left queued / in flight afterwards", f"{r['left_queued']} / {r['left_in_flight']}"],
    ]), ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path

"""`epp bench soak`: a million requests through the real EPP process; its memory must stay flat.

The EPP (``epp serve``, the built-in default config: queue, KV-cache and prefix-cache scorers,
the prefix producer, the unreachable detector) routes among four ``epp sim`` servers it scrapes
every 50 ms. The load is h2load (nghttp2's C client, Debian's ``nghttp2-client``) replaying a
prebuilt ext_proc stream as the body of each gRPC call: request headers and body (full duplex,
the ``envoy.yaml`` shape), then the model server's response headers and a JSON body with token
usage, so every request runs the whole lifecycle (parse, prefix match, schedule, pre-request
hooks, response hooks, completion) and the RPC ends. A Python client would cost as much CPU per
request as the EPP itself on this 2-core machine; h2load leaves the EPP one core.

Requests come in rounds: each round starts ``clients`` h2load processes (new connections),
each replaying its own prompt (a shared system prefix plus a part unique to the round and
client), so the prefix index keeps learning new blocks and connections come and go. Between
rounds, and every ``sample_every`` seconds, the EPP's resident set (``VmRSS`` of its main
process and, apart, of its collector child) is read from /proc. Warm-up is the first
``warmup_fraction`` of the requests; growth is the final RSS minus the RSS at the end of the
warm-up. The EPP's own ``inference_objective_request_total`` must equal the requests sent.

    run_soak_bench(Path("bench-results/soak"), smoke=True)  -> dict, plus result.json/summary.md
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.bench.procs import ProcessGroup
from epp.bench.report import markdown_table, write_json
from epp.bench.stacks import start_epp, start_sim_fleet

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
SYSTEM_PROMPT = "You are a careful assistant. Answer briefly and cite the document you used. " * 8
_H2LOAD_DONE = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                          r"(\d+) errored")


@dataclass(frozen=True)
class SoakSettings:
    requests: int = 1_000_000
    rounds: int = 20
    clients: int = 2  # concurrent h2load processes per round, one connection each
    streams: int = 32  # concurrent streams per connection (h2load -m)
    servers: int = 4
    warmup_fraction: float = 0.1
    sample_every: float = 0.5  # seconds between RSS samples (besides one per round)
    max_growth_mb: float = 10.0  # the target: RSS growth after warm-up below this


def smoke_settings() -> SoakSettings:
    return SoakSettings(requests=2000, rounds=2, clients=2, streams=8, servers=2, warmup_fraction=0.5)


# -- the replayed stream ------------------------------------------------------------------------

def _headers(pairs: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])


def _grpc_frame(msg: pb.ProcessingRequest) -> bytes:
    data = msg.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def stream_body(prompt: str) -> bytes:
    """One ext_proc conversation as a gRPC request body: what Envoy sends for one completion
    in full duplex, answer included (no x-request-id: the EPP makes a fresh one each time)."""
    full_duplex = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
    body = ('{"model": "%s", "prompt": %s, "max_tokens": 16}' % (MODEL, json.dumps(prompt))).encode()
    answer = (b'{"id": "cmpl-1", "object": "text_completion", "model": "' + MODEL.encode()
              + b'", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}], '
              b'"usage": {"prompt_tokens": 180, "completion_tokens": 16, "total_tokens": 196}}')
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_headers({
        ":method": "POST", ":path": "/v1/completions", ":authority": "soak", "content-type": "application/json"})))
    first.protocol_config.request_body_mode = full_duplex
    first.protocol_config.response_body_mode = full_duplex
    return b"".join(_grpc_frame(m) for m in (
        first,
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_headers({
            ":status": "200", "content-type": "application/json"}))),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=answer, end_of_stream=True)),
    ))


def prompt_for(round_no: int, client: int) -> str:
    return f"{SYSTEM_PROMPT}\nDocument {round_no}-{client}: " + " ".join(
        f"fact {round_no * 7919 + client * 104729 + i}" for i in range(60)) + "\nQuestion: what changed?"


# -- memory --------------------------------------------------------------------------------------

def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def children_of(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


class RssSampler:
    """Samples the RSS of the EPP's main process and of its children, on a thread."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, int, int, int]] = []  # (t, requests done, main kB, children kB)
        self.done = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> tuple[int, int]:
        main = rss_kb(self.pid) or 0
        kids = sum(rss_kb(c) or 0 for c in children_of(self.pid))
        self.samples.append((round(time.monotonic() - self._t0, 2), self.done, main, kids))
        return main, kids

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the run -------------------------------------------------------------------------------------

def _h2load(binary: str, data: Path, n: int, streams: int, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [binary, "-n", str(n), "-c", "1", "-m", str(streams), "-d", str(data),
         "-H", "content-type: application/grpc", "-H", "te: trailers", f"http://127.0.0.1:{port}{PROCESS_PATH}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _h2load_counts(output: str) -> tuple[int, int]:
    """(succeeded, not succeeded) from h2load's report."""
    m = _H2LOAD_DONE.search(output)
    if m is None:
        raise RuntimeError(f"h2load gave no request summary:\n{output[-2000:]}")
    total, done, ok, failed, errored = (int(x) for x in m.groups())
    return ok, total - ok


def _epp_counter(metrics_url: str, name: str) -> float:
    with urllib.request.urlopen(metrics_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def soak(group: ProcessGroup, s: SoakSettings, work: Path) -> dict[str, Any]:
    h2load = shutil.which("h2load")
    if h2load is None:
        raise RuntimeError("h2load is missing: install Debian's nghttp2-client (make install does it with apt)")
    fleet = start_sim_fleet(group, s.servers, name="soak-sims")
    epp = start_epp(group, fleet.addresses, name="soak-epp")
    per_client = s.requests // (s.rounds * s.clients)
    total = per_client * s.rounds * s.clients
    warm_requests = int(total * s.warmup_fraction)
    rounds: list[dict[str, Any]] = []
    ok = failed = 0
    warm: tuple[int, int] | None = None
    with RssSampler(epp.process.pid, s.sample_every) as sampler:
        start_main, start_kids = sampler.sample()
        t0 = time.monotonic()
        for r in range(s.rounds):
            runs = []
            for c in range(s.clients):
                data = work / f"stream-{r}-{c}.bin"
                data.write_bytes(stream_body(prompt_for(r, c)))
                runs.append(_h2load(h2load, data, per_client, s.streams, epp.grpc_port))
            for run in runs:
                out, _ = run.communicate(timeout=600)
                good, bad = _h2load_counts(out)
                ok, failed = ok + good, failed + bad
            sampler.done = ok + failed
            main, kids = sampler.sample()
            rounds.append({"round": r + 1, "requests": sampler.done, "seconds": round(time.monotonic() - t0, 2),
                           "rss_kb": main, "children_rss_kb": kids})
            if warm is None and sampler.done >= warm_requests:
                warm = (main, kids)
        elapsed = time.monotonic() - t0
        end_main, end_kids = sampler.sample()
    assert warm is not None
    routed = _epp_counter(epp.metrics_url, "inference_objective_request_total")
    errors = _epp_counter(epp.metrics_url, "inference_objective_request_error_total")
    completed = _epp_counter(epp.metrics_url, "inference_objective_request_duration_seconds_count")
    running = _epp_counter(epp.metrics_url, "inference_objective_running_requests")
    peak = max(x[2] for x in sampler.samples)
    return {
        "requests": total, "succeeded": ok, "failed": failed, "epp_routed": int(routed), "epp_errors": int(errors),
        "epp_completed": int(completed), "epp_running_at_end": int(running),
        "seconds": round(elapsed, 1), "requests_per_s": round(total / elapsed),
        "rss_start_mb": round(start_main / 1024, 1),
        "rss_warm_mb": round(warm[0] / 1024, 1), "rss_final_mb": round(end_main / 1024, 1),
        "rss_peak_mb": round(peak / 1024, 1), "rss_growth_mb": round((end_main - warm[0]) / 1024, 1),
        "collector_rss_warm_mb": round(warm[1] / 1024, 1), "collector_rss_final_mb": round(end_kids / 1024, 1),
        "collector_rss_growth_mb": round((end_kids - warm[1]) / 1024, 1),
        "warmup_requests": warm_requests, "rounds": rounds, "samples": sampler.samples,
    }


def run_soak_bench(out_dir: Path, smoke: bool = False, settings: SoakSettings | None = None) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = settings or (smoke_settings() if smoke else SoakSettings())
    with ProcessGroup(out_dir / "logs") as group:
        run = soak(group, s, out_dir / "logs")
    result = {"settings": asdict(s), "soak": run, "smoke": smoke,
              "flat": run["rss_growth_mb"] < s.max_growth_mb and run["failed"] == 0}
    write_json(out_dir / "result.json", result)
    (out_dir / "summary.md").write_text(summary_markdown(result))
    return result


def summary_markdown(result: dict[str, Any]) -> str:
    s, r = result["settings"], result["soak"]
    row = [f"{r['requests']:,}", r["failed"], f"{r['requests_per_s']:,}", r["rss_start_mb"], r["rss_warm_mb"],
           r["rss_final_mb"], r["rss_peak_mb"], r["rss_growth_mb"], r["collector_rss_growth_mb"]]
    lines = [
        "# Soak (`epp bench soak`)",
        "",
        f"The EPP process (default config, {s['servers']} `epp sim` servers scraped every 50 ms) under h2load: "
        f"{s['rounds']} rounds of {s['clients']} connections x {s['streams']} streams, each replaying a full-duplex "
        "ext_proc stream with the response (the whole request lifecycle). Warm-up: the first "
        f"{s['warmup_fraction']:.0%} of the requests. Target: growth below {s['max_growth_mb']:g} MiB.",
        "",
        markdown_table(["requests", "failed", "req/s", "RSS start (MiB)", "after warm-up (MiB)", "final (MiB)",
                        "peak (MiB)", "growth (MiB)", "collector growth (MiB)"], [row]),
        "",
        f"The EPP counted {r['epp_routed']:,} routed and {r['epp_completed']:,} completed requests, "
        f"{r['epp_errors']} errors, {r['epp_running_at_end']} still running at the end. "
        f"RSS is flat: {'yes' if result['flat'] else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"

"""Scheduler benchmark: how long one routing decision takes on the request path.

One decision = what the director does between "request body complete" and "endpoint
chosen": parse the body (openai-parser), snapshot the candidates, run the data producers,
legacy admission, the scheduler (default profile: queue x2, kv-cache x2, prefix-cache x3,
max-score picker), and the pre-request hooks (prefix index update). Measured for 8, 64,
256 and 1024 endpoints with ~1 KB and ~32 KB chat prompts that share system prompts (so the
prefix index is exercised, including LRU eviction).

``run_scheduler_bench(out_dir)`` writes ``scheduler.json`` and ``scheduler.md``.
"""

from __future__ import annotations

import json
import random
import statistics
import string
import sys
import time
from pathlib import Path
from typing import Any

import plugins  # noqa: F401  (registers the built-in plugins)
from epp.datalayer.endpoint import EndpointMetadata, now
from epp.datalayer.pool import EndpointPool
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate
from epp.observability import deferred
from epp.scheduling.admission import LegacyAdmission
from epp.scheduling.gctuning import restore_gc, tune_gc_for_serving
from epp.framework.handle import PluginHandle
from epp.scheduling.profile import SchedulingProfile, WeightedScorer
from epp.scheduling.scheduler import Scheduler

ENDPOINT_COUNTS = (8, 64, 256, 1024)
PROMPT_SIZES = {"1KB": 1024, "32KB": 32 * 1024}
TARGETS_P99_MS = {(64, "32KB"): 1.0, (1024, "1KB"): 5.0, (1024, "32KB"): 5.0}
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SYSTEM_PROMPTS = 16
DISTINCT_BODIES = 512
KV_BLOCKS_PER_ENDPOINT = 8192


class DefaultPipeline:
    """The default configuration's request path, wired by hand (no config file, no server)."""

    def __init__(self, pool: EndpointPool) -> None:
        h = PluginHandle(pool=pool)
        self.pool = pool
        self.parser = h.create("openai-parser")
        self.producer = h.create("approx-prefix-cache-producer")
        profile = SchedulingProfile(
            name="default",
            scorers=[
                WeightedScorer(h.create("queue-scorer"), 2.0),
                WeightedScorer(h.create("kv-cache-utilization-scorer"), 2.0),
                WeightedScorer(h.create("prefix-cache-scorer"), 3.0),
            ],
            picker=h.create("max-score-picker"),
        )
        self.scheduler = Scheduler(h.create("single-profile-handler"), {"default": profile})
        self.admission = LegacyAdmission(h.create("utilization-detector"))
        self.producers = [self.producer]
        self.pre_request = [self.producer]

    def decide(self, body: bytes, headers: dict[str, str]) -> str:
        request = self.parser.parse_request(body, headers)
        candidates = [Candidate(ep) for ep in self.pool.endpoints()]
        cycle = CycleState()
        for p in self.producers:
            p.produce(cycle, request, candidates)
        denied = self.admission.check(request, candidates)
        if denied is not None:
            raise RuntimeError(denied.reason)
        result = self.scheduler.schedule(request, candidates, cycle)
        for hook in self.pre_request:
            hook.pre_request(request, result)
        return result.targets[0].key


def make_pool(n: int, rng: random.Random) -> EndpointPool:
    pool = EndpointPool("bench")
    metas = [EndpointMetadata(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", 8000, name=f"vllm-{i}-rank-0")
             for i in range(n)]
    pool.sync(metas)
    t = now() + 3600  # fresh for the whole run
    for ep in pool.endpoints():
        ep.update_metrics(waiting_queue_size=rng.randrange(0, 8), running_requests=rng.randrange(0, 64),
                          kv_cache_usage=rng.random() * 0.9, cache_block_size=16,
                          cache_num_blocks=KV_BLOCKS_PER_ENDPOINT, update_time=t)
    return pool


def _text(rng: random.Random, size: int, vocab: list[str]) -> str:
    words = rng.choices(vocab, k=size // 4 + 8)
    text = " ".join(words)
    while len(text) < size:
        text += " " + " ".join(rng.choices(vocab, k=size // 4 + 8))
    return text[:size]


def make_bodies(size: int, rng: random.Random) -> list[bytes]:
    """Chat requests of ~``size`` bytes: 3/4 a shared system prompt, 1/4 a unique question."""
    letters = string.ascii_lowercase
    vocab = ["".join(rng.choices(letters, k=rng.randrange(2, 9))) for _ in range(4096)]
    systems = [_text(rng, size * 3 // 4, vocab) for _ in range(SYSTEM_PROMPTS)]
    bodies = []
    for _ in range(DISTINCT_BODIES):
        payload = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": rng.choice(systems)},
                {"role": "user", "content": _text(rng, size // 4, vocab)},
            ],
            "stream": True,
            "max_tokens": 128,
        }
        bodies.append(json.dumps(payload).encode())
    return bodies


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[idx]


def bench_case(n: int, size_label: str, decisions: int, warmup: int, seed: int = 1) -> dict[str, Any]:
    """One case, measured under the serving GC policy (``tune_gc_for_serving``) and CPython's default."""
    out: dict[str, Any] = {"endpoints": n, "prompt": size_label}
    for policy in ("default", "serving"):
        previous = tune_gc_for_serving() if policy == "serving" else None
        try:
            out[policy] = _measure(n, size_label, decisions, warmup, seed)
        finally:
            if previous is not None:
                restore_gc(previous)
    target = TARGETS_P99_MS.get((n, size_label))
    out["target_p99_ms"] = target
    # Met on wall time; "cpu" when only the thread's CPU time is under target (the wall-time
    # tail then came from other processes sharing the machine).
    if target is None:
        out["meets_target"] = None
    elif out["serving"]["p99_ms"] < target:
        out["meets_target"] = "yes"
    else:
        out["meets_target"] = "cpu" if out["serving"]["cpu_p99_ms"] < target else "no"
    return out


def _measure(n: int, size_label: str, decisions: int, warmup: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    pool = make_pool(n, rng)
    pipeline = DefaultPipeline(pool)
    bodies = make_bodies(PROMPT_SIZES[size_label], rng)
    headers = {":path": "/v1/chat/completions", ":method": "POST", "content-type": "application/json"}
    for i in range(warmup):
        pipeline.decide(bodies[i % len(bodies)], headers)
    times = []
    cpu_times = []
    picks: dict[str, int] = {}
    wall_clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    start = time.perf_counter()
    deferred.flush()
    for i in range(decisions):
        if i % 1000 == 999:
            deferred.flush()  # the server flushes every 100 ms (~1000 decisions at this rate): a comparable backlog
        body = bodies[rng.randrange(len(bodies))]
        c0 = cpu_clock()
        t0 = wall_clock()
        key = pipeline.decide(body, headers)
        t1 = wall_clock()
        cpu_times.append((cpu_clock() - c0) / 1e6)
        times.append((t1 - t0) / 1e6)
        picks[key] = picks.get(key, 0) + 1
    wall = time.perf_counter() - start
    deferred.flush()
    times.sort()
    cpu_times.sort()
    return {
        "prompt_bytes": round(statistics.mean(len(b) for b in bodies)),
        "decisions": decisions,
        "decisions_per_s": round(decisions / wall, 1),
        "p50_ms": round(_percentile(times, 0.50), 4),
        "p90_ms": round(_percentile(times, 0.90), 4),
        "p99_ms": round(_percentile(times, 0.99), 4),
        "max_ms": round(times[-1], 4),
        # CPU time of this thread: what the decision costs without other processes' preemption
        "cpu_p50_ms": round(_percentile(cpu_times, 0.50), 4),
        "cpu_p99_ms": round(_percentile(cpu_times, 0.99), 4),
        "distinct_endpoints_picked": len(picks),
        "prefix_index_entries": len(pipeline.producer.index),
    }


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Scheduler decision time",
        "",
        "One decision = parse + candidate snapshot + prefix producer + admission + default profile "
        "(queue x2, kv-cache x2, prefix-cache x3, max-score) + pre-request (prefix index update). "
        f"Python {meta['python']}, single thread, {meta['decisions']} decisions per case after "
        f"{meta['warmup']} warm-up decisions; chat prompts, 3/4 a shared system prompt "
        f"({SYSTEM_PROMPTS} distinct). Main columns: serving GC policy "
        "(`epp.scheduling.gctuning.tune_gc_for_serving`: freeze + gen0 threshold 50k); "
        "CPU p99: this thread's CPU time (excludes preemption by other processes on a shared machine); "
        "last column: wall p99 with CPython's default GC thresholds.",
        "",
        "| endpoints | prompt | decisions/s | p50 ms | p90 ms | p99 ms | max ms | CPU p99 ms | target p99 | met | p99 ms, default GC |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        s, d = r["serving"], r["default"]
        target = f"< {r['target_p99_ms']:g} ms" if r["target_p99_ms"] is not None else ""
        met = {None: "", "yes": "yes", "cpu": "CPU time only", "no": "**no**"}[r["meets_target"]]
        lines.append(f"| {r['endpoints']} | {r['prompt']} | {s['decisions_per_s']:,.0f} | {s['p50_ms']:.3f} | "
                     f"{s['p90_ms']:.3f} | {s['p99_ms']:.3f} | {s['max_ms']:.3f} | {s['cpu_p99_ms']:.3f} | "
                     f"{target} | {met} | {d['p99_ms']:.3f} |")
    lines.append("")
    return "\n".join(lines)


def run_scheduler_bench(out_dir: Path, *, smoke: bool = False) -> dict:
    """Run every case; write ``scheduler.json`` and ``scheduler.md`` into ``out_dir``; return the results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decisions, warmup = (40, 20) if smoke else (3000, 500)
    counts = ENDPOINT_COUNTS[:2] if smoke else ENDPOINT_COUNTS
    rows = [bench_case(n, size, decisions, warmup) for n in counts for size in PROMPT_SIZES]
    meta = {"python": sys.version.split()[0], "decisions": decisions, "warmup": warmup, "smoke": smoke}
    result = {"benchmark": "scheduler", "meta": meta, "results": rows}
    (out_dir / "scheduler.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "scheduler.md").write_text(_markdown(rows, meta))
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-results")
    res = run_scheduler_bench(out, smoke="--smoke" in sys.argv)
    print((out / "scheduler.md").read_text())

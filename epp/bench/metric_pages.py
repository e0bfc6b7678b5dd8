"""Realistic model-server ``/metrics`` pages, rendered with prometheus_client itself.

Used by the collector benchmark and the data-layer tests, so both read what a real vLLM
(V1) or SGLang server exports: the routing gauges plus the counters, the latency and token
histograms with the engines' own buckets, ``lora_requests_info``, ``cache_config_info``, and
the HTTP-instrumentator and process series a real server also serves. Family names and
buckets follow ``shared/research/mock-and-peers.md`` §A2.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import gc_collector, platform_collector, process_collector

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_HTTP_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 7.5, 10.0, 30.0, 60.0)


def _one_two_five(limit: int) -> tuple[int, ...]:
    """vLLM's 1-2-5 token buckets up to ``max_model_len``."""
    out, mag = [], 1
    while True:
        for m in (1, 2, 5):
            if m * mag > limit:
                return tuple(out)
            out.append(m * mag)
        mag *= 10


@dataclass
class EngineState:
    """The values a page reports; the routing gauges are what the EPP reads."""

    waiting: int = 3
    running: int = 7
    kv_usage: float = 0.42
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_lora: int = 4
    block_size: int = 16
    num_gpu_blocks: int = 8192
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    max_model_len: int = 32768
    observations: int = 200  # histogram observations, so buckets have spread-out counts
    old_lora_series: int = 2  # earlier lora_requests_info label combinations that linger on the page
    seed: int = 0
    extra_http_handlers: tuple[str, ...] = field(default=("/v1/completions", "/v1/chat/completions", "/metrics",
                                                         "/health", "/v1/models"))


def vllm_page(state: EngineState | None = None, *, process_metrics: bool = True) -> bytes:
    """A vLLM V1 ``/metrics`` page (~60 KB with the defaults)."""
    s = state or EngineState()
    rnd = random.Random(s.seed)
    reg = CollectorRegistry()
    if process_metrics:
        process_collector.ProcessCollector(registry=reg)
        platform_collector.PlatformCollector(registry=reg)
        gc_collector.GCCollector(registry=reg)
    lbl = ("model_name", "engine")
    lv = (s.model, "0")

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, lbl, registry=reg).labels(*lv).set(value)

    gauge("vllm:num_requests_running", "Number of requests in model execution batches.", s.running)
    gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting)
    gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage)
    gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", s.kv_usage)
    by_reason = Gauge("vllm:num_requests_waiting_by_reason", "Waiting requests by reason.", (*lbl, "reason"),
                      registry=reg)
    by_reason.labels(*lv, "capacity").set(s.waiting)
    by_reason.labels(*lv, "deferred").set(0)
    gauge("vllm:engine_sleep_state", "Engine sleep state.", 0)

    lora = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                 ("max_lora", "waiting_lora_adapters", "running_lora_adapters"), registry=reg)
    base_ts = 1.7e9
    for i in range(s.old_lora_series):
        lora.labels(str(s.max_lora), "", f"old-adapter-{i}").set(base_ts + i)
    lora.labels(str(s.max_lora), ",".join(s.waiting_adapters), ",".join(s.running_adapters)).set(
        base_ts + s.old_lora_series + 10)

    cache = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                  ("block_size", "cache_dtype", "num_gpu_blocks", "num_cpu_blocks", "enable_prefix_caching",
                   "gpu_memory_utilization", "engine"), registry=reg)
    cache.labels(str(s.block_size), "auto", str(s.num_gpu_blocks), "0", "True", "0.9", "0").set(1)

    def counter(name: str, doc: str, value: float, extra: dict[str, str] | None = None) -> None:
        names = (*lbl, *(extra or {}))
        c = Counter(name, doc, names, registry=reg)
        c.labels(*lv, *(extra or {}).values()).inc(value)

    counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", rnd.randint(0, 50))
    counter("vllm:prompt_tokens", "Number of prefill tokens processed.", rnd.randint(10_000, 10_000_000))
    counter("vllm:generation_tokens", "Number of generation tokens processed.", rnd.randint(10_000, 10_000_000))
    counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
            rnd.randint(10_000, 10_000_000))
    counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
            rnd.randint(1_000, 1_000_000))
    success = Counter("vllm:request_success", "Count of successfully processed requests.",
                      (*lbl, "finished_reason"), registry=reg)
    for reason in ("stop", "length", "abort", "error"):
        success.labels(*lv, reason).inc(rnd.randint(0, 5000))

    def histogram(name: str, doc: str, buckets: tuple[float, ...], scale: float) -> None:
        h = Histogram(name, doc, lbl, buckets=buckets, registry=reg)
        child = h.labels(*lv)
        for _ in range(s.observations):
            child.observe(rnd.expovariate(1.0 / scale))

    histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT_BUCKETS, 0.2)
    histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS, 0.03)
    histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
              _ITL_BUCKETS, 0.03)
    histogram("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
              _ITL_BUCKETS, 0.03)
    for phase in ("e2e_request_latency", "request_queue_time", "request_inference_time", "request_prefill_time",
                  "request_decode_time"):
        histogram(f"vllm:{phase}_seconds", f"Histogram of {phase.replace('_', ' ')} in seconds.",
                  _REQUEST_LATENCY_BUCKETS, 2.0)
    tokens = _one_two_five(s.max_model_len)
    for metric, scale in (("request_prompt_tokens", 800), ("request_generation_tokens", 200),
                          ("request_max_num_generation_tokens", 256), ("request_params_max_tokens", 512)):
        histogram(f"vllm:{metric}", f"Histogram of {metric.replace('_', ' ')}.", tokens, scale)
    histogram("vllm:request_params_n", "Histogram of the n request parameter.", (1, 2, 5, 10, 20), 1)
    histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
              _ITERATION_TOKEN_BUCKETS, 300)

    http_total = Counter("http_requests", "Total number of requests by method, status and handler.",
                         ("handler", "method", "status"), registry=reg)
    http_latency = Histogram("http_request_duration_seconds", "Latency with only few buckets by handler.",
                             ("handler", "method"), buckets=_HTTP_LATENCY_BUCKETS, registry=reg)
    for handler in s.extra_http_handlers:
        http_total.labels(handler, "POST" if handler.startswith("/v1/c") else "GET", "2xx").inc(rnd.randint(1, 9999))
        child = http_latency.labels(handler, "POST" if handler.startswith("/v1/c") else "GET")
        for _ in range(20):
            child.observe(rnd.expovariate(1.0))
    return generate_latest(reg)


def sglang_page(state: EngineState | None = None) -> bytes:
    """An SGLang ``/metrics`` page: routing gauges, cache info, counters and latency histograms."""
    s = state or EngineState(model="Qwen/Qwen2.5-7B-Instruct")
    rnd = random.Random(s.seed)
    reg = CollectorRegistry()
    lbl = ("model_name",)

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, lbl, registry=reg).labels(s.model).set(value)

    gauge("sglang:num_running_reqs", "The number of running requests.", s.running)
    gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", s.waiting)
    gauge("sglang:token_usage", "The token usage.", s.kv_usage)
    gauge("sglang:num_used_tokens", "The number of used tokens.", int(s.kv_usage * s.num_gpu_blocks * s.block_size))
    gauge("sglang:max_total_num_tokens", "Maximum total number of tokens.", s.num_gpu_blocks * s.block_size)
    gauge("sglang:gen_throughput", "The generation throughput (token/s).", rnd.uniform(100, 3000))
    gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", rnd.random())
    gauge("sglang:num_grammar_queue_reqs", "The number of requests in the grammar waiting queue.", 0)
    cache = Gauge("sglang:cache_config_info", "Cache configuration.", ("page_size", "num_pages"), registry=reg)
    cache.labels(str(s.block_size), str(s.num_gpu_blocks)).set(1)
    for name in ("prompt_tokens", "generation_tokens", "cached_tokens", "num_requests", "num_aborted_requests"):
        Counter(f"sglang:{name}", f"Number of {name.replace('_', ' ')}.", lbl, registry=reg).labels(s.model).inc(
            rnd.randint(0, 1_000_000))
    for name, buckets, scale in (("time_to_first_token_seconds", _TTFT_BUCKETS, 0.2),
                                 ("inter_token_latency_seconds", _ITL_BUCKETS, 0.03),
                                 ("e2e_request_latency_seconds", _REQUEST_LATENCY_BUCKETS, 2.0)):
        child = Histogram(f"sglang:{name}", f"Histogram of {name}.", lbl, buckets=buckets, registry=reg).labels(s.model)
        for _ in range(s.observations):
            child.observe(rnd.expovariate(1.0 / scale))
    return generate_latest(reg)

"""Prometheus text exposition, computed from engine state at scrape time.

We write the text format directly instead of going through prometheus_client:
the values already live in the engine (gauges are read at scrape time, the
counters and histograms in stats.py), and rendering a ~40 KB page this way is
several times cheaper than building and collecting a private registry (see
README.md, "Metrics"). EPPs scrape every ~50 ms, times 8 servers per process
in the benchmarks, so this matters. The layout follows prometheus_client's
output (HELP/TYPE lines, ``_total`` counters with ``_created`` samples), so
the page looks like a real vLLM's to a parser.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from epp.sim.stats import FINISH_REASONS, Histogram

if TYPE_CHECKING:
    from epp.sim.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vllm:lora_requests_info keeps one series per label combination, like vLLM;
# bounded so a long run does not grow the page forever.
_LORA_SERIES_KEPT = 16


def _num(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())


class _Writer:
    """Appends exposition lines; ``labels`` are the labels every sample carries."""

    __slots__ = ("out", "labels")

    def __init__(self, labels: str) -> None:
        self.out: list[str] = []
        self.labels = labels

    def _family(self, name: str, kind: str, help_text: str) -> None:
        self.out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")

    def gauge(self, name: str, help_text: str, value: float, labels: str | None = None) -> None:
        self._family(name, "gauge", help_text)
        self.out.append(f"{name}{{{self.labels if labels is None else labels}}} {_num(value)}\n")

    def gauge_series(self, name: str, help_text: str, series: list[tuple[str, float]]) -> None:
        self._family(name, "gauge", help_text)
        for labels, value in series:
            self.out.append(f"{name}{{{labels}}} {_num(value)}\n")

    def counter(self, name: str, help_text: str, series: list[tuple[str, float]], created: float) -> None:
        """``name`` without ``_total``; one sample per (extra labels, value)."""
        self._family(f"{name}_total", "counter", help_text)
        base = self.labels
        for extra, value in series:
            labels = f"{base},{extra}" if extra else base
            self.out.append(f"{name}_total{{{labels}}} {_num(value)}\n")
        self._family(f"{name}_created", "gauge", help_text)
        for extra, _ in series:
            labels = f"{base},{extra}" if extra else base
            self.out.append(f"{name}_created{{{labels}}} {_num(created)}\n")

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        self._family(name, "histogram", help_text)
        labels = self.labels
        out = self.out
        prefix = f"{name}_bucket{{{labels},le=\""
        for bound, count in zip((*hist.bounds, math.inf), hist.cumulative()):
            out.append(f'{prefix}{_num(bound)}"}} {count}.0\n')
        out.append(f"{name}_count{{{labels}}} {hist.count}.0\n")
        out.append(f"{name}_sum{{{labels}}} {_num(hist.sum)}\n")
        self._family(f"{name}_created", "gauge", help_text)
        out.append(f"{name}_created{{{labels}}} {_num(hist.created)}\n")

    def text(self) -> str:
        return "".join(self.out)


class MetricsPage:
    """Renders one engine's /metrics page in the vLLM or SGLang dialect."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        cfg = engine.config
        self.vllm_labels = _labels(model_name=cfg.served_name, engine="0")
        self.sglang_labels = _labels(model_name=cfg.served_name)
        self.cache_info_labels = _labels(
            block_size=str(cfg.block_size),
            cache_dtype="auto",
            enable_prefix_caching="True",
            gpu_memory_utilization="0.9",
            num_cpu_blocks="0",
            num_gpu_blocks=str(cfg.num_gpu_blocks),
            prefix_caching_hash_algo="sha256",
            engine="0",
        )
        self._lora_series: OrderedDict[str, float] = OrderedDict()
        self._last_scrape = (time.monotonic(), 0)

    def render(self, now: float) -> str:
        if self.engine.config.engine_flavor == "sglang":
            return self._sglang()
        return self._vllm(now)

    # -- vLLM ----------------------------------------------------------------------

    def _lora_info(self, now: float) -> list[tuple[str, float]]:
        sched = self.engine.scheduler
        running = ",".join(sorted(sched.lora.running))
        waiting = ",".join(sorted({r.lora for r in sched.waiting if r.lora is not None}))
        key = self.vllm_labels + "," + _labels(
            max_lora=str(sched.lora.max_loras),
            running_lora_adapters=running,
            waiting_lora_adapters=waiting,
        )
        series = self._lora_series
        series[key] = now
        series.move_to_end(key)
        while len(series) > _LORA_SERIES_KEPT:
            series.popitem(last=False)
        return list(series.items())

    def _vllm(self, now: float) -> str:
        engine = self.engine
        sched = engine.scheduler
        s = sched.stats
        kv_usage = sched.kv.usage
        w = _Writer(self.vllm_labels)
        w.gauge("vllm:num_requests_running", "Number of requests in model execution batches.", len(sched.running))
        w.gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(sched.waiting))
        w.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage)
        w.gauge("vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: use vllm:kv_cache_usage_perc.", kv_usage)
        w.gauge_series("vllm:lora_requests_info", "Running stats on lora requests.", self._lora_info(now))
        w.gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", 1, self.cache_info_labels)
        created = s.created
        w.counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                  [("", s.preemptions)], created)
        w.counter("vllm:prompt_tokens", "Number of prefill tokens processed.", [("", s.prompt_tokens)], created)
        w.counter("vllm:generation_tokens", "Number of generation tokens processed.",
                  [("", s.generation_tokens)], created)
        w.counter("vllm:request_success", "Count of successfully processed requests.",
                  [(f'finished_reason="{r}"', s.success[r]) for r in FINISH_REASONS], created)
        w.counter("vllm:prefix_cache_queries",
                  "Prefix cache queries, in terms of number of queried tokens.", [("", s.prefix_queries)], created)
        w.counter("vllm:prefix_cache_hits",
                  "Prefix cache hits, in terms of number of cached tokens.", [("", s.prefix_hits)], created)
        w.histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                    s.iteration_tokens)
        w.histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.ttft)
        w.histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", s.itl)
        w.histogram("vllm:time_per_output_token_seconds",
                    "Histogram of time per output token in seconds. DEPRECATED: use inter_token_latency.", s.itl)
        w.histogram("vllm:request_time_per_output_token_seconds",
                    "Histogram of time_per_output_token_seconds per request.", s.request_tpot)
        w.histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", s.e2e)
        w.histogram("vllm:request_queue_time_seconds",
                    "Histogram of time spent in WAITING phase for request.", s.queue)
        w.histogram("vllm:request_inference_time_seconds",
                    "Histogram of time spent in RUNNING phase for request.", s.inference)
        w.histogram("vllm:request_prefill_time_seconds",
                    "Histogram of time spent in PREFILL phase for request.", s.prefill)
        w.histogram("vllm:request_decode_time_seconds",
                    "Histogram of time spent in DECODE phase for request.", s.decode)
        w.histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", s.prompt_len)
        w.histogram("vllm:request_generation_tokens", "Number of generation tokens processed.", s.generation_len)
        w.histogram("vllm:request_max_num_generation_tokens",
                    "Histogram of maximum number of requested generation tokens.", s.max_generation)
        w.histogram("vllm:request_params_n", "Histogram of the n request parameter.", s.params_n)
        w.histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                    s.max_tokens)
        self._sim_extras(w)
        return w.text()

    def _sim_extras(self, w: _Writer) -> None:
        """Simulator-only counters, for benchmarks (no real engine has these)."""
        sched = self.engine.scheduler
        created = sched.stats.created
        w.counter("sim:lora_adapter_loads", "Adapters loaded into a GPU slot (each costs --lora-load-ms).",
                  [("", sched.lora.loads)], created)
        w.counter("sim:kv_block_evictions", "Cached KV blocks evicted to make room.",
                  [("", sched.kv.evictions)], created)
        w.counter("sim:engine_steps", "Engine steps run.", [("", self.engine.steps)], created)
        publisher = self.engine.publisher
        if publisher.enabled:
            w.counter("sim:kv_events_batches", "KV event batches published (the next sequence number).",
                      [("", publisher.batches)], created)
            w.counter("sim:kv_events", "KV events published.", [("", publisher.events)], created)

    # -- SGLang --------------------------------------------------------------------

    def _sglang(self) -> str:
        engine = self.engine
        cfg = engine.config
        sched = engine.scheduler
        s = sched.stats
        kv = sched.kv
        # gen_throughput: generated tokens per second since the previous scrape.
        mono = time.monotonic()
        last_t, last_tokens = self._last_scrape
        elapsed = mono - last_t
        throughput = (s.generation_tokens - last_tokens) / elapsed if elapsed > 0 else 0.0
        self._last_scrape = (mono, s.generation_tokens)
        w = _Writer(self.sglang_labels)
        w.gauge("sglang:num_running_reqs", "The number of running requests.", len(sched.running))
        w.gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", len(sched.waiting))
        w.gauge("sglang:num_used_tokens", "The number of used tokens.", kv.num_used * cfg.block_size)
        w.gauge("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.",
                cfg.num_gpu_blocks * cfg.block_size)
        w.gauge("sglang:token_usage", "The token usage.", kv.usage)
        w.gauge("sglang:gen_throughput", "The generation throughput (token/s).", throughput)
        hit_rate = s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0
        w.gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", hit_rate)
        w.gauge("sglang:num_retracted_reqs", "The number of retracted requests.",
                sum(1 for r in sched.waiting if r.preemptions))
        w.gauge("sglang:cache_config_info", "Information of the cache config", 1,
                _labels(page_size=str(cfg.block_size), num_pages=str(cfg.num_gpu_blocks)))
        created = s.created
        w.counter("sglang:prompt_tokens", "Number of prefill tokens processed.", [("", s.prompt_tokens)], created)
        w.counter("sglang:generation_tokens", "Number of generation tokens processed.",
                  [("", s.generation_tokens)], created)
        w.counter("sglang:cached_tokens", "Number of cached prompt tokens.", [("", s.prefix_hits)], created)
        w.counter("sglang:num_requests", "Number of requests processed.", [("", s.requests_received)], created)
        w.counter("sglang:num_aborted_requests", "Number of requests aborted.", [("", s.success["abort"])],
                  created)
        w.histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.ttft)
        w.histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", s.itl)
        w.histogram("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
                    s.e2e)
        w.histogram("sglang:queue_time_seconds", "Histogram of queueing time in seconds.", s.queue)
        self._sim_extras(w)
        return w.text()


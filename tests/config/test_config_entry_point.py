"""A plugin shipped as a separate distribution is found through the ``epp.plugins`` entry
point and is usable from YAML.

The distribution (tests/plugin_pkg) is built and installed with pip into a temporary
directory (offline: no index, no build isolation, no dependencies), which is then put on
PYTHONPATH: importlib.metadata discovers its entry point exactly as it would in a venv,
and the main venv is left untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "plugin_pkg"
CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- name: flat
  type: example-constant-scorer
  parameters: {score: 0.25}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: flat, weight: 2}
"""


def _check_config(text: str, pythonpath: Path | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-m", "epp", "check-config", "--config-text", text],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("plugin")
    src = work / "src"
    shutil.copytree(PKG, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))  # builds stay out of the repo
    target = work / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "epp_example_plugin").is_dir()
    assert any(p.name.startswith("epp_example_plugin-") and p.suffix == ".dist-info" for p in target.iterdir())
    return target


def test_out_of_tree_plugin_is_usable_from_yaml(installed: Path) -> None:
    r = _check_config(CONFIG, installed)
    assert r.returncode == 0, r.stderr
    assert "type: example-constant-scorer" in r.stdout
    assert "flat:\n    score: 0.25" in r.stdout  # its Params were decoded by the framework


def test_its_parameters_are_validated(installed: Path) -> None:
    r = _check_config(CONFIG.replace("0.25", "7"), installed)
    assert r.returncode == 2
    assert "plugins[0].parameters: 'score' must be within [0, 1], got 7.0 (plugin 'flat', type 'example-constant-scorer')" in r.stderr


def test_without_the_distribution_the_type_is_unknown() -> None:
    r = _check_config(CONFIG, None)
    assert r.returncode == 2
    assert "plugins[0]: plugin type 'example-constant-scorer' is not registered" in r.stderr

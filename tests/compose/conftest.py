"""The compose stack, built and started once for the session, always torn down.

Order: a machine-wide lock (dockerd, the 172.28.5.0/24 network and the image tags are
machine-wide; other checkouts may run this test at the same time), a Docker engine
(docker_engine.py), the local base image (base_images.py), `docker compose build` and
`up --wait` of everything but Grafana, then the tests; teardown runs `compose down` and stops
dockerd if it was started here, also when setup or a test failed. Timings and, after a failure,
the containers' logs are printed at the end of the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from base_images import build_base_image
from compose_project import REPORT, ROOT, ComposeProject, Stack
from docker_engine import SKIP_ENV, DockerEngine, EngineUnavailable

LOCK = Path("/tmp/epp-compose-test.lock")
TIMINGS: dict[str, float] = {}


@contextlib.contextmanager
def timed(phase: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        TIMINGS[phase] = time.monotonic() - t0


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    with LOCK.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mock_ips() -> dict[str, str]:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return {name: s["networks"]["epp-net"]["ipv4_address"] for name, s in services.items()
            if name.startswith("vllm-mock-")}


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("compose")
    t0 = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        with timed("waiting for the machine lock"):
            cleanup.enter_context(machine_lock())
        engine = DockerEngine(work)
        cleanup.callback(lambda: REPORT.extend(f"restored {r}" for r in engine.restored))
        cleanup.callback(engine.stop)
        with timed("docker engine"):
            try:
                engine.start()
            except EngineUnavailable as e:
                if os.environ.get(SKIP_ENV):
                    pytest.skip(f"{e} ({SKIP_ENV} is set)")
                pytest.fail(str(e), pytrace=False)
        REPORT.append(engine.describe())
        with timed("local base image"):
            base = build_base_image(work)
        project = ComposeProject(base)

        def down() -> None:
            if request.session.testsfailed:
                REPORT.append("container logs (last lines each):\n" + project.logs())
            with timed("compose down"):
                project.down()

        cleanup.callback(down)
        with timed("compose build"):
            project.build()
        with timed("compose up --wait"):
            project.up()
        TIMINGS["setup total"] = time.monotonic() - t0
        yield Stack(project, _mock_ips())
    TIMINGS["whole compose test (setup, tests, teardown)"] = time.monotonic() - t0


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS and not REPORT:
        return
    terminalreporter.section("compose test")
    for line in REPORT:
        terminalreporter.write_line(line)
    for phase, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{phase}: {seconds:.1f} s")

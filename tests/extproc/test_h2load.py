"""h2load (nghttp2's load client, Debian's nghttp2-client) as an independent HTTP/2 client:
20,000 gRPC health checks over 4 connections with 32 streams each in flight."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from extproc_support import new_director
from h2peer import ServerThread


@pytest.fixture(autouse=True)
def extproc_core():
    """Overrides the package-wide parametrisation: h2load speaks HTTP/2 to the fast core."""
    return "fast"


def test_h2load_completes_20000_grpc_calls(tmp_path):
    h2load = shutil.which("h2load")
    assert h2load, "h2load is missing: install Debian's nghttp2-client (make install does it with apt)"
    request = tmp_path / "check.bin"
    request.write_bytes(b"\x00\x00\x00\x00\x00")  # one gRPC message: an empty HealthCheckRequest
    with ServerThread(new_director()) as server:
        run = subprocess.run(
            [h2load, "-n", "20000", "-c", "4", "-m", "32", "-d", str(request), "-H", "content-type: application/grpc",
             "-H", "te: trailers", f"http://127.0.0.1:{server.port}/grpc.health.v1.Health/Check"],
            capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                         r"(\d+) errored", run.stdout)
        assert done, run.stdout
        assert [int(x) for x in done.groups()] == [20000, 20000, 20000, 0, 0], run.stdout
        assert re.search(r"status codes: 20000 2xx", run.stdout), run.stdout
        assert server.wait_for(lambda: not server.server.connections)  # h2load closed its connections

"""``epp demo`` as a user runs it: a subprocess with real sims, the EPP and Envoy.

Each run gets a unique marker in its environment; every process the demo starts inherits it,
so after the demo exits a scan of /proc finds anything it left behind, grandchildren included.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

MARKER = "EPP_DEMO_TEST_MARKER"
ROW = re.compile(r"^\W*(sim-\d)\W+(127\.0\.0\.1:\d+)\W+([\d.]+)x\W+(\d+)\W+\d+%\W+(\d+)/(\d+)", re.M)


class Demo:
    """A running ``epp demo``, its output collected by a thread (so the pipe never fills)."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.marker = uuid.uuid4().hex
        env = {**os.environ, MARKER: self.marker, "PYTHONUNBUFFERED": "1"}
        env.pop("COLUMNS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "epp", "demo", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        self._chunks: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self._chunks.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self._chunks)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output, re.M)
            if m:
                return m
            if self.proc.poll() is not None:
                self._reader.join(5)
                m = re.search(pattern, self.output, re.M)
                if m:
                    return m
                pytest.fail(f"demo exited ({self.proc.returncode}) before printing {pattern!r}:\n{self.output}")
            time.sleep(0.05)
        pytest.fail(f"demo did not print {pattern!r} within {timeout}s:\n{self.output}")

    def finish(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:  # the test failed; do not leave the demo behind
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return rc

    def leftovers(self) -> list[str]:
        """Processes still running with this demo's marker in their environment."""
        needle = f"{MARKER}={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "environ").read_bytes() and not _zombie(entry):
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:200]
                    found.append(f"{entry.name}: {cmdline!r}")
            except OSError:
                continue
        return found


def _zombie(entry: Path) -> bool:
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def reported_pids(output: str) -> dict[str, int]:
    m = re.search(r"^stopped (.+)$", output, re.M)
    assert m, f"no 'stopped ...' line:\n{output}"
    return {name: int(pid) for name, pid in re.findall(r"(\w+) \(pid=(\d+)", m.group(1))}


def assert_all_gone(demo: Demo, pids: dict[str, int]) -> None:
    deadline = time.monotonic() + 5
    while (left := demo.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left running after the demo: {left}"
    for name, pid in pids.items():
        assert _zombie(Path(f"/proc/{pid}")), f"{name} (pid {pid}) still running"


def test_demo_sends_traffic_everywhere_and_stops_everything() -> None:
    demo = Demo("--requests", "20", "--rate", "20", "--seed", "3")
    rc = demo.finish(90)
    out = demo.output
    assert rc == 0, out
    # Started the three processes, reported their pids, and stopped them.
    pids = reported_pids(out)
    assert set(pids) == {"sim", "epp", "envoy"}, out
    assert_all_gone(demo, pids)
    # No TTY: one plain line per request, each naming the server and the reason from the EPP.
    lines = re.findall(r"^\[\s*\d+/20\] (demo-\d{4}) .* -> (sim-\d) .* why: (.+)$", out, re.M)
    assert len(lines) == 20 and len({rid for rid, _s, _w in lines}) == 20, out
    assert "\x1b[" not in out, "escape codes in piped output"
    # The summary table lists the four endpoints, the slow one at half speed, and adds up.
    rows = {m.group(1): m for m in ROW.finditer(out)}
    assert sorted(rows) == ["sim-0", "sim-1", "sim-2", "sim-3"], out
    assert [float(rows[f"sim-{i}"].group(3)) for i in range(4)] == [1, 1, 1, 0.5]
    assert sum(int(m.group(4)) for m in rows.values()) == 20
    per_server = {s: sum(1 for _r, srv, _w in lines if srv == s) for s in rows}
    assert per_server == {s: int(m.group(4)) for s, m in rows.items()}
    assert "requests: 20, succeeded: 20, failed: 0" in out
    # Shared prefixes were reused somewhere (tenants repeat within 20 requests of this seed).
    assert sum(int(m.group(5)) for m in rows.values()) > 0, out
    assert re.search(r"picks decided by .*: \S", out), out


def test_keep_serves_until_ctrl_c_then_stops_everything() -> None:
    demo = Demo("--requests", "6", "--rate", "30", "--keep")
    demo.wait_for(r"press Ctrl-C to stop")
    envoy = demo.wait_for(r"OpenAI API \(via Envoy\)\s+(http://\S+)/v1$").group(1)
    debug = demo.wait_for(r"EPP debug page\s+(http://\S+)$").group(1)
    # Still serving after the burst: a request through Envoy is routed by the EPP.
    req = urllib.request.Request(f"{envoy}/v1/completions", method="POST", headers={
        "content-type": "application/json", "x-epp-debug": "1"},
        data=b'{"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "hello", "max_tokens": 2}')
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["x-sim-server"].startswith("sim-")
        assert resp.headers["x-epp-decision"].startswith("pick=")
    with opener.open(debug, timeout=10) as resp:
        assert b"Recent decisions" in resp.read()
    assert len(demo.leftovers()) >= 4  # the demo, sim, EPP, Envoy: the scan does see them while they run
    demo.proc.send_signal(signal.SIGINT)
    rc = demo.finish(30)
    assert rc == 0, demo.output  # Ctrl-C is how --keep ends; the burst itself succeeded
    assert_all_gone(demo, reported_pids(demo.output))


def test_ctrl_c_during_the_burst_stops_everything() -> None:
    demo = Demo("--requests", "2000", "--rate", "10")
    demo.wait_for(r"^\[\s*3/2000\]")
    demo.proc.send_signal(signal.SIGINT)
    rc = demo.finish(30)
    assert rc == 130, demo.output
    assert "interrupted" in demo.output
    pids = reported_pids(demo.output)
    assert set(pids) == {"sim", "epp", "envoy"}
    assert_all_gone(demo, pids)


def test_a_process_that_fails_to_start_is_reported_and_the_rest_stopped(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: no-such-plugin\n")
    demo = Demo("--requests", "5", "--config-file", str(bad))
    rc = demo.finish(60)
    out = demo.output
    assert rc == 1, out
    assert "epp demo: error: epp exited before" in out and "no-such-plugin" in out, out
    pids = reported_pids(out)
    assert set(pids) == {"sim", "epp"}, out  # Envoy was never started
    assert_all_gone(demo, pids)
    assert "Traceback" not in out.split("last log lines")[0]


@pytest.mark.parametrize("args, message", [
    (("--requests", "0"), "must be > 0"),
    (("--rate", "fast"), "expected a number"),
    (("--config-file", "/nonexistent/epp.yaml"), "config file /nonexistent/epp.yaml not found"),
])
def test_bad_arguments_fail_clearly_before_starting_anything(args: tuple[str, ...], message: str) -> None:
    demo = Demo(*args)
    rc = demo.finish(30)
    assert rc == 2, demo.output
    assert message in demo.output and "Traceback" not in demo.output
    assert "starting" not in demo.output

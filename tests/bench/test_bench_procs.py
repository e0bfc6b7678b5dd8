"""ProcessGroup: children become ready, and are always stopped (normal exit, errors, signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from epp.bench.procs import ProcessFailed, ProcessGroup, free_port, free_ports, grpc_health_serving, http_ok


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a killed orphan may linger as one)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


PY = sys.executable
# Prints "ready <pid of a grandchild>" and sleeps; the grandchild sleeps too.
PARENT_WITH_GRANDCHILD = textwrap.dedent("""
    import subprocess, sys, time
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("ready", g.pid, flush=True)
    time.sleep(60)
""")


def test_ready_line_then_stopped_with_grandchildren(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        proc = group.start("parent", [PY, "-c", PARENT_WITH_GRANDCHILD])
        (m,) = group.wait_for_log(proc, r"ready (\d+)")
        grandchild = int(m.group(1))
        assert alive(proc.pid) and alive(grandchild)
    assert proc.popen.returncode is not None
    assert wait_gone(grandchild), "the grandchild outlived the group"
    assert (tmp_path / "parent.log").read_text().startswith("ready")


def test_children_stopped_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ProcessGroup(tmp_path) as group:
            proc = group.start("sleeper", [PY, "-c", "import time; time.sleep(60)"])
            raise RuntimeError("boom")
    assert proc.popen.returncode is not None


def test_sigterm_ignoring_child_is_killed(tmp_path: Path) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    group = ProcessGroup(tmp_path, stop_timeout=0.5)
    with group:
        proc = group.start("stubborn", [PY, "-c", stubborn])
        group.wait_for_log(proc, "up")
        started = time.monotonic()
    assert proc.popen.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_stop_in_reverse_order_and_group_is_empty_after(tmp_path: Path) -> None:
    # Each child appends its name to a file when SIGTERM arrives: the order must be reversed.
    record = tmp_path / "order.txt"
    script = textwrap.dedent(f"""
        import signal, sys, time
        def bye(*_):
            open({str(record)!r}, "a").write(sys.argv[1] + "\\n"); sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("up", flush=True)
        time.sleep(60)
    """)
    with ProcessGroup(tmp_path) as group:
        for name in ("first", "second", "third"):
            group.wait_for_log(group.start(name, [PY, "-c", script, name]), "up")
    assert record.read_text().split() == ["third", "second", "first"]
    assert group.processes == []


def test_early_exit_reports_the_log(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        proc = group.start("crasher", [PY, "-c", "import sys; print('bad flag --frobnicate'); sys.exit(3)"])
        with pytest.raises(ProcessFailed) as err:
            group.wait_for_log(proc, "never printed", timeout=10)
    text = str(err.value)
    assert "crasher exited before" in text and "code 3" in text and "bad flag --frobnicate" in text


def test_readiness_timeout_names_what_was_awaited(tmp_path: Path) -> None:
    port = free_port()
    with ProcessGroup(tmp_path) as group:
        proc = group.start("silent", [PY, "-c", "import time; time.sleep(60)"])
        with pytest.raises(ProcessFailed, match=f"not answering http://127.0.0.1:{port}/health after 0s"):
            group.wait_for_http(proc, f"http://127.0.0.1:{port}/health", timeout=0.3)


def test_sigterm_to_the_parent_stops_its_children(tmp_path: Path) -> None:
    # A separate interpreter plays the benchmark: it starts a child in a group and waits.
    script = textwrap.dedent(f"""
        import sys, time
        from epp.bench.procs import ProcessGroup
        with ProcessGroup({str(tmp_path)!r}) as group:
            child = group.start("child", [sys.executable, "-c", "import time; time.sleep(60)"])
            print("child", child.pid, flush=True)
            time.sleep(60)
    """)
    bench = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = bench.stdout.readline() if bench.stdout else ""
        child = int(line.split()[1])
        assert alive(child)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(10) == 128 + signal.SIGTERM
        assert wait_gone(child), "SIGTERM to the parent left its child running"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_sigkill_of_the_parent_does_not_orphan_children(tmp_path: Path) -> None:
    # PR_SET_PDEATHSIG: even a parent that cannot clean up takes its children with it.
    script = textwrap.dedent(f"""
        import sys, time
        from epp.bench.procs import ProcessGroup
        group = ProcessGroup({str(tmp_path)!r})
        child = group.start("child", [sys.executable, "-c", "import time; time.sleep(60)"])
        print("child", child.pid, flush=True)
        time.sleep(60)
    """)
    bench = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int((bench.stdout.readline() if bench.stdout else "").split()[1])
        bench.kill()
        bench.wait(10)
        assert wait_gone(child)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_a_child_started_from_a_worker_thread_outlives_that_thread(tmp_path: Path) -> None:
    # PR_SET_PDEATHSIG fires when the *forking thread* ends: a child started from a short-lived
    # worker (asyncio.to_thread) must still live as long as the process, and stop with the group.
    import threading

    with ProcessGroup(tmp_path) as group:
        started: list = []

        def worker() -> None:
            proc = group.start("from-worker", [PY, "-c", "print('up', flush=True); import time; time.sleep(60)"])
            group.wait_for_log(proc, "up")  # past the wrapper's prctl: the death signal is armed
            started.append(proc)

        t = threading.Thread(target=worker)
        t.start()
        t.join(30)
        (proc,) = started
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # a signal tied to the worker arrives within ms of its exit
            assert alive(proc.pid), "the child died with the thread that started it"
            time.sleep(0.05)
    assert proc.popen.returncode is not None


async def test_async_context_manager(tmp_path: Path) -> None:
    async with ProcessGroup(tmp_path) as group:
        proc = group.start("sleeper", [PY, "-c", "print('up', flush=True); import time; time.sleep(60)"])
        await group.await_until(proc, lambda: "up" in proc.log_text(), timeout=10, what="printing up")
    assert proc.popen.returncode is not None


def test_temporary_log_dir_is_removed() -> None:
    group = ProcessGroup()
    with group:
        proc = group.start("echo", [PY, "-c", "print('hi')"])
        group.wait_for_log(proc, "hi")
    assert not group.log_dir.exists()


def test_ports_and_probes() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    closed = free_port()
    assert not http_ok(f"http://127.0.0.1:{closed}/")
    assert not grpc_health_serving(f"127.0.0.1:{closed}", timeout=0.5)


def test_cpu_seconds_counts_the_process_group(tmp_path: Path) -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint('done', flush=True)\ntime.sleep(60)"
    with ProcessGroup(tmp_path) as group:
        proc = group.start("burner", [PY, "-c", burn])
        group.wait_for_log(proc, "done", timeout=20)
        assert proc.cpu_seconds() >= 0.25


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        group.start("same", [PY, "-c", "import time; time.sleep(60)"])
        with pytest.raises(ValueError, match="already started"):
            group.start("same", [PY, "-c", "pass"])
    assert os.listdir(tmp_path)  # the log stayed (an explicit log_dir is kept)

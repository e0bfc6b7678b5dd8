"""A small process manager for benchmarks and the demo.

``ProcessGroup`` starts child processes (sim fleet, EPP, Envoy, peer routers), waits until
each is ready, and always stops them: on normal exit, on an exception, on Ctrl-C and on
SIGTERM. Children run in their own session so a terminal Ctrl-C reaches only us and we stop
them in reverse start order (Envoy before the EPP before the model servers); on Linux they
also get ``PR_SET_PDEATHSIG`` so even a SIGKILLed parent does not leave orphans behind. Any
thread may start children (one long-lived thread forks them all, see ``_Spawner``).

Every child writes stdout+stderr to a log file (pipes would fill and block it); readiness
checks tail that file or probe a port, and fail fast with the log tail when the child dies.

Usage::

    with ProcessGroup(log_dir) as group:
        sim = group.start("sim", [sys.executable, "-m", "epp.sim", "--ports", "8001"])
        group.wait_for_log(sim, r"sim ready name=(\\S+) url=(\\S+)", count=1)
        ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

__all__ = [
    "ManagedProcess",
    "ProcessFailed",
    "ProcessGroup",
    "free_port",
    "free_ports",
    "grpc_health_serving",
    "http_ok",
]

_LOG_TAIL_BYTES = 4000
_POLL_S = 0.05


class ProcessFailed(RuntimeError):
    """A child exited early or did not become ready; the message carries its log tail."""


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, nbytes: int = _LOG_TAIL_BYTES) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - nbytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def cpu_seconds(self) -> float:
        """User+system CPU used so far by every live process in the child's process group.

        The child leads its own group (start_new_session), so this includes helpers it spawned.
        Returns what it can read; processes that exit between listing and reading are skipped.
        """
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
            if not entry.name.isdigit():
                continue
            try:
                # Fields after "(comm)": state ppid pgrp ... utime(12th) stime(13th).
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.pid:
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def describe_failure(self, what: str) -> str:
        rc = self.popen.poll()
        state = f"exited with code {rc}" if rc is not None else "still running"
        cmd = " ".join(self.argv)
        return f"{self.name} {what} ({state}); command: {cmd}\n--- last log lines ({self.log_path}) ---\n{self.log_tail()}"


# -- ports -------------------------------------------------------------------------------------

_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``, never the same one twice in this process.

    There is an unavoidable window between closing the probe socket and the child binding it;
    remembering handed-out ports at least stops us racing ourselves.
    """
    with _ports_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("could not find a free port")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    return [free_port(host) for _ in range(n)]


# -- readiness probes (each returns True when ready; never raises on connection errors) --------


def http_ok(url: str, timeout: float = 1.0, expect: Callable[[int, bytes], bool] | None = None) -> bool:
    """True when GET ``url`` answers 2xx (and ``expect(status, body)`` if given)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URLs we built
            body = resp.read()
            status = resp.status
    except (urllib.error.URLError, OSError, ValueError):
        return False
    if not 200 <= status < 300:
        return False
    return expect(status, body) if expect else True


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# grpc.health.v1.HealthCheckResponse{status: SERVING} on the wire: field 1 (varint) = 1.
_HEALTH_SERVING = b"\x08\x01"


def grpc_health_serving(target: str, service: str = "", timeout: float = 1.0) -> bool:
    """True when ``grpc.health.v1.Health/Check`` on ``target`` (host:port, plaintext) says SERVING.

    Hand-encodes the tiny request so we need no grpcio-health-checking dependency.
    """
    import grpc  # local import: only probes that need it pay for it

    svc = service.encode()
    request = (b"\x0a" + bytes([len(svc)]) + svc) if svc else b""
    try:
        with grpc.insecure_channel(target) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            return check(request, timeout=timeout) == _HEALTH_SERVING
    except grpc.RpcError:
        return False


# -- the group ---------------------------------------------------------------------------------


# Set in a fresh, single-threaded interpreter which then execs the real command: a
# ``preexec_fn`` would run Python code between fork and exec in a copy of *this* process,
# and with other threads alive (asyncio.to_thread, aiohttp resolvers) that can deadlock on
# a lock some thread held at fork time. Popen then blocks forever; we saw exactly that.
_PDEATHSIG_EXEC = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):  # the parent died before prctl: no signal will come\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _with_pdeathsig(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so the kernel SIGTERMs the child when the thread that forked it dies.

    That is the *thread*, not the process (PR_SET_PDEATHSIG follows the forking thread), so
    every child is forked by ``_SPAWNER``'s one thread, which lives as long as the process.
    Linux only; elsewhere ``argv`` is returned unchanged.
    """
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-I", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *argv]


class _Spawner:
    """One daemon thread that forks every child, whichever thread asks.

    A child started from a worker thread (``asyncio.to_thread``, a thread pool) would otherwise
    get its death signal when that thread ends, long before the process does. The daemon
    thread ends only with the process, which is exactly when the children should go.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue | None = None  # (make, future) pairs
        self._thread: threading.Thread | None = None

    def popen(self, make: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        """Run ``make`` (a ``subprocess.Popen(...)`` call) on the spawner thread; its result or error."""
        if not sys.platform.startswith("linux"):
            return make()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, args=(self._jobs,), name="epp-procs-spawner",
                                                daemon=True)
                self._thread.start()
            jobs = self._jobs
        assert jobs is not None
        done: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        jobs.put((make, done))
        return done.result()

    @staticmethod
    def _run(jobs: queue.SimpleQueue) -> None:
        while True:
            make, done = jobs.get()
            try:
                done.set_result(make())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)


_SPAWNER = _Spawner()


class ProcessGroup:
    """Start, probe and always stop a set of child processes.

    Use as ``with`` or ``async with``. ``log_dir`` keeps the logs (one ``<name>.log`` per
    child); without it a temporary directory is used and removed on exit.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, stop_timeout: float = 5.0) -> None:
        self._own_tmp = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="epp-procs-")) if log_dir is None else Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stop_timeout = stop_timeout
        self.processes: list[ManagedProcess] = []
        self._old_sigterm: signal.Handlers | Callable[[int, FrameType | None], object] | int | None = None
        self._sigterm_installed = False

    # context manager protocol ------------------------------------------------------------

    def __enter__(self) -> "ProcessGroup":
        self._install_sigterm()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> "ProcessGroup":
        return self.__enter__()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        # Stopping blocks for at most stop_timeout per child; run it off the loop so other
        # tasks (progress bars, client cleanups) keep going meanwhile.
        await asyncio.to_thread(self.stop_all)
        self._finish()

    def _install_sigterm(self) -> None:
        # SIGTERM to us becomes SystemExit so the with-block unwinds and stops the children.
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
        self._sigterm_installed = True

    def _finish(self) -> None:
        if self._sigterm_installed:
            signal.signal(signal.SIGTERM, self._old_sigterm or signal.SIG_DFL)
            self._sigterm_installed = False
        if self._own_tmp:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def close(self) -> None:
        """Stop every child and restore signal handling. Safe to call more than once."""
        try:
            self.stop_all()
        finally:
            self._finish()

    # starting ----------------------------------------------------------------------------

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` with its output in ``<log_dir>/<name>.log``. Names must be unique."""
        if any(p.name == name for p in self.processes):
            raise ValueError(f"a process named {name!r} was already started in this group")
        if shutil.which(argv[0]) is None:  # fail here, not as a traceback in the child's log
            raise FileNotFoundError(f"cannot start {name}: {argv[0]!r} not found")
        log_path = self.log_dir / f"{name}.log"
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"  # readiness lines must reach the log file at once
        if env:
            full_env.update(env)
        with log_path.open("wb") as log:
            popen = _SPAWNER.popen(lambda: subprocess.Popen(  # noqa: S603 - argv built by our code
                _with_pdeathsig(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            ))
        proc = ManagedProcess(name=name, argv=list(argv), popen=popen, log_path=log_path)
        self.processes.append(proc)
        return proc

    # waiting -----------------------------------------------------------------------------

    def wait_until(self, proc: ManagedProcess, probe: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll ``probe`` until it returns True; raise ProcessFailed if ``proc`` dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if probe():
                return
            if not proc.alive:
                raise ProcessFailed(proc.describe_failure(f"exited before {what}"))
            if time.monotonic() >= deadline:
                raise ProcessFailed(proc.describe_failure(f"not {what} after {timeout:.0f}s"))
            time.sleep(_POLL_S)

    def wait_for_http(self, proc: ManagedProcess, url: str, *, timeout: float = 30.0,
                      expect: Callable[[int, bytes], bool] | None = None) -> None:
        self.wait_until(proc, lambda: http_ok(url, expect=expect), timeout=timeout, what=f"answering {url}")

    def wait_for_tcp(self, proc: ManagedProcess, host: str, port: int, *, timeout: float = 30.0) -> None:
        self.wait_until(proc, lambda: tcp_open(host, port), timeout=timeout, what=f"listening on {host}:{port}")

    def wait_for_grpc_health(self, proc: ManagedProcess, target: str, *, timeout: float = 30.0) -> None:
        self.wait_until(proc, lambda: grpc_health_serving(target), timeout=timeout,
                        what=f"SERVING on gRPC health {target}")

    def wait_for_log(self, proc: ManagedProcess, pattern: str, *, count: int = 1,
                     timeout: float = 30.0) -> list[re.Match[str]]:
        """Wait until ``pattern`` matched ``count`` lines of the child's log; return the matches."""
        rx = re.compile(pattern)
        found: list[re.Match[str]] = []

        def probe() -> bool:
            found[:] = [m for line in proc.log_text().splitlines() if (m := rx.search(line))]
            return len(found) >= count

        self.wait_until(proc, probe, timeout=timeout, what=f"printing {count} line(s) matching {pattern!r}")
        return found[:count]

    async def await_until(self, proc: ManagedProcess, probe: Callable[[], bool], *, timeout: float, what: str) -> None:
        """``wait_until`` without blocking the event loop (the probe runs in a worker thread)."""
        await asyncio.to_thread(self.wait_until, proc, probe, timeout=timeout, what=what)

    # stopping ----------------------------------------------------------------------------

    def stop(self, proc: ManagedProcess) -> int | None:
        """SIGTERM the child's process group, SIGKILL after ``stop_timeout``; return its exit code.

        The child leads its own process group (start_new_session), whose id is its pid. We signal
        the whole group so helpers it spawned go too, and only *reap* the leader afterwards: an
        unreaped zombie keeps its pid reserved, so the group id cannot name someone else's
        processes while we signal it.
        """
        if proc in self.processes:
            self.processes.remove(proc)
        popen = proc.popen
        if popen.returncode is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(popen.pid, sig)
                if self._wait_exit_unreaped(popen, self.stop_timeout):
                    break
            # Leftover group members (the leader is a zombie now, so the group id is still ours).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(self.stop_timeout)
        return popen.returncode

    def kill(self, proc: ManagedProcess, sig: int = signal.SIGKILL) -> int | None:
        """Crash the child: ``sig`` (SIGKILL by default) to its process group, no grace period;
        returns its exit code. For fault tests and benchmarks; ``stop`` is the polite way."""
        if proc in self.processes:
            self.processes.remove(proc)
        popen = proc.popen
        if popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(self.stop_timeout)
        return popen.returncode

    @staticmethod
    def _wait_exit_unreaped(popen: subprocess.Popen[bytes], timeout: float) -> bool:
        """Wait until the child has exited, without reaping it (waitid WNOWAIT)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # already reaped elsewhere
                return True
            if info is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def stop_all(self) -> None:
        """Stop children in reverse start order; keep going if one of them misbehaves."""
        errors: list[str] = []
        while self.processes:
            proc = self.processes.pop()
            try:
                self.stop(proc)
            except Exception as exc:  # noqa: BLE001 - stopping the rest matters more
                errors.append(f"{proc.name}: {exc}")
        if errors:
            print("warning: problems while stopping processes: " + "; ".join(errors), file=sys.stderr)

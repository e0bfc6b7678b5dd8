"""`epp bench chaos`: what faults cost the clients, measured through a real Envoy and the EPP.

Scenarios (each on its own fresh stack on 127.0.0.1):

- ``crash``: three ``epp sim`` servers (one process each) behind Envoy (``envoy/envoy.yaml``,
  the upstream full-duplex shape) and the EPP, 40 req/s of short completions. One server is
  killed with SIGKILL; we count the failed requests among those in flight at the kill and
  among those sent in the 5 s after it, then restart the server on the same port and time
  how long after it is ready it serves a request again.

    run_chaos_bench(Path("bench-results/chaos"), smoke=True)  -> dict, plus result.json/summary.md
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from epp.bench.chaosload import RequestLog, send_at_rate
from epp.bench.procs import ManagedProcess, ProcessGroup, free_port
from epp.bench.report import markdown_table, write_json
from epp.bench.stacks import SIM_READY, start_envoy_template, start_epp

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def completion(i: int, max_tokens: int = 16) -> bytes:
    """A short, distinct completion (no shared prefix, so no cache affinity pins a server)."""
    return json.dumps({"model": MODEL, "prompt": f"request {i}: tell me something new", "max_tokens": max_tokens,
                       "seed": i}).encode()


# -- a fleet whose members can crash ------------------------------------------------------------

@dataclass
class SimServer:
    name: str
    port: int
    proc: ManagedProcess
    restarts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _sim_argv(name: str, port: int, extra: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "epp", "sim", "--ports", str(port), "--name", name, *extra]


def start_sims(group: ProcessGroup, count: int, *, prefix: str = "sim", timeout: float = 30.0,
               extra: Sequence[str] = ()) -> list[SimServer]:
    """``count`` ``epp sim`` servers, one process each (so one can be killed alone), started in
    parallel on free ports of 127.0.0.1."""
    sims = []
    for i in range(count):
        name, port = f"{prefix}-{i}", free_port()
        sims.append(SimServer(name, port, group.start(f"{name}-0", _sim_argv(name, port, extra))))
    for sim in sims:
        _wait_ready(group, sim, timeout)
    return sims


def respawn_sim(group: ProcessGroup, sim: SimServer, *, extra: Sequence[str] = ()) -> SimServer:
    """Start ``sim`` again on its port (after it was killed), without waiting for it.

    Call it from the main thread: children get PR_SET_PDEATHSIG from the thread that starts
    them (see ``ProcessGroup``), so one started from a worker thread dies with that thread.
    """
    n = sim.restarts + 1
    return SimServer(sim.name, sim.port, group.start(f"{sim.name}-{n}", _sim_argv(sim.name, sim.port, extra)), n)


def restart_sim(group: ProcessGroup, sim: SimServer, *, timeout: float = 30.0,
                extra: Sequence[str] = ()) -> SimServer:
    """``respawn_sim`` and wait until it accepts connections (blocks)."""
    again = respawn_sim(group, sim, extra=extra)
    _wait_ready(group, again, timeout)
    return again


async def sim_ready(group: ProcessGroup, sim: SimServer, timeout: float = 30.0) -> None:
    """Wait for a (re)started server without blocking the event loop."""
    await asyncio.to_thread(_wait_ready, group, sim, timeout)


def _wait_ready(group: ProcessGroup, sim: SimServer, timeout: float) -> None:
    group.wait_for_log(sim.proc, SIM_READY, timeout=timeout)
    group.wait_for_tcp(sim.proc, "127.0.0.1", sim.port, timeout=timeout)


# -- the crash scenario -------------------------------------------------------------------------

@dataclass
class CrashSettings:
    rate: float = 40.0
    servers: int = 3
    warmup: float = 3.0  # seconds of load before the kill
    window: float = 5.0  # failures are counted among requests sent this long after the kill
    after_restart: float = 3.0  # seconds of load after the restarted server is ready
    max_tokens: int = 16
    envoy_template: str = "envoy.yaml"


def _ms(t: float | None) -> float | None:
    return None if t is None else round(t * 1e3, 1)


async def _crash_run(group: ProcessGroup, s: CrashSettings, epp_extra: Sequence[str] = ()) -> dict[str, Any]:
    sims = start_sims(group, s.servers)
    epp = start_epp(group, [x.address for x in sims], extra=list(epp_extra))
    envoy = start_envoy_template(group, s.envoy_template, backends=[x.address for x in sims], epp_port=epp.grpc_port)
    url = envoy.url + "/v1/completions"
    log = RequestLog()
    stop = asyncio.Event()
    load = asyncio.get_running_loop().create_task(
        send_at_rate(log, url, lambda i: completion(i, s.max_tokens), rate=s.rate, until=stop.is_set))
    victim = sims[0]
    marks: dict[str, float] = {}
    try:
        await asyncio.sleep(s.warmup)
        marks["kill"] = time.monotonic()
        group.kill(victim.proc)
        await asyncio.sleep(s.window)
        marks["restart"] = time.monotonic()
        await sim_ready(group, respawn_sim(group, victim))
        marks["ready"] = time.monotonic()
        await asyncio.sleep(s.after_restart)
    finally:
        stop.set()
        await load
    kill, ready = marks["kill"], marks["ready"]
    in_flight = log.in_flight_at(kill)
    after = log.between(kill, kill + s.window)
    first = log.first_served_by(victim.address, ready)
    errors = sorted({r.error.split(". reset reason")[0][:80] for r in log.requests if not r.ok})
    return {
        "sent": len(log.requests),
        "in_flight_at_kill": len(in_flight),
        "in_flight_failed": sum(1 for r in in_flight if not r.ok),
        "in_flight_to_victim": sum(1 for r in in_flight if not r.ok or r.server == victim.address),
        "sent_after_kill": len(after),
        "failed_after_kill": sum(1 for r in after if not r.ok),
        "failed_after_kill_offsets_ms": [_ms(r.sent - kill) for r in after if not r.ok],
        "failed_total": sum(1 for r in log.requests if not r.ok),
        "restart_to_ready_ms": _ms(ready - marks["restart"]),
        "back_in_rotation_ms": _ms(first.sent - ready) if first is not None else None,
        "served_by_victim_after_ready": sum(1 for r in log.requests if r.sent >= ready and r.server == victim.address),
        "errors": errors,
    }


# -- the benchmark ------------------------------------------------------------------------------

def run_chaos_bench(out_dir: Path, smoke: bool = False, runs: int | None = None) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = CrashSettings(warmup=1.5, window=2.0, after_restart=1.5) if smoke else CrashSettings()
    n = runs if runs is not None else (1 if smoke else 3)
    crash = []
    for k in range(n):
        with ProcessGroup(out_dir / "logs" / f"crash-{k}") as group:
            crash.append(asyncio.run(_crash_run(group, s)))
    result = {"settings": {"crash": s.__dict__}, "crash": crash, "smoke": smoke}
    write_json(out_dir / "result.json", result)
    (out_dir / "summary.md").write_text(summary_markdown(result))
    return result


def summary_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]["crash"]
    rows = []
    for i, r in enumerate(result["crash"]):
        rows.append([i + 1, f"{r['in_flight_failed']}/{r['in_flight_at_kill']}",
                     f"{r['failed_after_kill']}/{r['sent_after_kill']}", r["back_in_rotation_ms"],
                     r["restart_to_ready_ms"]])
    lines = [
        "# Faults (`epp bench chaos`)",
        "",
        f"## A model server crashes (SIGKILL), {s['servers']} `epp sim` servers behind `{s['envoy_template']}` "
        f"+ the EPP at {s['rate']:g} req/s",
        "",
        markdown_table(["run", "failed of in flight at the kill", f"failed of sent in the {s['window']:g} s after",
                        "back in rotation after ready (ms)", "restart to ready (ms)"], rows),
    ]
    return "\n".join(lines) + "\n"

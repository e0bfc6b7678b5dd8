"""The command line (as a subprocess, the way other tools start it) and the fleet API."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys

import aiohttp
import pytest

from epp.sim import SERVER_HEADER, SimConfig, SimFleet, start_fleet
from epp.sim.cli import add_arguments, build_fleet

READY = re.compile(r"^sim ready name=(\S+) url=(\S+)")


async def test_subprocess_ready_lines_serve_and_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp.sim", "--ports", "0,0", "--time-scale", "0.1", "--speed", "1,0.5",
        "--lora-adapters", "x,y", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        servers = []
        while len(servers) < 2:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, (await proc.stderr.read()).decode()
            match = READY.match(line.decode())
            if match:
                servers.append((match[1], match[2]))
        assert [name for name, _ in servers] == ["sim-0", "sim-1"]
        async with aiohttp.ClientSession() as s:
            for name, url in servers:
                body = {"model": "x", "prompt": "hello", "max_tokens": 2}
                async with s.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    assert r.headers[SERVER_HEADER] == name
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
        assert b"sim stopped" in await proc.stdout.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_map_to_per_server_configs() -> None:
    fleet = build_fleet(parse("--port", "9001", "--count", "3", "--speed", "1,1,0.5", "--max-num-seqs", "8",
                              "--lora-adapters", "a,b", "--lora-load-ms", "20", "--time-scale", "0.5",
                              "--engine-flavor", "sglang", "--served-model-name", "m1", "m2"))
    assert fleet.ports == [9001, 9002, 9003]
    configs = [s.config for s in fleet.servers]
    assert [c.speed for c in configs] == [1, 1, 0.5]
    assert [c.name for c in configs] == ["sim-0", "sim-1", "sim-2"]
    assert len({c.seed for c in configs}) == 3
    c = configs[0]
    assert (c.max_num_seqs, c.lora_adapters, c.lora_load_s, c.time_scale) == (8, ("a", "b"), 0.02, 0.5)
    assert c.engine_flavor == "sglang" and c.served_model_names == ("m1", "m2")


def test_bad_flags_are_rejected() -> None:
    with pytest.raises(ValueError):
        build_fleet(parse("--ports", "0,0", "--speed", "1,2,3"))
    with pytest.raises(ValueError):
        build_fleet(parse("--num-gpu-blocks", "10"))  # cannot hold one max_model_len sequence


async def test_start_fleet_binds_free_ports_and_stops_in_flight_requests() -> None:
    fleet = await start_fleet([0, 0, 0], SimConfig(time_scale=0.1))
    try:
        assert len(set(fleet.ports)) == 3 and all(p > 0 for p in fleet.ports)
        assert fleet.by_name("sim-2").url == fleet.urls[2]
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "x", "max_tokens": 5000, "ignore_eos": True}
            pending = asyncio.create_task(s.post(fleet.urls[0] + "/v1/completions", json=body))
            await asyncio.sleep(0.2)
            await fleet.stop()
            resp = await asyncio.wait_for(pending, timeout=10)
            assert resp.status == 503  # aborted by shutdown, not left hanging
            resp.release()
    finally:
        await fleet.stop()


async def test_fleet_context_manager_releases_ports() -> None:
    async with SimFleet([0], SimConfig(time_scale=0.1)) as fleet:
        port = fleet.ports[0]
    # The port is free again: a new server can bind it.
    async with SimFleet([port], SimConfig(time_scale=0.1)) as again:
        assert again.ports == [port]


def test_calibration_script_runs(capsys) -> None:
    from epp.sim import calibrate

    # Tiny and 10x faster: this only checks the script works end to end.
    assert calibrate.main(["--repeats", "1", "--duration", "1", "--", "--time-scale", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "Inter-token latency, batch 32" in out
    assert "Max throughput" in out


async def test_port_in_use_fails_cleanly() -> None:
    async with SimFleet([0], SimConfig(time_scale=0.1)) as first:
        clash = SimFleet([0, first.ports[0]], SimConfig(time_scale=0.1))
        with pytest.raises(OSError):
            await clash.start()
        assert not any(s.engine.is_running for s in clash.servers)


def test_names_flag_names_each_server_and_must_match_the_port_count():
    fleet = build_fleet(parse("--ports", "0,0", "--name", "vllm-mock-1,vllm-mock-2"))
    assert [s.name for s in fleet.servers] == ["vllm-mock-1", "vllm-mock-2"]
    with pytest.raises(ValueError, match="2 names for 3 servers"):
        build_fleet(parse("--ports", "0,0,0", "--name", "a,b"))

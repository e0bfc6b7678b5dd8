"""Faults through the real Envoy, the EPP and ``epp sim`` servers (one process each).

- A model server is killed (SIGKILL) with streams in flight: they end with a clear error,
  the EPP's in-flight counts return to zero, later requests are not sent to the dead server
  (at most the one request that revealed it), and the restarted server gets traffic again.
- The EPP is killed and restarted under load: behind ``envoy-buffered.yaml`` no request fails
  (fail-open), behind ``envoy.yaml`` requests fail only while it is down (fail-closed).

Numbers (how many requests a crash costs at 40 req/s, how fast a server is back) come from
``epp bench chaos``, not from here.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import aiohttp
import pytest
from epp_configs import RANDOM_PICKER

from epp.bench.chaosload import RequestLog, send_at_rate
from epp.bench.chaos import MODEL, completion, respawn_sim, sim_ready, start_sims
from epp.bench.loadgen import SERVER_ADDRESS_HEADER

pytestmark = pytest.mark.envoy

RANDOM = RANDOM_PICKER


@pytest.fixture(scope="module")
def fleet(procs):
    return start_sims(procs, 3, prefix="fault")


@pytest.fixture(scope="module")
def stack(fleet, epp_launcher, envoy_launcher):
    epp = epp_launcher([s.address for s in fleet], config_text=RANDOM, extra=["--refresh-metrics-interval", "50ms"])
    duplex = envoy_launcher("envoy.yaml", epp_port=epp.grpc_port)
    buffered = envoy_launcher("envoy-buffered.yaml", epp_port=epp.grpc_port, fallback_endpoints=[s.address for s in fleet])
    return epp, duplex, buffered


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str, str]:
    """(status, served-by, error text) of one request; transport errors have status 0."""
    try:
        async with session.post(url + "/v1/completions", data=body,
                                headers={"content-type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=30)) as resp:
            text = (await resp.read()).decode(errors="replace")
            return resp.status, resp.headers.get(SERVER_ADDRESS_HEADER, ""), "" if resp.status == 200 else text
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return 0, "", f"{type(e).__name__}: {e}"


async def _stream(session: aiohttp.ClientSession, url: str, started: asyncio.Queue) -> tuple[str, str]:
    """A long streamed completion: (served-by, how it ended: "done" or the client's error)."""
    body = json.dumps({"model": MODEL, "prompt": "a long story", "max_tokens": 3000, "stream": True,
                       "ignore_eos": True}).encode()
    server = ""
    try:
        async with session.post(url + "/v1/completions", data=body, headers={"content-type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=120)) as resp:
            server = resp.headers.get(SERVER_ADDRESS_HEADER, "")
            await started.put(server)
            async for _ in resp.content:
                pass
            return server, "done"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return server, f"{type(e).__name__}: {e}"


def _debug(epp: Any) -> dict[str, Any]:
    return epp.get_json("/debug/endpoints")


def _running(epp: Any) -> float:
    total = 0.0
    for line in epp.metrics_text().splitlines():
        if line.startswith("inference_objective_running_requests{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_server_killed_mid_stream(procs, fleet, stack):
    epp, duplex, _ = stack
    victim = fleet[0]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            # Streams on every server (random picks: start until the victim has two).
            started: asyncio.Queue = asyncio.Queue()
            streams, on_victim = [], 0
            while on_victim < 2:
                streams.append(asyncio.create_task(_stream(session, duplex.url, started)))
                on_victim += (await asyncio.wait_for(started.get(), 30)) == victim.address
            assert _debug(epp)["in_flight"] == len(streams)

            procs.kill(victim.proc)
            # The victim's streams end at once, with an error the client sees (a cut chunked body);
            # the others keep streaming.
            await _wait(lambda: sum(1 for s in streams if s.done()) >= on_victim, 10, "the victim's streams to end")
            for s in streams:
                if s.done():
                    server, how = s.result()
                    assert server == victim.address and how != "done", (server, how)
                    assert "payload is not completed" in how or "ServerDisconnected" in how, how

            # Sequential requests: the EPP hears of a refused connection (Envoy's local 503 on the
            # response path) before the client does, so at most one of them fails.
            outcomes = [await _post(session, duplex.url, completion(i, 2)) for i in range(30)]
            failed = [o for o in outcomes if o[0] != 200]
            assert len(failed) <= 1, failed
            for status, _, text in failed:
                assert status == 503 and "upstream connect error" in text
            assert all(server != victim.address for status, server, _ in outcomes if status == 200)
            row = next(r for r in _debug(epp)["endpoints"] if r["endpoint"] == victim.address)
            assert not row["reachable"] or row["excluded"]

            # The other streams were not disturbed; cancel them, and every count returns to zero.
            for s in streams:
                s.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            await _wait(lambda: _debug(epp)["in_flight"] == 0 and _running(epp) == 0, 10, "in-flight counts at zero")

            # Restarted on its port, it is back in rotation.
            fleet[0] = respawn_sim(procs, victim)  # from this (the main) thread: see respawn_sim
            await sim_ready(procs, fleet[0])
            served = set()
            deadline = time.monotonic() + 20
            while victim.address not in served and time.monotonic() < deadline:
                status, server, text = await _post(session, duplex.url, completion(0, 2))
                assert status == 200, text
                served.add(server)
            assert victim.address in served

    asyncio.run(scenario())


def test_the_proxy_reports_an_endpoint_it_cannot_reach_before_any_scrape(fleet, port, epp_launcher, envoy_launcher):
    # EPPs that will not scrape within the test, so only the request path can notice that nobody
    # listens at the fourth endpoint; one per Envoy config (each learns it once).
    dead = f"127.0.0.1:{port}"
    extra = ["--refresh-metrics-interval", "1h", "--collector-mode", "inprocess"]
    epps = [epp_launcher([*(s.address for s in fleet), dead], config_text=RANDOM, extra=extra, wait=False)
            for _ in range(2)]
    for epp in epps:
        epp.wait_ready()
    envoys = [envoy_launcher("envoy.yaml", epp_port=epps[0].grpc_port),
              envoy_launcher("envoy-buffered.yaml", epp_port=epps[1].grpc_port,
                             fallback_endpoints=[s.address for s in fleet])]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            for epp, envoy in zip(epps, envoys):
                first_failure = None
                for i in range(60):  # random picks over 4 endpoints: the dead one comes up soon
                    status, server, text = await _post(session, envoy.url, completion(i, 2))
                    if status != 200:
                        first_failure = (status, text)
                        break
                assert first_failure is not None and first_failure[0] == 503, (envoy.config, first_failure)
                row = next(r for r in _debug(epp)["endpoints"] if r["endpoint"] == dead)
                assert row["excluded"] and row["reachable"]  # the request path, not the collector
                for i in range(20):
                    status, server, text = await _post(session, envoy.url, completion(i, 2))
                    assert status == 200 and server != dead, (status, text)
                assert ('epp_endpoint_exclusions_total{endpoint="%s",name="",reason="proxy-connect-failure"} 1.0'
                        % dead) in epp.metrics_text()

    asyncio.run(scenario())


def test_the_epp_restarted_under_load(procs, stack):
    epp, duplex, buffered = stack
    logs = {"duplex": RequestLog(), "buffered": RequestLog()}
    marks: dict[str, float] = {}

    async def scenario() -> None:
        stop = asyncio.Event()
        load = [asyncio.create_task(send_at_rate(logs[name], envoy.url + "/v1/completions",
                                                 lambda i: completion(i, 2), rate=20, until=stop.is_set))
                for name, envoy in (("duplex", duplex), ("buffered", buffered))]
        await asyncio.sleep(1.0)
        marks["kill"] = time.monotonic()
        procs.kill(epp.proc)
        await asyncio.sleep(1.0)
        epp.proc = procs.start(f"{epp.proc.name}-restarted", epp.argv)  # main thread: see respawn_sim
        await asyncio.to_thread(epp.wait_ready)
        marks["ready"] = time.monotonic()
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*load)

    asyncio.run(scenario())
    kill, ready = marks["kill"], marks["ready"]
    buffered_failed = [r for r in logs["buffered"].requests if not r.ok]
    assert not buffered_failed, buffered_failed  # fail-open: round-robin while the EPP is away
    assert len(logs["buffered"].between(kill, ready)) >= 10
    duplex_failed = [r for r in logs["duplex"].requests if not r.ok]
    assert duplex_failed  # fail-closed: no pick, no request ...
    assert all(kill - 0.5 <= r.sent <= ready + 0.5 for r in duplex_failed)  # ... but only while it is down
    assert {r.status for r in duplex_failed} == {503}  # status_on_error, not a bare 500
    assert logs["duplex"].between(ready + 0.5, float("inf"), failed=False)


def test_stock_envoy_rejects_a_fallback_list(fleet, epp_launcher, envoy_launcher):
    """Why ``--destination-fallbacks`` is off by default: stock Envoy's ORIGINAL_DST cluster reads
    ``x-gateway-destination-endpoint`` as one address, and the protocol's list fails every request
    with a 503 (UH, counted as ``original_dst_host_invalid``) instead of trying the fallbacks."""
    addresses = [s.address for s in fleet]
    epp = epp_launcher(addresses, config_text=RANDOM, extra=["--destination-fallbacks", "1"])
    envoy = envoy_launcher("envoy.yaml", epp_port=epp.grpc_port)

    async def scenario() -> list[tuple[int, str, str]]:
        async with aiohttp.ClientSession() as session:
            return [await _post(session, envoy.url, completion(i, 2)) for i in range(3)]

    results = asyncio.run(scenario())
    assert [status for status, _, _ in results] == [503] * 3, results
    assert all(server == "" for _, server, _ in results)  # no model server saw them
    picks = [d["pick"] for d in epp.get_json("/debug/decisions")["decisions"]]
    assert all(len(p.split(",")) == 2 and set(p.split(",")) <= set(addresses) for p in picks), picks
    assert not any(row["excluded"] for row in _debug(epp)["endpoints"])  # Envoy refused the list, not them
    assert "no healthy upstream" in results[0][2]
    with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/stats?filter=original_dst_host_invalid",
                                timeout=5) as r:
        stats = r.read().decode()
    assert "cluster.original_dst.original_dst_host_invalid: 3" in stats, stats

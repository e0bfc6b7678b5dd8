"""The open-loop load generator against real sim servers on 127.0.0.1."""

from __future__ import annotations

import random

import aiohttp

from epp.bench import workloads as w
from epp.bench.loadgen import run_workload
from epp.bench.quality import parse_sim_counters
from epp.sim.config import SimConfig
from epp.sim.fleet import SimFleet

SCALE = 0.05  # wall seconds per model second: fast, ratios intact


def _workload(requests: list[w.BenchRequest]) -> w.Workload:
    return w.Workload(name="t", description="t", requests=tuple(requests), duration=1.0, rate=1.0)


async def test_streams_are_timed_and_counted() -> None:
    rng = random.Random(0)
    system = w.text_of_tokens(rng, 600, lead="[tenant] ")
    reqs = [
        w.BenchRequest(index=0, at=0.0, api="chat", model=w.DEFAULT_MODEL, max_tokens=12, prompt_tokens=620,
                       messages=({"role": "system", "content": system}, {"role": "user", "content": "first question"})),
        w.BenchRequest(index=1, at=2.0, api="chat", model=w.DEFAULT_MODEL, max_tokens=5, prompt_tokens=620,
                       messages=({"role": "system", "content": system}, {"role": "user", "content": "second question"})),
        w.BenchRequest(index=2, at=2.0, api="completions", model=w.DEFAULT_MODEL, max_tokens=7, prompt_tokens=50,
                       prompt=w.text_of_tokens(rng, 50)),
    ]
    async with SimFleet([0], SimConfig(time_scale=SCALE)) as fleet:
        results = await run_workload(fleet.urls[0], _workload(reqs), time_scale=SCALE)
        async with aiohttp.ClientSession() as http, http.get(fleet.urls[0] + "/metrics") as resp:
            counters = parse_sim_counters(await resp.text())
        address = fleet.urls[0].split("://")[1]
    assert [r.ok for r in results] == [True, True, True], [r.error for r in results]
    assert [r.output_tokens for r in results] == [12, 5, 7]
    for r in results:
        assert r.ttft is not None and r.e2e is not None and 0 < r.ttft <= r.e2e
        assert r.server == address and r.status == 200
    # The second chat shares the first one's system prompt: the server reports cached tokens.
    assert results[0].cached_tokens == 0 and (results[1].cached_tokens or 0) >= 600
    assert counters["requests"] == 3 and counters["prefix_hits"] >= 600 and counters["prefix_queries"] > 1200
    assert counters["lora_loads"] == 0 and counters["preemptions"] == 0


async def test_open_loop_does_not_wait_for_slow_requests() -> None:
    rng = random.Random(1)
    long_one = w.BenchRequest(index=0, at=0.0, api="completions", model=w.DEFAULT_MODEL, max_tokens=400,
                              prompt_tokens=20, prompt=w.text_of_tokens(rng, 20))
    short = [w.BenchRequest(index=i, at=0.5 * i, api="completions", model=w.DEFAULT_MODEL, max_tokens=2,
                            prompt_tokens=20, prompt=w.text_of_tokens(rng, 20)) for i in range(1, 4)]
    async with SimFleet([0], SimConfig(time_scale=SCALE)) as fleet:
        results = await run_workload(fleet.urls[0], _workload([long_one, *short]), time_scale=SCALE)
    assert all(r.ok for r in results)
    # The short ones were sent on schedule while the long one was still streaming.
    long_end = results[0].scheduled + (results[0].e2e or 0)
    assert all(r.scheduled + (r.e2e or 0) < long_end for r in results[1:])
    assert max(r.lag for r in results) < 0.5 * SCALE * 10


async def test_errors_are_recorded_not_raised() -> None:
    bad = w.BenchRequest(index=0, at=0.0, api="completions", model="no-such-model", max_tokens=2, prompt_tokens=1,
                         prompt="abcd")
    async with SimFleet([0], SimConfig(time_scale=SCALE)) as fleet:
        (res,) = await run_workload(fleet.urls[0], _workload([bad]), time_scale=SCALE)
    assert not res.ok and res.status == 404 and "no-such-model" in res.error
    (dead,) = await run_workload("http://127.0.0.1:9", _workload([bad]), time_scale=SCALE, request_timeout=5)
    assert not dead.ok and dead.status == 0 and "ClientConnectorError" in dead.error

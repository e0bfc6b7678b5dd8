"""Fixtures for the simulator tests.

Two ways to run the engine:

- ``virtual``: the pure scheduler driven by a fake clock, so physics checks are
  exact and immune to machine load;
- ``fleet`` / ``make_fleet``: real servers on free 127.0.0.1 ports, for wire
  tests and wall-clock checks (compare relative quantities only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from epp.sim.config import SimConfig
from epp.sim.fleet import SimFleet
from epp.sim.scheduler import Scheduler, SimRequest, Step
from epp.sim.tokenizer import block_hashes

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class VirtualEngine:
    """The scheduler with a model-time clock: each step advances ``now`` by its cost."""

    def __init__(self, **overrides: Any) -> None:
        overrides.setdefault("jitter", 0.0)
        self.config = SimConfig(**overrides)
        self.sched = Scheduler(self.config)
        self.now = 0.0
        self._n = 0

    def submit(self, prompt: list[int] | int, max_tokens: int = 16, lora: str | None = None) -> SimRequest:
        """Queue a sequence that generates exactly ``max_tokens`` (ignore_eos)."""
        ids = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
        model = lora or self.config.served_name
        self._n += 1
        req = SimRequest(f"v{self._n}", model, lora, len(ids), block_hashes(ids, self.config.block_size, 0, lora),
                         max_tokens, max_tokens, self.now, prompt_ids=ids)
        self.sched.add(req)
        return req

    def step(self) -> Step | None:
        step = self.sched.schedule(self.now)
        if step is not None:
            self.now += step.cost
            self.sched.complete(step, self.now)
        return step

    def run(self, max_steps: int = 1_000_000) -> None:
        """Step until there is no work left."""
        for _ in range(max_steps):
            if self.step() is None:
                return
        raise AssertionError("engine did not drain")

    def run_until(self, t: float) -> None:
        while self.now < t and self.sched.has_work():
            self.step()
        self.now = max(self.now, t)


@pytest.fixture
def virtual() -> Callable[..., VirtualEngine]:
    return VirtualEngine


def fast_config(**overrides: Any) -> SimConfig:
    """Test defaults: 10x faster than real time (a 10 ms step takes 1 ms)."""
    base = SimConfig(time_scale=0.1, lora_adapters=("adapter-a", "adapter-b"))
    return dataclasses.replace(base, **overrides)


@pytest.fixture
async def make_fleet() -> AsyncIterator[Callable[..., Awaitable[SimFleet]]]:
    """``await make_fleet(n, **config)``; every fleet started is stopped after the test."""
    fleets: list[SimFleet] = []

    async def make(count: int = 1, speeds: list[float] | None = None, **overrides: Any) -> SimFleet:
        fleet = SimFleet([0] * count, fast_config(**overrides), speeds=speeds)
        await fleet.start()
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        await fleet.stop()


@pytest.fixture
async def fleet(make_fleet: Callable[..., Awaitable[SimFleet]]) -> SimFleet:
    return await make_fleet(2)

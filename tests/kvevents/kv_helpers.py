"""Loopback addresses, ports and waiting for the KV-event tests."""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Callable

from waiting import wait_until

from epp.bench.procs import free_port


def random_loopback_block() -> str:
    """``127.a.b.`` for a random a, b: other helpers' tests run on this machine at the same time."""
    r = random.SystemRandom()
    return f"127.{r.randint(16, 250)}.{r.randint(0, 255)}."


def common_free_port(hosts: list[str]) -> int:
    """A port free on every host (pod-like fleets: same port, distinct addresses)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on all hosts")


async def published(pubs, cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait for ``cond``; meanwhile step every publisher with an empty batch.

    A SUB socket misses what its PUB sent before the subscription reached it (ZMQ's "slow
    joiner"), even after the TCP connection is up. The next batch shows the gap and the
    subscriber replays what it missed, as it would in production where engines keep stepping.
    """
    async def step() -> bool:
        if cond():
            return True
        for p in pubs:
            p.publish([])
        await asyncio.sleep(0.05)
        return cond()

    deadline = asyncio.get_running_loop().time() + timeout
    while not await step():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def eventually(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    await wait_until(cond, timeout, what)

"""Loopback addresses, ports and waiting for the KV-event tests."""

from __future__ import annotations

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


async def eventually(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    await wait_until(cond, timeout, what)

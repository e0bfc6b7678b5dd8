"""Measure one simulated server against published 8B-on-H100 numbers.

    python -m epp.sim.calibrate [--duration 15] [--repeats 10] [--url URL] [-- extra sim flags]

Starts ``python -m epp.sim`` on a free port in a subprocess (so the client's
CPU use does not slow the server's event loop), measures from the client side
over HTTP and prints a markdown table. Everything runs at ``--time-scale 1``:
these are the numbers a router sees in real time.

Measured:
- TTFT of a 256- and a 2048-token prompt, alone (batch 1) and while 31 other
  sequences are decoding (a full batch);
- inter-token latency at batch 1 and batch 32;
- maximum throughput: 64 closed-loop clients (queue never empty), 256-token
  prompts and 256-token outputs; output and total (prompt + output) tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

# Published ranges for a 7-8B model on one H100 (llm-d inference-sim latency
# profiles, docs/latency-profiles.md), as quoted by the issue.
RANGES = {
    "ttft_256_b1": (0.060, 0.120),
    "itl_b1": (0.010, 0.015),
    "itl_b32": (0.020, 0.030),
}

_READY = re.compile(r"^sim ready name=\S+ url=(\S+)")


@dataclass
class Stream:
    """Client-side view of one streamed completion."""

    ttft: float
    times: list[float]  # arrival of each token, seconds since the request was sent
    cached_tokens: int  # from the final usage chunk

    @property
    def itl(self) -> float:
        return (self.times[-1] - self.times[0]) / max(1, len(self.times) - 1)


def prompt(tag: str, tokens: int) -> str:
    """Exactly ``tokens`` sim tokens (4 bytes each) that share no cached block with other tags."""
    head = f"{tag[-8:]:>8}"
    return head + "abcd" * (tokens - 2)


async def stream(session: aiohttp.ClientSession, url: str, text: str, max_tokens: int,
                 model: str | None = None) -> Stream:
    """Stream one completion of exactly ``max_tokens`` tokens (ignore_eos), timing each token."""
    body: dict[str, object] = {"prompt": text, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                               "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    start = time.perf_counter()
    times: list[float] = []
    cached = -1
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            if b'"choices":[]' in line:  # the usage chunk
                cached = json.loads(line[6:])["usage"]["prompt_tokens_details"]["cached_tokens"]
            else:
                times.append(time.perf_counter() - start)
    return Stream(times[0], times, cached)


class Calibration:
    def __init__(self, url: str, repeats: int, duration: float) -> None:
        self.url = url
        self.repeats = repeats
        self.duration = duration
        self._n = 0

    def tag(self) -> str:
        self._n += 1
        return f"c{self._n:07d}"

    async def ttft(self, s: aiohttp.ClientSession, tokens: int) -> float:
        runs = [(await stream(s, self.url, prompt(self.tag(), tokens), 1)).ttft for _ in range(self.repeats)]
        return statistics.median(runs)

    async def with_full_batch(self, s: aiohttp.ClientSession, probe_tokens: Sequence[int]) -> dict[int, float]:
        """TTFT of probes while 31 long requests decode (the batch has one free seat)."""
        background = [asyncio.create_task(stream(s, self.url, prompt(self.tag(), 16), 4000)) for _ in range(31)]
        await asyncio.sleep(0.5)  # let them all reach decode
        out: dict[int, float] = {}
        for tokens in probe_tokens:
            out[tokens] = await self.ttft(s, tokens)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.sleep(0.2)  # let the server notice the disconnects
        return out

    async def itl(self, s: aiohttp.ClientSession, batch: int) -> float:
        runs = await asyncio.gather(*(stream(s, self.url, prompt(self.tag(), 16), 200) for _ in range(batch)))
        return statistics.median(r.itl for r in runs)

    async def throughput(self, s: aiohttp.ClientSession, clients: int = 64) -> tuple[float, float]:
        """(output tok/s, total tok/s) with a permanently non-empty queue."""
        deadline = time.perf_counter() + self.duration
        done = [0]

        async def client() -> None:
            while time.perf_counter() < deadline:
                await stream(s, self.url, prompt(self.tag(), 256), 256)
                done[0] += 1

        warmup = asyncio.gather(*(client() for _ in range(clients)))
        # Measure the middle of the run: skip the first quarter (ramp-up).
        await asyncio.sleep(self.duration / 4)
        start_done, t0 = done[0], time.perf_counter()
        await warmup
        elapsed = time.perf_counter() - t0
        finished = done[0] - start_done
        out_rate = finished * 256 / elapsed
        return out_rate, 2 * out_rate

    async def run(self) -> dict[str, float]:
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
            await stream(s, self.url, prompt("warmup", 16), 2)
            res = {
                "ttft_256_b1": await self.ttft(s, 256),
                "ttft_2048_b1": await self.ttft(s, 2048),
            }
            full = await self.with_full_batch(s, (256, 2048))
            res["ttft_256_b32"] = full[256]
            res["ttft_2048_b32"] = full[2048]
            res["itl_b1"] = await self.itl(s, 1)
            res["itl_b32"] = await self.itl(s, 32)
            res["throughput_out"], res["throughput_total"] = await self.throughput(s)
        return res


ROWS = (
    ("ttft_256_b1", "TTFT, 256-token prompt, batch 1", "ms"),
    ("ttft_2048_b1", "TTFT, 2048-token prompt, batch 1", "ms"),
    ("ttft_256_b32", "TTFT, 256-token prompt, 31 others decoding", "ms"),
    ("ttft_2048_b32", "TTFT, 2048-token prompt, 31 others decoding", "ms"),
    ("itl_b1", "Inter-token latency, batch 1", "ms"),
    ("itl_b32", "Inter-token latency, batch 32", "ms"),
    ("throughput_out", "Max throughput, output tokens/s (64 clients, 256 in / 256 out)", "tok/s"),
    ("throughput_total", "Max throughput, prompt + output tokens/s", "tok/s"),
)


def table(res: dict[str, float]) -> str:
    lines = ["| Measure | Sim | Published 8B / H100 | In range |", "|---|---|---|---|"]
    for key, label, unit in ROWS:
        value = res[key]
        shown = f"{value * 1e3:.1f} ms" if unit == "ms" else f"{value:.0f} tok/s"
        if key in RANGES:
            lo, hi = RANGES[key]
            published = f"{lo * 1e3:.0f}-{hi * 1e3:.0f} ms"
            ok = "yes" if lo <= value <= hi else "**no**"
        else:
            published, ok = "-", "-"
        lines.append(f"| {label} | {shown} | {published} | {ok} |")
    return "\n".join(lines)


async def _start_sim(extra: list[str]) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp.sim", "--ports", "0", "--time-scale", "1", *extra,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        if not line:
            raise RuntimeError("epp.sim exited before it was ready")
        match = _READY.match(line.decode())
        if match:
            return proc, match[1]


async def _main(args: argparse.Namespace) -> int:
    proc = None
    url = args.url
    if url is None:
        proc, url = await _start_sim(args.sim_args)
    try:
        res = await Calibration(url, args.repeats, args.duration).run()
    finally:
        if proc is not None:
            proc.terminate()
            await proc.wait()
    print(table(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epp.sim.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="calibrate an already running sim instead of starting one")
    parser.add_argument("--repeats", type=int, default=10, help="requests per TTFT measurement (median)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of the throughput run")
    parser.add_argument("sim_args", nargs="*", help="extra flags for the started sim (after --)")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

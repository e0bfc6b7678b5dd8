"""``epp demo``: start a local fleet, the EPP and Envoy, send a burst of traffic, show where it went.

Everything runs on 127.0.0.1 on free ports, as child processes of this one (epp/bench/procs.py):
``epp sim`` with four servers (the last at half speed, two LoRA adapters registered), ``epp serve``
with the seed pipeline (config/seed-pipeline.yaml) and Envoy with envoy/envoy.yaml (full-duplex
ext_proc). The processes are the same commands the benchmarks and docker-compose run
(epp/bench/stacks.py). They are stopped on every way out: the end of the demo, an error, Ctrl-C,
SIGTERM; with ``--keep`` they stay up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from openai import AsyncOpenAI, DefaultAsyncHttpxClient
from rich.console import Console

from epp.bench import stacks
from epp.bench.procs import ManagedProcess, ProcessFailed, ProcessGroup
from epp.demo.explain import DecisionFeed, Why, explain
from epp.demo.summary import Summary, histogram_mean, summarize
from epp.demo.traffic import ADAPTERS, DemoRequest, Outcome, plan, run_burst
from epp.demo.view import make_console, make_view, print_summary
from epp.envoyconfig import EnvoyConfigError

DESCRIPTION = ("Start a complete local demo on 127.0.0.1: four simulated vLLM servers (one slower), the EPP with "
               "the seed pipeline and Envoy; send a burst of mixed OpenAI traffic through Envoy and show where "
               "each request went and why. Every process is stopped on exit (with --keep: on Ctrl-C).")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "seed-pipeline.yaml"
SPEEDS = (1.0, 1.0, 1.0, 0.5)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=_positive(int), default=80, metavar="N",
                   help="how many requests to send (default %(default)s)")
    p.add_argument("--rate", type=_positive(float), default=8.0, metavar="PER_S",
                   help="mean arrival rate, requests per second (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the traffic mix and the servers (default 0)")
    p.add_argument("--time-scale", type=_positive(float), default=1.0, metavar="X",
                   help="wall seconds per simulated model second (default %(default)s: H100-like latencies)")
    p.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG, metavar="FILE",
                   help="EndpointPickerConfig for the EPP (default config/seed-pipeline.yaml)")
    p.add_argument("--keep", action="store_true",
                   help="after the summary, keep everything running until Ctrl-C and print the URLs")
    p.add_argument("--log-dir", type=Path, metavar="DIR",
                   help="keep each process's log here (default: a temporary directory, removed on exit)")
    p.add_argument("--plain", action="store_true",
                   help="one line per request instead of the live view (automatic when stdout is not a terminal)")


def servers_of(fleet: stacks.SimFleetHandle) -> list[tuple[str, str, float]]:
    """(name, host:port, speed) per model server; sim-i runs at SPEEDS[i]."""
    return [(n, a, SPEEDS[i]) for i, (n, a) in enumerate(zip(fleet.names, fleet.addresses))]


@dataclass(frozen=True)
class Stack:
    fleet: stacks.SimFleetHandle
    epp: stacks.EppHandle
    envoy: stacks.EnvoyHandle

    @property
    def processes(self) -> tuple[ManagedProcess, ...]:
        return (self.fleet.process, self.epp.process, self.envoy.process)

    @property
    def servers(self) -> list[tuple[str, str, float]]:
        return servers_of(self.fleet)

    @property
    def names(self) -> dict[str, str]:
        return dict(zip(self.fleet.addresses, self.fleet.names))


def start_stack(group: ProcessGroup, args: argparse.Namespace, console: Console) -> Stack:
    def step(what: str) -> float:
        console.print(f"starting {what} ...", markup=False)
        return time.monotonic()

    t = step(f"{len(SPEEDS)} simulated vLLM servers (epp sim)")
    fleet = stacks.start_sim_fleet(group, len(SPEEDS), time_scale=args.time_scale, seed=args.seed, speeds=SPEEDS,
                                   lora_adapters=ADAPTERS)
    console.print(f"  ready in {time.monotonic() - t:.1f} s: pid={fleet.process.pid} "
                  + ", ".join(f"{n}={a} ({s:g}x)" for n, a, s in servers_of(fleet)), markup=False)
    t = step(f"the EPP (epp serve --config-file {args.config_file})")
    epp = stacks.start_epp(group, fleet.addresses, config_file=args.config_file, extra=["--enable-debug-headers"])
    console.print(f"  ready in {time.monotonic() - t:.1f} s: pid={epp.process.pid} ext_proc=127.0.0.1:{epp.grpc_port} "
                  f"debug={epp.metrics_url}/debug", markup=False)
    t = step("Envoy (envoy/envoy.yaml, full-duplex ext_proc to the EPP)")
    envoy = stacks.start_envoy_template(group, "envoy.yaml", backends=fleet.addresses, epp_port=epp.grpc_port)
    console.print(f"  ready in {time.monotonic() - t:.1f} s: pid={envoy.process.pid} listener={envoy.url}",
                  markup=False)
    return Stack(fleet, epp, envoy)


def print_urls(console: Console, stack: Stack) -> None:
    rows = [
        ("OpenAI API (via Envoy)", f"{stack.envoy.url}/v1"),
        ("EPP debug page", f"{stack.epp.metrics_url}/debug"),
        ("EPP decisions (JSON)", f"{stack.epp.metrics_url}/debug/decisions"),
        ("EPP metrics", f"{stack.epp.metrics_url}/metrics"),
        ("Envoy admin", f"http://127.0.0.1:{stack.envoy.admin_port}"),
        *((f"{n} ({s:g}x) metrics", f"http://{a}/metrics") for n, a, s in stack.servers),
    ]
    for label, url in rows:
        console.print(f"  {label:<24} {url}", markup=False, soft_wrap=True)
    console.print("  try:  curl -si " + stack.envoy.url + "/v1/completions -H 'content-type: application/json' "
                  "-H 'x-epp-debug: 1' -d '{\"model\": \"meta-llama/Llama-3.1-8B-Instruct\", \"prompt\": \"Hello\", "
                  "\"max_tokens\": 8}'   (the x-epp-decision header explains the pick)", markup=False, soft_wrap=True)


async def drive(stack: Stack, requests: list[DemoRequest], console: Console) -> Summary:
    """Send the burst through Envoy, explain each pick, and total it up per endpoint."""
    whys: dict[str, Why | None] = {}
    names = stack.names
    # trust_env=False: a proxy from the environment must not capture loopback traffic.
    async with aiohttp.ClientSession() as http, AsyncOpenAI(
            base_url=f"{stack.envoy.url}/v1", api_key="demo", max_retries=0, timeout=60.0,
            http_client=DefaultAsyncHttpxClient(trust_env=False)) as client:
        feed = DecisionFeed(http, stack.epp.metrics_url)
        view = make_view(console, len(requests), stack.servers)

        async def on_done(o: Outcome) -> None:
            decision = await feed.get(o.request.request_id)
            why = explain(decision, names) if decision else None
            whys[o.request.request_id] = why
            view.done(o, why)

        t0 = time.monotonic()
        with view:
            outcomes = await run_burst(client, requests, on_done)
        summary = summarize(outcomes, whys, stack.servers)
        summary.wall_s = time.monotonic() - t0
        for e in summary.endpoints:
            try:
                async with http.get(f"http://{e.address}/metrics", timeout=aiohttp.ClientTimeout(total=5.0)) as resp:
                    e.server_ttft_mean = histogram_mean(await resp.text())
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                e.server_ttft_mean = None  # shown as "-"; the client-side columns still stand
    return summary


def keep_running(console: Console, stack: Stack) -> int:
    console.print("\neverything keeps running; press Ctrl-C to stop it:", markup=False)
    print_urls(console, stack)
    while True:
        for proc in stack.processes:
            if not proc.alive:
                console.print(proc.describe_failure("stopped unexpectedly"), markup=False)
                return 1
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    console = make_console(args.plain)
    errors = Console(stderr=True, highlight=False)
    if not args.config_file.is_file():
        errors.print(f"epp demo: error: config file {args.config_file} not found", markup=False)
        return 2
    requests = plan(args.requests, seed=args.seed, rate=args.rate)
    started: list[ManagedProcess] = []
    rc = 130  # unless the burst gets as far as a summary
    try:
        with ProcessGroup(args.log_dir) as group:
            try:
                stack = start_stack(group, args, console)
                console.print("URLs (open them while the demo runs):", markup=False)
                print_urls(console, stack)
                summary = asyncio.run(drive(stack, requests, console))
                print_summary(console, summary)
                rc = 0 if not summary.failed and summary.ok == len(requests) else 1
                if args.keep:
                    rc = keep_running(console, stack) or rc
            finally:
                started = list(group.processes)  # the group forgets them as it stops them
    except KeyboardInterrupt:
        console.print("\ninterrupted", markup=False)
    except SystemExit as e:  # SIGTERM, turned into SystemExit by the process group
        console.print(f"\nterminated (exit {e.code})", markup=False)
        rc = e.code if isinstance(e.code, int) else 1
    except (ProcessFailed, EnvoyConfigError) as e:
        errors.print(f"epp demo: error: {e}", markup=False, soft_wrap=True)
        if args.log_dir is None:
            errors.print("(the logs go away with the demo; --log-dir DIR keeps them)", markup=False)
        rc = 1
    if started:
        console.print("stopped " + ", ".join(f"{p.name} (pid={p.pid}, exit {p.popen.returncode})" for p in started),
                      markup=False)
    return rc

"""``epp sim`` / ``python -m epp.sim``: run a fleet of simulated vLLM servers.

Prints one line per server once it accepts connections, for parent processes:

    sim ready name=sim-0 url=http://127.0.0.1:8001

then runs until SIGINT or SIGTERM and shuts down cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from epp.sim.config import DEFAULT_MODEL, ENGINE_FLAVORS, SimConfig
from epp.sim.fleet import SimFleet, fleet_configs, placements
from epp.sim.kvevents import EVENT_FORMATS, KVEventsConfig

T = TypeVar("T")


def _csv(convert: Callable[[str], T]) -> Callable[[str], list[T]]:
    def parse(text: str) -> list[T]:
        try:
            return [convert(part) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = f"comma-separated {convert.__name__}"
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimConfig()
    net = parser.add_argument_group("servers")
    net.add_argument("--ports", type=_csv(int), help="comma-separated ports, one server each (0 = pick a free port)")
    net.add_argument("--port", type=int, default=8001, help="first port when --ports is not given (default 8001)")
    net.add_argument("--count", type=int, default=1, help="number of servers on consecutive ports from --port")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    net.add_argument("--hosts", type=_csv(str), default=None,
                     help="comma-separated addresses, one server each (e.g. 127.0.0.2,127.0.0.3 with --port 8000: "
                          "pod-like servers on one port); overrides --host")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    model.add_argument("--served-model-name", nargs="+", default=None,
                       help="names the servers answer to (default: --model); the first one labels metrics")
    model.add_argument("--max-model-len", type=int, default=d.max_model_len, help="context window in tokens")
    model.add_argument("--engine-flavor", choices=ENGINE_FLAVORS, default=d.engine_flavor,
                       help="metric names to export: vllm or sglang")

    sched = parser.add_argument_group("engine")
    sched.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="max running sequences")
    sched.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                       help="token budget per step (chunked prefill)")
    sched.add_argument("--block-size", type=int, default=d.block_size, help="KV block size in tokens")
    sched.add_argument("--num-gpu-blocks", type=int, default=d.num_gpu_blocks, help="KV cache size in blocks")
    sched.add_argument("--c-step-ms", type=float, default=d.c_step * 1e3, help="fixed cost of a step")
    sched.add_argument("--c-dec-ms", type=float, default=d.c_dec * 1e3, help="cost per decoding sequence")
    sched.add_argument("--c-pf-ms", type=float, default=d.c_pf * 1e3, help="cost per prefill token")
    sched.add_argument("--jitter", type=float, default=d.jitter, help="relative std-dev of step time")
    sched.add_argument("--output-len-median", type=int, default=d.output_len_median,
                       help="median output length when ignore_eos is not set (log-normal, capped by max_tokens)")
    sched.add_argument("--seed", type=int, default=d.seed, help="RNG seed (server i uses seed+i)")

    sched.add_argument("--hash-seed", default=os.environ.get("PYTHONHASHSEED"),
                       help="seed of the prefix-cache block hashes, like vLLM's PYTHONHASHSEED (default: "
                            "$PYTHONHASHSEED; unset = random per server start)")

    kv = parser.add_argument_group("KV events (vLLM's --kv-events-config)")
    kv.add_argument("--kv-events-config", type=_kv_events_config, default=None, metavar="JSON",
                    help='e.g. \'{"enable_kv_cache_events": true}\': vLLM\'s fields and defaults (publisher zmq, '
                         'endpoint tcp://*:5557, replay_endpoint, buffer_steps 10000, hwm 100000, max_queue_size '
                         '100000, topic ""); * binds the server\'s own address; servers sharing an address get '
                         'event/replay ports + 0, 1, 2, ...; the topic may use $(POD_IP), $(POD_PORT), {model}')
    kv.add_argument("--kv-events-format", choices=EVENT_FORMATS, default="map",
                    help="map: events as msgpack maps tagged by \"type\" (vLLM since PR #42892, default); "
                         "array: the older positional arrays")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-adapters", type=_csv(str), default=[],
                      help="comma-separated adapter names registered at start, loaded into a slot on first use")
    lora.add_argument("--max-loras", type=int, default=d.max_loras, help="GPU adapter slots")
    lora.add_argument("--lora-load-ms", type=float, default=d.lora_load_s * 1e3,
                      help="cost of loading an adapter into a slot")

    parser.add_argument("--name", type=_csv(str), default=[],
                        help="comma-separated server names, one per port (default sim-0..N-1); shown in the "
                             "x-sim-server response header and the ready line")

    time_ = parser.add_argument_group("time and heterogeneity")
    time_.add_argument("--time-scale", type=float, default=d.time_scale,
                       help="wall seconds per model second (0.1 runs 10x faster)")
    time_.add_argument("--speed", type=_csv(float), default=None,
                       help="per-server speed factors, e.g. 1,1,1,0.5 (one value applies to all)")

    fail = parser.add_argument_group("failure injection")
    fail.add_argument("--fail-rate", type=float, default=0.0, help="probability a generation request gets a 500")
    fail.add_argument("--hang-rate", type=float, default=0.0, help="probability a generation request never answers")


def _kv_events_config(text: str) -> KVEventsConfig:
    try:
        return KVEventsConfig.from_json(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_fleet(args: argparse.Namespace) -> SimFleet:
    """Turn parsed flags into a (not yet started) fleet; raises ValueError on bad flags."""
    hosts: list[str] = args.hosts or [args.host]
    if args.ports:
        ports: list[int] = args.ports
    elif args.hosts and args.count == 1:  # pod-like: every address on --port
        ports = [args.port]
    else:  # consecutive ports; --port 0 means a free port for each server
        ports = [args.port + i if args.port else 0 for i in range(args.count)]
    if not ports:
        raise ValueError("no ports given")
    where = placements(ports, hosts)
    base = SimConfig(
        model=args.model,
        served_model_names=tuple(args.served_model_name or ()),
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        c_step=args.c_step_ms / 1e3,
        c_dec=args.c_dec_ms / 1e3,
        c_pf=args.c_pf_ms / 1e3,
        jitter=args.jitter,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_loras=args.max_loras,
        lora_load_s=args.lora_load_ms / 1e3,
        lora_adapters=tuple(args.lora_adapters),
        output_len_median=args.output_len_median,
        time_scale=args.time_scale,
        seed=args.seed,
        fail_rate=args.fail_rate,
        hang_rate=args.hang_rate,
        engine_flavor=args.engine_flavor,
        hash_seed=args.hash_seed,
        kv_events=args.kv_events_config,
        kv_events_format=args.kv_events_format,
    )
    configs = fleet_configs(base, len(where), args.speed)
    if args.name:
        if len(args.name) != len(configs):
            raise ValueError(f"got {len(args.name)} names for {len(configs)} servers")
        configs = [dataclasses.replace(c, name=n) for c, n in zip(configs, args.name)]
    return SimFleet(ports, hosts=hosts, configs=configs)


async def serve(fleet: SimFleet, stop: asyncio.Event | None = None) -> None:
    """Start ``fleet``, announce it, run until SIGINT/SIGTERM (or ``stop``), then stop it."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signal support: rely on `stop`
    try:
        await fleet.start()
        for server in fleet.servers:
            cfg = server.config
            kv = ""
            if server.kv_events_endpoint:
                kv = f" kv_events={server.kv_events_endpoint}"
                if server.kv_replay_endpoint:
                    kv += f" kv_replay={server.kv_replay_endpoint}"
            print(f"sim ready name={server.name} url={server.url} model={cfg.served_name} speed={cfg.speed:g}{kv}",
                  flush=True)
        await stop.wait()
    finally:
        await fleet.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)
    print("sim stopped", flush=True)


def run(args: argparse.Namespace) -> int:
    """Blocking entry point for ``epp sim``; returns the process exit status."""
    try:
        fleet = build_fleet(args)
    except ValueError as exc:
        print(f"epp sim: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(fleet))
    except OSError as exc:  # typically a port already in use
        print(f"epp sim: {exc}", file=sys.stderr)
        return 1
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epp.sim", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))

"""Fleet capacity for a workload, computed from the sim's own physics.

We run the sim's clock-free scheduler (epp/sim/scheduler.py) on a virtual clock: one server,
every request of the workload queued at once, steps priced by the same cost model the real sim
sleeps for. The completion rate in the steady middle of that run is the server's saturation
throughput for this request mix; the fleet's is ``servers`` times that. Nothing here tunes the
physics: it only reads ``SimConfig``.

Caveat, stated in the report: one server that sees every request is what load-blind routing
looks like. For the shared-prefix workload that is the *no-affinity* capacity (the prefix cache
thrashes), which is the right yardstick for "load relative to round-robin".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from epp.bench.workloads import BenchRequest
from epp.sim.config import SimConfig
from epp.sim.scheduler import Scheduler, SimRequest, Step
from epp.sim.tokenizer import block_hashes, render_chat, tokenize


@dataclass(frozen=True)
class Capacity:
    requests_per_s: float  # per server, model seconds
    output_tokens_per_s: float
    prefix_hit_rate: float
    preemptions: int
    simulated_requests: int
    model_seconds: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _prompt_ids(req: BenchRequest) -> list[int]:
    text = render_chat(req.messages) if req.api == "chat" else req.prompt
    return tokenize(text)


def _sim_requests(requests: Sequence[BenchRequest], cfg: SimConfig) -> list[SimRequest]:
    out = []
    for i, r in enumerate(requests):
        ids = _prompt_ids(r)
        is_lora = r.model in cfg.lora_adapters
        out.append(SimRequest(
            rid=str(i), model=r.model, lora=r.model if is_lora else None, prompt_len=len(ids),
            block_hashes=block_hashes(ids, cfg.block_size, 0, r.model if is_lora else None),
            max_tokens=r.max_tokens, target_len=r.max_tokens, arrival=r.at,
        ))
    return out


def saturation_capacity(requests: Sequence[BenchRequest], config: SimConfig | None = None, *,
                        lora_adapters: Sequence[str] = ()) -> Capacity:
    """Saturation throughput of one sim server for this request mix (model seconds).

    Throughput is measured between the 20 % and 80 % completion marks, away from the ramp-up
    and the draining tail.
    """
    if not requests:
        raise ValueError("no requests to calibrate with")
    cfg = config or SimConfig(lora_adapters=tuple(lora_adapters))
    sched = Scheduler(cfg)
    for req in _sim_requests(requests, cfg):
        req.arrival = 0.0  # all queued at once: saturation
        sched.add(req)
    n = len(requests)
    lo_mark, hi_mark = max(1, n // 5), max(2, (4 * n) // 5)
    t_lo = t_hi = 0.0
    tokens_at_lo = tokens_at_hi = 0
    done = 0
    now = 0.0
    while sched.has_work():
        step = sched.schedule(now)
        if step is None:  # only possible if nothing fits at all
            raise RuntimeError("the sim scheduler made no progress; a request does not fit the KV cache")
        now += step.cost
        _, finished = sched.complete(step, now)
        for _ in finished:
            done += 1
            if done == lo_mark:
                t_lo, tokens_at_lo = now, sched.stats.generation_tokens
            if done == hi_mark:
                t_hi, tokens_at_hi = now, sched.stats.generation_tokens
    span = max(t_hi - t_lo, 1e-9)
    stats = sched.stats
    return Capacity(
        requests_per_s=(hi_mark - lo_mark) / span,
        output_tokens_per_s=(tokens_at_hi - tokens_at_lo) / span,
        prefix_hit_rate=stats.prefix_hits / stats.prefix_queries if stats.prefix_queries else 0.0,
        preemptions=stats.preemptions,
        simulated_requests=n,
        model_seconds=now,
    )


def simulate_round_robin(requests: Sequence[BenchRequest], servers: int, config: SimConfig | None = None, *,
                         lora_adapters: Sequence[str] = ()) -> list[float]:
    """TTFT (model seconds) of each request when ``servers`` sim servers get the workload round-robin.

    An event-driven replay on the sim's own scheduler with a virtual clock: the physics without
    any CPU, network or router noise. The benchmark reports it next to the measured round-robin
    run, as a check that the machine did not distort the physics.
    """
    cfg = config or SimConfig(lora_adapters=tuple(lora_adapters), jitter=0.0)
    scheds = [Scheduler(cfg) for _ in range(servers)]
    steps: list[tuple[float, Step] | None] = [None] * servers  # (end time, step) of each busy server
    reqs = _sim_requests(sorted(requests, key=lambda r: r.at), cfg)
    nxt = 0

    def start(k: int, now: float) -> None:
        step = scheds[k].schedule(now)
        steps[k] = (now + step.cost, step) if step is not None else None

    while True:
        t_arrival = reqs[nxt].arrival if nxt < len(reqs) else math.inf
        busy = [(s[0], k) for k, s in enumerate(steps) if s is not None]
        t_step, k_step = min(busy) if busy else (math.inf, -1)
        if t_arrival == math.inf and t_step == math.inf:
            break
        if t_arrival <= t_step:
            # Everything arriving at this instant is queued before an idle server starts a
            # step, as the real engine batches requests that arrive together.
            touched = set()
            while nxt < len(reqs) and reqs[nxt].arrival == t_arrival:
                k = nxt % servers
                scheds[k].add(reqs[nxt])
                touched.add(k)
                nxt += 1
            for k in sorted(touched):
                if steps[k] is None:
                    start(k, t_arrival)
        else:
            end, step = steps[k_step]  # type: ignore[misc]
            scheds[k_step].complete(step, end)
            start(k_step, end)
    return [r.first_token_time - r.arrival for r in reqs if r.first_token_time >= 0]

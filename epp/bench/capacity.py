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

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from epp.bench.workloads import BenchRequest
from epp.sim.config import SimConfig
from epp.sim.scheduler import Scheduler, SimRequest
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
    base = cfg.served_name
    for i, r in enumerate(requests):
        ids = _prompt_ids(r)
        is_lora = r.model in cfg.lora_adapters
        sched.add(SimRequest(
            rid=str(i),
            model=r.model,
            lora=r.model if is_lora else None,
            prompt_len=len(ids),
            block_hashes=block_hashes(ids, cfg.block_size, r.model if is_lora else base),
            max_tokens=r.max_tokens,
            target_len=r.max_tokens,
            arrival=0.0,
        ))
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

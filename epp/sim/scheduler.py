"""Continuous batching, one engine step at a time (vLLM V1's scheduler, simplified).

This module is pure bookkeeping with no clock and no asyncio: ``schedule()``
picks the work of the next step and prices it in model seconds,
``complete(step, now)`` applies it at time ``now``. The asyncio driver in
engine.py sleeps between the two; tests can drive it with a fake clock.

Per step, like vLLM V1:

1. Running requests first, in admission order. Each needs the tokens it has
   not computed yet (1 while decoding; a chunk while prefilling), within the
   step's token budget. If its KV does not fit, the newest running request is
   preempted (blocks freed, requeued at the front of ``waiting``) until it fits.
2. If nothing was preempted, admit waiting requests in FIFO order while there
   is budget, a free sequence slot and KV for the first chunk. Cached prefix
   blocks count as already computed. A request whose LoRA adapter cannot join
   the batch is skipped, not blocking the queue.
3. Step cost = c_step + c_dec * decoding_seqs + c_pf * prefill_tokens
   + lora_load_s * adapters_loaded.
4. At the end of the step every request whose tokens are all computed samples
   one new token (the first token right after its prefill).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from epp.sim.config import SimConfig
from epp.sim.kvcache import KVCache
from epp.sim.lora import LoraSlots
from epp.sim.stats import EngineStats


class SimRequest:
    """One sequence in the engine (an OpenAI request with n=2 makes two)."""

    __slots__ = (
        "rid", "model", "lora", "lora_id", "prompt_len", "prompt_ids", "block_hashes", "max_tokens",
        "target_len", "stream", "arrival",
        "num_computed", "num_output", "num_hashed", "num_anon", "scheduled", "running",
        "cached_tokens", "first_scheduled", "first_token_time", "last_token_time",
        "finish_time", "finish_reason", "preemptions", "waiter",
    )

    def __init__(
        self,
        rid: str,
        model: str,
        lora: str | None,
        prompt_len: int,
        block_hashes: list[int],
        max_tokens: int,
        target_len: int,
        arrival: float,
        stream: bool = False,
        prompt_ids: list[int] | None = None,
        lora_id: int | None = None,
    ) -> None:
        self.rid = rid
        self.model = model
        self.lora = lora
        # vLLM's integer adapter id (lora_int_id), reported in KV events.
        self.lora_id = lora_id
        self.prompt_len = prompt_len
        # The token ids the KV blocks hold; KV events carry them.
        self.prompt_ids = prompt_ids if prompt_ids is not None else []
        self.block_hashes = block_hashes
        self.max_tokens = max_tokens
        self.target_len = target_len
        self.stream = stream
        self.arrival = arrival
        self.num_computed = 0
        self.num_output = 0
        self.num_hashed = 0
        self.num_anon = 0
        self.scheduled = 0
        self.running = False
        self.cached_tokens = -1
        self.first_scheduled = -1.0
        self.first_token_time = -1.0
        self.last_token_time = -1.0
        self.finish_time = -1.0
        self.finish_reason: str | None = None
        self.preemptions = 0
        # Owned by the asyncio driver: a Future to resolve when there is news.
        self.waiter: Any = None

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV must exist before the next token can be sampled."""
        return self.prompt_len + self.num_output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Step:
    """The work of one engine step."""

    __slots__ = ("reqs", "num_decode", "num_prefill_tokens", "lora_loads", "cost")

    def __init__(self, reqs: list[SimRequest], num_decode: int, num_prefill_tokens: int,
                 lora_loads: int, cost: float) -> None:
        self.reqs = reqs
        self.num_decode = num_decode
        self.num_prefill_tokens = num_prefill_tokens
        self.lora_loads = lora_loads
        self.cost = cost  # model seconds, before time_scale, speed and jitter


class Scheduler:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.kv = KVCache(config.num_gpu_blocks, config.block_size)
        self.lora = LoraSlots(config.max_loras, config.lora_adapters)
        self.stats = EngineStats(config.max_model_len)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []

    # -- queue management ---------------------------------------------------------

    def add(self, req: SimRequest) -> None:
        self.stats.requests_received += 1
        self.waiting.append(req)

    def abort(self, req: SimRequest, now: float) -> None:
        """Client went away: drop the request wherever it is and free its KV."""
        if req.finish_reason is not None:
            return
        if req.running:
            self.running.remove(req)
            self._release(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        req.finish_reason = "abort"
        req.finish_time = now
        self.stats.success["abort"] += 1

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- one step ----------------------------------------------------------------

    def schedule(self, now: float) -> Step | None:
        cfg = self.config
        kv = self.kv
        budget = cfg.max_num_batched_tokens
        running = self.running
        scheduled: list[SimRequest] = []
        num_decode = 0
        prefill_tokens = 0
        preempted = False

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            target = req.num_computed + n
            while not kv.allocate(req, target):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if not req.running:
                break  # it preempted itself: nothing after it is left either
            req.scheduled = n
            scheduled.append(req)
            budget -= n
            if n == 1 and req.num_output > 0:
                num_decode += 1
            else:
                prefill_tokens += n
            i += 1

        lora_loads = 0
        if not preempted:
            admitted_tokens, lora_loads = self._admit(now, budget, scheduled)
            prefill_tokens += admitted_tokens

        if not scheduled:
            return None
        cost = (cfg.c_step + cfg.c_dec * num_decode + cfg.c_pf * prefill_tokens
                + cfg.lora_load_s * lora_loads)
        self.stats.iteration_tokens.observe(num_decode + prefill_tokens)
        return Step(scheduled, num_decode, prefill_tokens, lora_loads, cost)

    def _admit(self, now: float, budget: int, scheduled: list[SimRequest]) -> tuple[int, int]:
        """Move waiting requests into the batch; returns (prefill tokens scheduled, LoRA loads)."""
        cfg = self.config
        kv = self.kv
        lora = self.lora
        stats = self.stats
        waiting = self.waiting
        running = self.running
        bs = cfg.block_size
        prefill_tokens = 0
        loads = 0
        skipped: list[SimRequest] = []
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            req = waiting[0]
            if req.lora is not None and not lora.can_run(req.lora):
                skipped.append(waiting.popleft())
                continue
            num_tokens = req.num_tokens
            # At least one token must be computed to sample from, so a full hit
            # still recomputes the last block's tail (vLLM caps hits at n-1).
            hits = kv.lookup_prefix(req.block_hashes, (num_tokens - 1) // bs)
            computed = hits * bs
            n = min(num_tokens - computed, budget)
            if not kv.allocate(req, computed + n):
                break
            waiting.popleft()
            stats.prefix_queries += num_tokens
            stats.prefix_hits += computed
            if req.cached_tokens < 0:
                req.cached_tokens = computed
            if req.first_scheduled < 0:
                req.first_scheduled = now
            req.num_computed = computed
            req.scheduled = n
            req.running = True
            if req.lora is not None and lora.acquire(req.lora):
                loads += 1
            running.append(req)
            scheduled.append(req)
            budget -= n
            prefill_tokens += n
        if skipped:
            waiting.extendleft(reversed(skipped))
        return prefill_tokens, loads

    def complete(self, step: Step, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply a step that ended at ``now``; returns (requests that got a token, finished ones)."""
        stats = self.stats
        emitted: list[SimRequest] = []
        finished: list[SimRequest] = []
        itl = stats.itl
        for req in step.reqs:
            if req.finish_reason is not None or not req.running:
                continue  # aborted or preempted (a prefix-cache reset) while the step ran
            req.num_computed += req.scheduled
            if req.num_computed < req.prompt_len + req.num_output:
                continue  # a prefill chunk: no token yet
            req.num_output += 1
            if req.first_token_time < 0:
                req.first_token_time = now
                stats.ttft.observe(now - req.arrival)
                stats.prompt_tokens += req.prompt_len
            else:
                itl.observe(now - req.last_token_time)
            req.last_token_time = now
            emitted.append(req)
            if req.num_output >= req.target_len:
                self._finish(req, now)
                finished.append(req)
        stats.generation_tokens += len(emitted)
        if finished:
            self.running = [r for r in self.running if r.finish_reason is None]
        return emitted, finished

    def preempt_all(self) -> None:
        """Preempt every running request, newest first (vLLM's reset_running_requests)."""
        while self.running:
            self._preempt(self.running.pop())

    # -- helpers -----------------------------------------------------------------

    def _release(self, req: SimRequest) -> None:
        self.kv.free(req)
        if req.lora is not None:
            self.lora.release(req.lora)
        req.running = False

    def _preempt(self, req: SimRequest) -> None:
        """Recompute-style preemption: drop all KV, go back to the head of the queue."""
        self._release(req)
        req.num_computed = 0
        req.scheduled = 0
        req.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: SimRequest, now: float) -> None:
        self._release(req)
        reason = "length" if req.num_output >= req.max_tokens else "stop"
        req.finish_reason = reason
        req.finish_time = now
        s = self.stats
        s.success[reason] += 1
        n_out = req.num_output
        s.e2e.observe(now - req.arrival)
        s.queue.observe(req.first_scheduled - req.arrival)
        s.inference.observe(now - req.first_scheduled)
        s.prefill.observe(req.first_token_time - req.first_scheduled)
        decode = now - req.first_token_time
        s.decode.observe(decode)
        if n_out > 1:
            s.request_tpot.observe(decode / (n_out - 1))
        s.prompt_len.observe(req.prompt_len)
        s.generation_len.observe(n_out)
        s.max_generation.observe(n_out)
        s.max_tokens.observe(req.max_tokens)
        s.params_n.observe(1)

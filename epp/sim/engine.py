"""The asyncio driver of one simulated server: a loop that runs engine steps.

The loop plays the GPU: it asks the scheduler for the next step, sleeps for
the step's cost (scaled by ``time_scale / speed``, with a little jitter) and
applies it. Sleeping on a busy event loop overshoots, so steps are laid on a
virtual clock: a step starts when the previous one *should* have ended, which
keeps throughput and latencies right on a loaded machine (a lag of up to 50 ms
is caught up by running steps back to back); after idling or a longer stall
the clock restarts from now.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections.abc import Sequence

from epp.sim.config import SimConfig
from epp.sim.kvevents import NullPublisher, Publisher
from epp.sim.scheduler import Scheduler, SimRequest
from epp.sim.tokenizer import block_hashes, chain_root

log = logging.getLogger(__name__)

# How far (wall seconds) the engine may fall behind its virtual clock and still
# catch up by running steps back to back. Beyond that it restarts from now: a
# long stall is lost time rather than a burst of tokens.
_MAX_CATCH_UP = 0.05


class Engine:
    def __init__(self, config: SimConfig, publisher: Publisher | None = None) -> None:
        self.config = config
        self.scheduler = Scheduler(config)
        self.publisher: Publisher = NullPublisher()
        if publisher is not None:
            self.attach_publisher(publisher)
        # The root of every block-hash chain: vLLM's NONE_HASH (random per start unless seeded).
        self.hash_root = chain_root(config.hash_seed)
        # Separate streams so a failure draw never changes an output length.
        self._len_rng = random.Random(config.seed)
        self._jitter_rng = random.Random(config.seed ^ 0x5EED)
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._log_median = math.log(max(1, config.output_len_median))
        self.steps = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sim-engine-{self.config.name}")

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop stepping and finish every request as aborted so handlers return."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                pass  # already logged by _run
        self._abort_all()

    def attach_publisher(self, publisher: Publisher) -> None:
        """Publish KV events through ``publisher``; the cache logs them only when somebody does."""
        self.publisher = publisher
        if publisher.enabled:
            self.scheduler.kv.record_events()

    # -- requests ------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        *,
        model: str,
        lora: str | None,
        max_tokens: int,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        stream: bool = False,
    ) -> SimRequest:
        """Queue one sequence; the caller awaits ``wait()`` or polls ``num_output``."""
        cfg = self.config
        if ignore_eos:
            target = max_tokens
        else:
            # Heavy-tailed "natural" length (where EOS would come), capped by max_tokens.
            natural = int(self._len_rng.lognormvariate(self._log_median, cfg.output_len_sigma)) + 1
            target = min(max_tokens, max(min_tokens, natural))
        ids = list(prompt_ids)
        req = SimRequest(
            rid=f"{cfg.name}-{next(self._ids)}",
            model=model,
            lora=lora,
            lora_id=None if lora is None else self.scheduler.lora.ids.get(lora),
            prompt_len=len(ids),
            prompt_ids=ids,
            # Aliases of the base model share KV; each adapter has its own (its name is an extra key).
            block_hashes=block_hashes(ids, cfg.block_size, self.hash_root, lora),
            max_tokens=max_tokens,
            target_len=target,
            arrival=asyncio.get_running_loop().time(),
            stream=stream,
        )
        self.scheduler.add(req)
        if self._wake is not None:
            self._wake.set()
        return req

    def abort(self, req: SimRequest) -> None:
        if req.finish_reason is None:
            self.scheduler.abort(req, asyncio.get_running_loop().time())
            self._kick()

    async def wait(self, reqs: Sequence[SimRequest]) -> None:
        """Return once any of ``reqs`` has news (a token if streaming, else finished).

        Callers check for news *before* waiting, with no await in between, so
        a notification cannot be missed.
        """
        if any(r.finish_reason is not None for r in reqs):
            return
        fut = asyncio.get_running_loop().create_future()
        for req in reqs:
            req.waiter = fut
        await fut

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's ``reset_prefix_cache``: drop every cached block; False if blocks are in use.

        With ``reset_running_requests`` the running requests are preempted first
        (they recompute later). The AllBlocksCleared event goes out at once.
        """
        sched = self.scheduler
        if reset_running_requests:
            sched.preempt_all()
            self._kick()
        if sched.kv.num_used:
            return False
        sched.kv.reset()
        self._flush_events()
        return True

    def _flush_events(self) -> None:
        if self.scheduler.kv.events:
            self.publisher.publish(self.scheduler.kv.take_events())

    def _kick(self) -> None:
        # Aborts free KV and slots: let an idle-waiting loop re-check its queue.
        if self._wake is not None:
            self._wake.set()

    # -- the GPU -------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._steps()
        except Exception:
            # A bug here must not leave clients hanging forever: log it and
            # abort everything so their handlers answer.
            log.exception("sim engine %s crashed", self.config.name)
            self._abort_all()
            raise

    def _abort_all(self) -> None:
        sched = self.scheduler
        now = asyncio.get_running_loop().time()
        for req in [*sched.running, *sched.waiting]:
            sched.abort(req, now)
            _notify(req)

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        sched = self.scheduler
        wake = self._wake
        assert wake is not None
        factor = self.config.wall_factor
        jitter = self.config.jitter
        lo, hi = 1.0 - 3 * jitter, 1.0 + 3 * jitter
        gauss = self._jitter_rng.gauss
        kv = sched.kv
        clock = loop.time()  # when the previous step ended on the virtual clock
        while True:
            now = loop.time()
            step = sched.schedule(now)
            if kv.events:  # one batch per step that changed the cache, as vLLM
                self._flush_events()
            if step is None:
                wake.clear()
                await wake.wait()
                clock = loop.time()
                continue
            dt = step.cost * factor
            if jitter:
                dt *= min(hi, max(lo, gauss(1.0, jitter)))
            # If we are behind the virtual clock (sleep overshoot, the process
            # was descheduled), the step still starts at its due time, so it is
            # shortened until we catch up; a lag beyond the bound is dropped.
            start = clock if now - clock < max(dt, _MAX_CATCH_UP) else now
            clock = start + dt
            delay = clock - now
            # Always yield, so HTTP handlers run even when we are behind.
            await asyncio.sleep(delay if delay > 0 else 0)
            self.steps += 1
            emitted, finished = sched.complete(step, loop.time())
            for req in emitted:
                if req.stream:
                    _notify(req)
            for req in finished:
                if not req.stream:
                    _notify(req)


def _notify(req: SimRequest) -> None:
    fut = req.waiter
    if fut is not None and not fut.done():
        fut.set_result(None)

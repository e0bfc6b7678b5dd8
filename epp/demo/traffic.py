"""The demo's traffic: a seeded mix of OpenAI requests, sent through Envoy with the ``openai`` SDK.

The mix is chosen so that each part of the seed pipeline has something to do:

- ``chat``: tenants with long system prompts (shared prefixes: the prefix scorer should keep a
  tenant on the server that already holds its prompt, and ``cached_tokens`` shows whether it did);
- ``completion``: questions about one of two long documents (shared prefixes on the completions API);
- ``adapter``: chat requests naming a LoRA adapter instead of the base model;
- about half of every kind streams (SSE with a usage chunk), the rest are plain JSON answers.

Arrivals are Poisson at ``rate`` per second (open loop), so load - and with it the queue, KV and
running-request scores - rises and falls as it would with real users. Output lengths are fixed with
``ignore_eos`` so that which server answers does not change how much work a request is.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI

from epp.bench.workloads import DEFAULT_MODEL, poisson_arrivals, text_of_tokens

KINDS = ("chat", "completion", "adapter")
KIND_WEIGHTS = (0.5, 0.25, 0.25)
TENANTS = ("acme-support", "legal-review", "travel-desk", "code-helper")
DOCUMENTS = ("annual-report", "user-manual")
ADAPTERS = ("sql-lora", "summarize-lora")
SERVER_NAME_HEADER = "x-sim-server"
SERVER_ADDRESS_HEADER = "x-sim-address"
REQUEST_ID_HEADER = "x-request-id"
# Every chat prompt starts with the same chat-template header, so a block or two of cached
# tokens says nothing about routing; a hit means a real shared prefix was reused.
PREFIX_HIT_TOKENS = 64


@dataclass(frozen=True, slots=True)
class DemoRequest:
    index: int
    at: float  # seconds after the start of the burst
    kind: str  # one of KINDS
    api: str  # "chat" or "completions"
    stream: bool
    group: str  # tenant, document or adapter: what this request shares with others
    model: str
    max_tokens: int
    messages: tuple[Mapping[str, str], ...] = ()
    prompt: str = ""

    @property
    def request_id(self) -> str:
        # Envoy keeps a client's x-request-id, and the EPP files its decision under it.
        return f"demo-{self.index:04d}"

    @property
    def label(self) -> str:
        return f"{self.kind}{' stream' if self.stream else ''}"


@dataclass(slots=True)
class Outcome:
    request: DemoRequest
    ok: bool = False
    error: str = ""
    server: str = ""  # sim server name (x-sim-server)
    address: str = ""  # host:port that served it (x-sim-address), the EPP's endpoint key
    latency: float = 0.0  # seconds, request sent to last byte
    ttft: float | None = None  # seconds to the first token; streamed requests only
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def prefix_hit(self) -> bool:
        return self.cached_tokens >= PREFIX_HIT_TOKENS


def plan(n: int, *, seed: int = 0, rate: float = 8.0, model: str = DEFAULT_MODEL) -> list[DemoRequest]:
    """``n`` requests of the mix above, the same for the same seed."""
    if n < 1:
        raise ValueError(f"the demo needs at least one request (got {n})")
    if rate <= 0:
        raise ValueError(f"rate must be > 0 (got {rate})")
    rng = random.Random(seed)
    systems = {t: text_of_tokens(rng, rng.randint(800, 1400), lead=f"You are the {t} assistant. ") for t in TENANTS}
    documents = {d: text_of_tokens(rng, rng.randint(1200, 1800), lead=f"[{d}] ") for d in DOCUMENTS}
    adapter_systems = {a: text_of_tokens(rng, rng.randint(400, 700), lead=f"[{a}] Answer with one query. ")
                       for a in ADAPTERS}
    arrivals: list[float] = []
    while len(arrivals) < n:  # a Poisson stream long enough for n requests, cut at n
        arrivals = poisson_arrivals(rng, rate, (n + 10) / rate * 2)
    out = []
    for i, at in enumerate(arrivals[:n]):
        kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
        stream = rng.random() < 0.5
        question = text_of_tokens(rng, rng.randint(20, 80), lead=f"q{i}: ")
        max_tokens = rng.randint(16, 96)
        if kind == "chat":
            group = rng.choice(TENANTS)
            req = DemoRequest(i, at, kind, "chat", stream, group, model, max_tokens,
                              messages=({"role": "system", "content": systems[group]},
                                        {"role": "user", "content": question}))
        elif kind == "completion":
            group = rng.choice(DOCUMENTS)
            req = DemoRequest(i, at, kind, "completions", stream, group, model, max_tokens,
                              prompt=f"{documents[group]}\n\nQuestion: {question}\nAnswer:")
        else:
            group = ADAPTERS[0] if rng.random() < 0.75 else ADAPTERS[1]
            req = DemoRequest(i, at, kind, "chat", stream, group, group, max_tokens,
                              messages=({"role": "system", "content": adapter_systems[group]},
                                        {"role": "user", "content": question}))
        out.append(req)
    return out


# -- sending -------------------------------------------------------------------------------------


def _usage(o: Outcome, usage: Any) -> None:
    if usage is None:
        return
    o.prompt_tokens = int(usage.prompt_tokens or 0)
    o.completion_tokens = int(usage.completion_tokens or 0)
    details = getattr(usage, "prompt_tokens_details", None)
    o.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0)


def _headers(o: Outcome, headers: Mapping[str, str]) -> None:
    o.server = headers.get(SERVER_NAME_HEADER, "")
    o.address = headers.get(SERVER_ADDRESS_HEADER, "")


def _has_text(chunk: Any) -> bool:
    for choice in chunk.choices or ():
        delta = getattr(choice, "delta", None)
        if (delta is not None and getattr(delta, "content", None)) or getattr(choice, "text", None):
            return True
    return False


async def send(client: AsyncOpenAI, req: DemoRequest) -> Outcome:
    """Send one request; never raises (a failure is an ``Outcome`` with ``ok=False``)."""
    o = Outcome(req)
    api: Any = client.chat.completions if req.api == "chat" else client.completions
    kwargs: dict[str, Any] = {
        "model": req.model, "max_tokens": req.max_tokens,
        "extra_headers": {REQUEST_ID_HEADER: req.request_id},
        "extra_body": {"ignore_eos": True},
    }
    if req.api == "chat":
        kwargs["messages"] = list(req.messages)
    else:
        kwargs["prompt"] = req.prompt
    t0 = time.perf_counter()
    try:
        if req.stream:
            async with api.with_streaming_response.create(
                    **kwargs, stream=True, stream_options={"include_usage": True}) as resp:
                _headers(o, resp.headers)
                async for chunk in await resp.parse():
                    if o.ttft is None and _has_text(chunk):
                        o.ttft = time.perf_counter() - t0
                    _usage(o, getattr(chunk, "usage", None))
            if o.ttft is None:
                raise ValueError("the stream ended without a token")
        else:
            raw = await api.with_raw_response.create(**kwargs)
            _headers(o, raw.headers)
            parsed = raw.parse()  # a coroutine or not, depending on the SDK version
            _usage(o, (await parsed if inspect.isawaitable(parsed) else parsed).usage)
        o.ok = True
    except Exception as e:  # noqa: BLE001 - API errors, transport errors, a broken stream: all are failures
        o.error = f"{type(e).__name__}: {e}"[:300]
    o.latency = time.perf_counter() - t0
    return o


async def run_burst(client: AsyncOpenAI, requests: Sequence[DemoRequest],
                    on_done: Callable[[Outcome], Awaitable[None]], *, max_in_flight: int = 64) -> list[Outcome]:
    """Send ``requests`` at their arrival times; ``on_done`` sees each outcome as it completes."""
    gate = asyncio.Semaphore(max_in_flight)
    start = time.perf_counter()

    async def one(req: DemoRequest) -> Outcome:
        delay = start + req.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            outcome = await send(client, req)
        await on_done(outcome)
        return outcome

    return list(await asyncio.gather(*(one(r) for r in requests)))

"""Seeded, open-loop benchmark workloads.

A workload is a fixed list of requests with Poisson arrival times, generated from a seed, so
every routing policy sees exactly the same traffic. Times are in *model seconds* (what an 8B
model on one H100 would take, the sim's unit); the load generator multiplies them by the sim
fleet's ``--time-scale`` to get wall-clock times.

Output lengths are drawn here and enforced with ``ignore_eos`` + ``min_tokens``, so the work a
request causes does not depend on which server (and which server-side random stream) gets it.

Prompt sizes are exact under the sim's tokenizer (4 bytes per token): a prompt of N tokens is
4*N ASCII bytes.

The three workloads follow issue 7 and research/mock-and-peers.md A3.4:

- ``shared_prefix``: tenants with long system prompts whose total working set exceeds one
  server's KV cache but fits the fleet's; round-robin thrashes every server's prefix cache,
  affinity keeps hits high.
- ``mixed_lengths``: unique prompts with heavy-tailed prompt and output lengths, at a chosen
  fraction of fleet capacity; load-blind routing builds queues behind long requests.
- ``lora``: more adapters than LoRA slots, Zipf popularity; affinity avoids adapter loads and
  slot contention.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BYTES_PER_TOKEN = 4  # the sim tokenizer's rule (epp/sim/tokenizer.py)

# A small vocabulary is enough: the sim tokenizer works on bytes, and the EPP's approximate
# prefix index works on characters; neither cares whether the words are real.
_WORDS = (
    "the of and to in is for on that with as by at from this be are or an it not which have "
    "model server token cache request prefix route queue batch decode prefill latency adapter "
    "tenant policy system prompt user answer question context window memory block score weight "
    "endpoint picker envoy stream chunk metric gauge counter histogram sample value label pod "
    "cluster replica worker engine kernel tensor layer head attention vector matrix gradient"
).split()


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of a workload; ``at`` is its arrival time in model seconds."""

    index: int
    at: float
    api: str  # "chat" or "completions"
    model: str
    max_tokens: int
    prompt_tokens: int
    prompt: str = ""
    messages: tuple[Mapping[str, str], ...] = ()
    group: str = ""  # tenant or adapter: what the request shares with others
    direct: int = -1  # >= 0: sent straight to that server (kv-pressure), not through the router
    headers: tuple[tuple[str, str], ...] = ()  # extra request headers (tenant id, objective)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.api == "chat" else "/v1/completions"

    def body(self, *, stream: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            # Fixed output length, whoever serves it (see module docstring).
            "min_tokens": self.max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.api == "chat":
            body["messages"] = [dict(m) for m in self.messages]
        else:
            body["prompt"] = self.prompt
        return body


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    requests: tuple[BenchRequest, ...]
    duration: float  # model seconds over which arrivals are spread
    rate: float  # mean arrivals per model second
    model: str = DEFAULT_MODEL
    lora_adapters: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        reqs = self.requests
        n = len(reqs)
        return {
            "name": self.name,
            "description": self.description,
            "requests": n,
            "duration_model_s": self.duration,
            "rate_per_model_s": self.rate,
            "mean_prompt_tokens": sum(r.prompt_tokens for r in reqs) / n if n else 0.0,
            "mean_output_tokens": sum(r.max_tokens for r in reqs) / n if n else 0.0,
            "lora_adapters": len(self.lora_adapters),
            "params": dict(self.params),
        }


# -- building blocks ---------------------------------------------------------------------------


def poisson_arrivals(rng: random.Random, rate: float, duration: float) -> list[float]:
    """Arrival times of a Poisson process with ``rate`` per second on [0, duration)."""
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be > 0 (got rate={rate}, duration={duration})")
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def text_of_tokens(rng: random.Random, tokens: int, lead: str = "") -> str:
    """ASCII text that the sim tokenizer turns into exactly ``tokens`` tokens.

    ``lead`` (e.g. a unique id) goes first so that otherwise similar prompts differ from their
    first block on, and never share prefix-cache blocks by accident.
    """
    nbytes = tokens * BYTES_PER_TOKEN
    words = rng.choices(_WORDS, k=nbytes // 4 + 8)
    text = (lead + " ".join(words))[:nbytes]
    return text.ljust(nbytes, ".")


def lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A log-normal draw (heavy right tail), rounded and clamped to [lo, hi]."""
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of n items: weight of rank k is 1 / k**s (s = 0 is uniform)."""
    return [1.0 / (k**s) for k in range(1, n + 1)]


def tenant_prompts(rng: random.Random, tenants: int, system_tokens: tuple[int, int]) -> list[str]:
    """One long system prompt per tenant, each starting differently (no accidental sharing)."""
    return [text_of_tokens(rng, rng.randint(*system_tokens), lead=f"[tenant {t}] You are the assistant of tenant {t}. ")
            for t in range(tenants)]


def tenant_turn(rng: random.Random, i: int, at: float, tenant: int, system: str, user_tokens: tuple[int, int],
                output: tuple[float, float, int], model: str, *, direct: int = -1) -> BenchRequest:
    """A chat request of ``tenant``: its system prompt and a unique question."""
    question = text_of_tokens(rng, rng.randint(*user_tokens), lead=f"q{i}: ")
    return BenchRequest(
        index=i,
        at=at,
        api="chat",
        model=model,
        max_tokens=lognormal_int(rng, output[0], output[1], 1, output[2]),
        prompt_tokens=(len(system) + len(question)) // BYTES_PER_TOKEN,
        messages=({"role": "system", "content": system}, {"role": "user", "content": question}),
        group=f"tenant-{tenant}",
        direct=direct,
    )


# -- the workloads -------------------------------------------------------------------------------


def shared_prefix(
    *,
    seed: int = 1,
    rate: float = 8.0,
    duration: float = 60.0,
    tenants: int = 24,
    system_tokens: tuple[int, int] = (2000, 4000),
    user_tokens: tuple[int, int] = (50, 300),
    output_median: float = 48.0,
    output_sigma: float = 0.8,
    output_max: int = 256,
    zipf_s: float = 0.6,
    model: str = DEFAULT_MODEL,
) -> Workload:
    """Chat requests from ``tenants`` tenants, each with its own long system prompt.

    With the defaults the prefix working set is ~72k tokens: about 2.2x one sim server's KV cache
    (2048 blocks x 16 tokens) and ~27 % of an 8-server fleet's.
    """
    rng = random.Random(seed)
    system_prompts = tenant_prompts(rng, tenants, system_tokens)
    weights = zipf_weights(tenants, zipf_s)
    requests = []
    for i, at in enumerate(poisson_arrivals(rng, rate, duration)):
        tenant = rng.choices(range(tenants), weights=weights)[0]
        requests.append(tenant_turn(rng, i, at, tenant, system_prompts[tenant], user_tokens,
                                    (output_median, output_sigma, output_max), model))
    working_set = sum(len(p) for p in system_prompts) // BYTES_PER_TOKEN
    return Workload(
        name="shared-prefix",
        description=(f"{tenants} tenants with {system_tokens[0]}-{system_tokens[1]}-token system prompts "
                     f"(prefix working set {working_set} tokens), Zipf s={zipf_s}, {rate:.1f} req/s"),
        requests=tuple(requests),
        duration=duration,
        rate=rate,
        model=model,
        params={"seed": seed, "tenants": tenants, "system_tokens": list(system_tokens),
                "user_tokens": list(user_tokens), "output_median": output_median,
                "output_sigma": output_sigma, "output_max": output_max, "zipf_s": zipf_s,
                "prefix_working_set_tokens": working_set},
    )


def mixed_lengths(
    *,
    seed: int = 2,
    rate: float = 20.0,
    duration: float = 60.0,
    prompt_median: float = 600.0,
    prompt_sigma: float = 1.0,
    prompt_range: tuple[int, int] = (32, 6000),
    output_median: float = 48.0,
    output_sigma: float = 1.0,
    output_max: int = 1024,
    model: str = DEFAULT_MODEL,
) -> Workload:
    """Unique completion prompts with log-normal (heavy-tailed) prompt and output lengths."""
    rng = random.Random(seed)
    requests = []
    for i, at in enumerate(poisson_arrivals(rng, rate, duration)):
        n_prompt = lognormal_int(rng, prompt_median, prompt_sigma, *prompt_range)
        requests.append(BenchRequest(
            index=i,
            at=at,
            api="completions",
            model=model,
            max_tokens=lognormal_int(rng, output_median, output_sigma, 1, output_max),
            prompt_tokens=n_prompt,
            prompt=text_of_tokens(rng, n_prompt, lead=f"#{seed}-{i} "),
        ))
    return Workload(
        name="mixed-lengths",
        description=(f"unique prompts, log-normal prompt (median {prompt_median:g}, sigma {prompt_sigma:g}) "
                     f"and output (median {output_median:g}, sigma {output_sigma:g}) lengths, {rate:.1f} req/s"),
        requests=tuple(requests),
        duration=duration,
        rate=rate,
        model=model,
        params={"seed": seed, "prompt_median": prompt_median, "prompt_sigma": prompt_sigma,
                "prompt_range": list(prompt_range), "output_median": output_median,
                "output_sigma": output_sigma, "output_max": output_max},
    )


def lora(
    *,
    seed: int = 3,
    rate: float = 20.0,
    duration: float = 60.0,
    adapters: int = 48,
    zipf_s: float = 1.0,
    prompt_tokens: tuple[int, int] = (100, 800),
    output_median: float = 48.0,
    output_sigma: float = 0.8,
    output_max: int = 256,
    model: str = DEFAULT_MODEL,
) -> Workload:
    """Completions for ``adapters`` LoRA adapters (more than the fleet's slots), Zipf popularity."""
    rng = random.Random(seed)
    names = tuple(f"adapter-{k:02d}" for k in range(adapters))
    weights = zipf_weights(adapters, zipf_s)
    requests = []
    for i, at in enumerate(poisson_arrivals(rng, rate, duration)):
        adapter = rng.choices(names, weights=weights)[0]
        n_prompt = rng.randint(*prompt_tokens)
        requests.append(BenchRequest(
            index=i,
            at=at,
            api="completions",
            model=adapter,
            max_tokens=lognormal_int(rng, output_median, output_sigma, 1, output_max),
            prompt_tokens=n_prompt,
            prompt=text_of_tokens(rng, n_prompt, lead=f"#{seed}-{i} "),
            group=adapter,
        ))
    return Workload(
        name="lora",
        description=f"{adapters} LoRA adapters, Zipf s={zipf_s}, {rate:.1f} req/s",
        requests=tuple(requests),
        duration=duration,
        rate=rate,
        model=model,
        lora_adapters=names,
        params={"seed": seed, "adapters": adapters, "zipf_s": zipf_s, "prompt_tokens": list(prompt_tokens),
                "output_median": output_median, "output_sigma": output_sigma, "output_max": output_max},
    )


def kv_pressure(
    *,
    seed: int = 4,
    rate: float = 6.0,
    duration: float = 60.0,
    servers: int = 4,
    tenants: int = 16,
    system_tokens: tuple[int, int] = (5000, 7000),
    user_tokens: tuple[int, int] = (200, 600),
    output_median: float = 48.0,
    output_sigma: float = 0.6,
    output_max: int = 192,
    zipf_s: float = 0.3,
    direct_fraction: float = 1 / 3,
    restart_at: float = 0.5,
    model: str = DEFAULT_MODEL,
) -> Workload:
    """What real fleets have and an EPP-only index cannot see (issue 16).

    Tenants' long system prompts fill most of the fleet's KV cache (with the defaults ~96k
    tokens of prefixes on a 4-server fleet of 4 x 2048 x 16 = 131k tokens of KV); about a third
    of the requests (``direct_fraction``) go straight to a server chosen at random (batch jobs,
    another gateway), caching and evicting blocks behind the router's back; and one server
    restarts at ``restart_at`` of the run (its cache empties; the harness does the restart).
    """
    rng = random.Random(seed)
    system_prompts = tenant_prompts(rng, tenants, system_tokens)
    weights = zipf_weights(tenants, zipf_s)
    requests = []
    for i, at in enumerate(poisson_arrivals(rng, rate, duration)):
        tenant = rng.choices(range(tenants), weights=weights)[0]
        direct = rng.randrange(servers) if rng.random() < direct_fraction else -1
        requests.append(tenant_turn(rng, i, at, tenant, system_prompts[tenant], user_tokens,
                                    (output_median, output_sigma, output_max), model, direct=direct))
    working_set = sum(len(p) for p in system_prompts) // BYTES_PER_TOKEN
    return Workload(
        name="kv-pressure",
        description=(f"{tenants} tenants with {system_tokens[0]}-{system_tokens[1]}-token system prompts "
                     f"(prefix working set {working_set} tokens), {direct_fraction:.0%} of requests straight to a "
                     f"random server, one server restarted at {restart_at:.0%} of the run, {rate:.1f} req/s"),
        requests=tuple(requests),
        duration=duration,
        rate=rate,
        model=model,
        params={"seed": seed, "servers": servers, "tenants": tenants, "system_tokens": list(system_tokens),
                "user_tokens": list(user_tokens), "output_median": output_median, "output_sigma": output_sigma,
                "output_max": output_max, "zipf_s": zipf_s, "direct_fraction": direct_fraction,
                "restart_at": restart_at, "prefix_working_set_tokens": working_set},
    )


FAIRNESS_HEADER = "x-llm-d-inference-fairness-id"
OBJECTIVE_HEADER = "x-llm-d-inference-objective"
HIGH_PRIORITY_OBJECTIVE = "critical"  # the EPP configs of the overload policies give it priority 10


def overload(
    *,
    seed: int = 4,
    rate: float = 40.0,
    duration: float = 30.0,
    light_share: float = 0.1,
    high_share: float = 0.01,
    prompt_tokens: tuple[int, int] = (200, 800),
    output_median: float = 64.0,
    output_sigma: float = 0.5,
    output_max: int = 256,
    model: str = DEFAULT_MODEL,
) -> Workload:
    """Two tenants overloading the fleet, plus a few requests of a high-priority objective.

    Meant to run at twice the fleet's capacity: tenant ``A`` sends ``light_share`` of the
    arrivals (0.1 of 2x = 20 % of capacity), ``high`` (tenant ``ops``, objective
    ``critical``) ``high_share``, tenant ``B`` floods with the rest. Unique prompts (no prefix
    sharing), so only queueing decides latency.
    """
    rng = random.Random(seed)
    requests = []
    for i, at in enumerate(poisson_arrivals(rng, rate, duration)):
        u = rng.random()
        group = "high" if u < high_share else "A" if u < high_share + light_share else "B"
        headers: tuple[tuple[str, str], ...] = ((FAIRNESS_HEADER, "ops" if group == "high" else group),)
        if group == "high":
            headers += ((OBJECTIVE_HEADER, HIGH_PRIORITY_OBJECTIVE),)
        n_prompt = rng.randint(*prompt_tokens)
        requests.append(BenchRequest(
            index=i,
            at=at,
            api="completions",
            model=model,
            max_tokens=lognormal_int(rng, output_median, output_sigma, 1, output_max),
            prompt_tokens=n_prompt,
            prompt=text_of_tokens(rng, n_prompt, lead=f"#{seed}-{i} "),
            group=group,
            headers=headers,
        ))
    return Workload(
        name="overload",
        description=(f"tenant A {light_share:.0%} and high-priority objective {high_share:.0%} of the arrivals, "
                     f"tenant B the rest; {rate:.1f} req/s"),
        requests=tuple(requests),
        duration=duration,
        rate=rate,
        model=model,
        params={"seed": seed, "light_share": light_share, "high_share": high_share,
                "prompt_tokens": list(prompt_tokens), "output_median": output_median,
                "output_sigma": output_sigma, "output_max": output_max},
    )


WORKLOADS = {"shared-prefix": shared_prefix, "mixed-lengths": mixed_lengths, "lora": lora, "kv-pressure": kv_pressure,
             "overload": overload}


def build(name: str, **kwargs: Any) -> Workload:
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None
    return factory(**kwargs)

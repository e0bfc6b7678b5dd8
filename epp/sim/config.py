"""Configuration of one simulated model server.

All latency constants are in *model* seconds: what an 8B model on one H100
would take. The engine turns them into wall-clock time with
``time_scale / speed`` so tests can run 10x faster without changing any ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.sim.kvevents import EVENT_FORMATS, KVEventsConfig

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"

ENGINE_FLAVORS = ("vllm", "sglang")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything one simulated server needs; a fleet derives one per server."""

    # Identity
    model: str = DEFAULT_MODEL
    # Names the server answers to; the first one is used in metrics labels.
    served_model_names: tuple[str, ...] = ()
    name: str = "sim-0"
    max_model_len: int = 8192

    # Scheduler (vLLM V1 defaults for an 8B model on one H100)
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048

    # Step time = c_step + c_dec * decoding_seqs + c_pf * prefill_tokens (+ LoRA loads)
    c_step: float = 0.010
    c_dec: float = 0.0004
    c_pf: float = 0.0002
    # Relative standard deviation of each step's duration, clamped to +-3 sigma.
    jitter: float = 0.03

    # Paged KV cache
    block_size: int = 16
    num_gpu_blocks: int = 2048
    # Seeds the block-hash chain like vLLM's PYTHONHASHSEED; None = random per server start.
    hash_seed: str | None = None

    # KV events (vLLM's --kv-events-config); None = off. The format is "map"
    # (vLLM's current msgpack encoding) or "array" (the older positional one).
    kv_events: KVEventsConfig | None = None
    kv_events_format: str = "map"

    # LoRA
    max_loras: int = 4
    lora_load_s: float = 0.050
    lora_adapters: tuple[str, ...] = ()

    # Output length when ignore_eos is not set: log-normal, capped by max_tokens.
    output_len_median: int = 200
    output_len_sigma: float = 1.0

    # Time: wall seconds = model seconds * time_scale / speed
    time_scale: float = 1.0
    speed: float = 1.0
    seed: int = 0

    # Failure injection (probabilities in [0, 1])
    fail_rate: float = 0.0
    hang_rate: float = 0.0

    engine_flavor: str = "vllm"

    def __post_init__(self) -> None:
        if not self.served_model_names:
            object.__setattr__(self, "served_model_names", (self.model,))
        if self.engine_flavor not in ENGINE_FLAVORS:
            raise ValueError(f"engine_flavor must be one of {ENGINE_FLAVORS}")
        if self.kv_events_format not in EVENT_FORMATS:
            raise ValueError(f"kv_events_format must be one of {EVENT_FORMATS}")
        for attr in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_gpu_blocks", "max_model_len"):
            if getattr(self, attr) < 1:
                raise ValueError(f"{attr} must be >= 1")
        if self.time_scale <= 0 or self.speed <= 0:
            raise ValueError("time_scale and speed must be > 0")
        if not 0.0 <= self.fail_rate <= 1.0 or not 0.0 <= self.hang_rate <= 1.0:
            raise ValueError("fail_rate and hang_rate are probabilities in [0, 1]")
        if self.max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        # A request longer than the whole KV cache could never finish: it would
        # preempt itself forever. vLLM refuses to start in that case, so do we.
        if self.num_gpu_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"KV cache ({self.num_gpu_blocks} blocks x {self.block_size} tokens) "
                f"cannot hold one max_model_len={self.max_model_len} sequence"
            )

    @property
    def served_name(self) -> str:
        """The primary served model name (metrics label, /v1/models root entry)."""
        return self.served_model_names[0]

    @property
    def wall_factor(self) -> float:
        """Multiply model seconds by this to get wall-clock seconds."""
        return self.time_scale / self.speed

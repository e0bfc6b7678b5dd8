"""``token-producer``: the prompt's token IDs, exactly as the engine will see them.

Precise prefix routing needs the engine's own token IDs; an estimate silently destroys it.
Two backends:

- **render** (default): vLLM's ``POST /v1/completions/render`` / ``/v1/chat/completions/render``
  with the request's own body (model rewritten if the EPP rewrote it), answered with the
  token IDs vLLM would run. Without ``vllm.url`` we ask a schedulable endpoint of the pool
  (round robin over the request's candidates; on a connection failure, the next one), so
  there is no tokenizer or chat template to keep in sync. This is I/O on the request path:
  the request's stream is parked while it waits (an ``AsyncDataProducer``), on a keep-alive
  connection (``epp.datalayer.httpclient``, ~60 µs of CPU per call), bounded by
  ``vllm.timeout``.
- **local**: a Hugging Face ``tokenizers`` ``tokenizer.json`` plus the model's Jinja chat
  template (the optional ``tokenizer`` extra: ``pip install 'epp[tokenizer]'``). No network,
  but CPU on the serving process, and it must match the engine's tokenizer and template.

Identical prompts (same API, model and prompt text) reuse their token IDs from a small LRU
(``cacheSize``). Failures (timeout, HTTP error, unparsable answer) never fail the request: it
gets no token IDs, so the precise prefix producer matches nothing for it; each kind of
failure is counted (``epp_token_producer_requests_total``) and logged once.

Deviation: upstream auto-creates an ``estimate`` backend (about 4 bytes per token, fake IDs)
when a plugin needs token IDs and no token-producer is configured; we auto-create this
plugin with the render backend, because fake IDs never match the engines' events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgspec
import xxhash
from prometheus_client import Counter

from epp.datalayer.httpclient import FetchError, ScrapeClient
from epp.framework import AsyncDataProducer, register, registry
from epp.framework.params import Duration
from epp.framework.plugin import Handle
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest
from epp.kvcache.hasher import token_bytes
from epp.observability.metrics import REGISTRY
from epp.requestcontrol.rewrite import reserialize
from plugins.requestcontrol.data import TOKENIZED_PROMPT_KEY, TokenizedPrompt

log = logging.getLogger(__name__)

COMPLETIONS_RENDER = "/v1/completions/render"
CHAT_RENDER = "/v1/chat/completions/render"
MAX_RENDER_BYTES = 64 << 20

TOKEN_REQUESTS = Counter("epp_token_producer_requests_total",
                         "[ALPHA] Token-ID lookups of token-producer by backend and outcome.",
                         ("plugin_name", "backend", "outcome"), registry=REGISTRY)


class _Rendered(msgspec.Struct):
    token_ids: list[int]


_decode_chat = msgspec.json.Decoder(_Rendered).decode
_decode_completions = msgspec.json.Decoder(list[_Rendered]).decode


@dataclass
class VllmRenderConfig:
    url: str = ""  # e.g. http://vllm-render:8000; empty: a schedulable endpoint of the pool
    timeout: Duration = Duration(5.0)  # completions
    mmTimeout: Duration = Duration(30.0)  # chat (may carry images); upstream uses the larger of both
    __param_aliases__ = {"http": "url"}  # upstream's older name

    def validate(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"'url' must be an http(s) URL, got {self.url!r}")
        if self.timeout <= 0 or self.mmTimeout <= 0:
            raise ValueError("'timeout' and 'mmTimeout' must be > 0")


@dataclass
class LocalTokenizerConfig:
    tokenizerPath: str  # a Hugging Face tokenizer.json
    chatTemplate: str = ""  # the model's Jinja chat template (text) ...
    chatTemplatePath: str = ""  # ... or a file holding it
    bosToken: str = ""  # values the template may use
    eosToken: str = ""
    addSpecialTokens: bool = True  # for completions prompts (vLLM adds BOS); chat templates carry their own

    def validate(self) -> None:
        if self.chatTemplate and self.chatTemplatePath:
            raise ValueError("set 'chatTemplate' or 'chatTemplatePath', not both")


@dataclass
class TokenProducerParams:
    modelName: str = ""  # if set, the model name sent to the render endpoint (upstream stamps it)
    vllm: VllmRenderConfig = field(default_factory=VllmRenderConfig)
    local: LocalTokenizerConfig | None = None
    cacheSize: int = 1024  # identical prompts remembered (0 disables)

    def validate(self) -> None:
        if self.cacheSize < 0:
            raise ValueError("'cacheSize' must be >= 0")


class LocalTokenizer:
    """tokenizer.json + chat template, loaded once."""

    def __init__(self, cfg: LocalTokenizerConfig) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("local tokenization needs the 'tokenizers' package (pip install 'epp[tokenizer]')") from None
        try:
            self.tokenizer = Tokenizer.from_file(cfg.tokenizerPath)
        except Exception as e:
            raise ValueError(f"cannot load tokenizer {cfg.tokenizerPath!r}: {e}") from None
        self.cfg = cfg
        text = cfg.chatTemplate
        if cfg.chatTemplatePath:
            try:
                with open(cfg.chatTemplatePath, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ValueError(f"cannot read chat template {cfg.chatTemplatePath!r}: {e}") from None
        self.template = None
        if text:
            try:
                import jinja2
                import jinja2.sandbox
            except ImportError:
                raise ValueError("chat templates need the 'jinja2' package (pip install 'epp[tokenizer]')") from None
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            try:
                self.template = env.from_string(text)
            except jinja2.TemplateError as e:
                raise ValueError(f"invalid chat template: {e}") from None

    def tokenize(self, request: InferenceRequest) -> bytes | None:
        payload = request.payload or {}
        if request.api == "chat/completions":
            if self.template is None:
                return None
            text = self.template.render(messages=payload.get("messages", []), add_generation_prompt=True,
                                        tools=payload.get("tools"), bos_token=self.cfg.bosToken,
                                        eos_token=self.cfg.eosToken)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        else:
            prompt = payload.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                prompt = prompt[0]  # a batch goes to one endpoint: route on its first prompt
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return token_bytes(prompt)  # already token IDs
            if not isinstance(prompt, str):
                return None
            ids = self.tokenizer.encode(prompt, add_special_tokens=self.cfg.addSpecialTokens).ids
        return token_bytes(ids)


@register("token-producer")
class TokenProducer(AsyncDataProducer):
    Params = TokenProducerParams
    produces = frozenset({TOKENIZED_PROMPT_KEY})

    def __init__(self, name: str | None = None, params: TokenProducerParams | None = None) -> None:
        super().__init__(name, params)
        p: TokenProducerParams = self.params
        self.local = LocalTokenizer(p.local) if p.local is not None else None
        self.backend = "local" if self.local is not None else "render"
        self._clients: dict[bool, ScrapeClient] = {}
        self._cache: OrderedDict[tuple, TokenizedPrompt] = OrderedDict()
        self._next = 0
        self._warned: set[str] = set()
        self._counters = {o: TOKEN_REQUESTS.labels(self.name, self.backend, o)
                          for o in ("ok", "cached", "failed", "unsupported")}

    @classmethod
    def create(cls, name: str, params: TokenProducerParams, handle: Handle) -> "TokenProducer":
        return cls(name, params)

    async def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    # --- request path ------------------------------------------------------------------------
    async def produce(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Candidate]) -> None:
        if TOKENIZED_PROMPT_KEY in cycle:
            return
        if request.payload is None or request.api not in ("completions", "chat/completions"):
            self._counters["unsupported"].inc()
            return
        model = request.target_model or request.incoming_model
        ck = None
        if self.params.cacheSize:
            ck = (request.api, model, request.cache_salt, xxhash.xxh64_intdigest(request.prefix_input or request.body))
            hit = self._cache.get(ck)
            if hit is not None:
                self._cache.move_to_end(ck)
                cycle[TOKENIZED_PROMPT_KEY] = hit
                self._counters["cached"].inc()
                return
        if self.local is not None:
            data = self._local(request)
        else:
            task = asyncio.get_running_loop().create_task(self._render(request, candidates))
            try:
                data = await task
            except asyncio.CancelledError:
                task.cancel()  # the client went away or the deadline passed
                raise
        if data is None:
            self._counters["failed"].inc()
            return
        tp = TokenizedPrompt(data, self.backend)
        cycle[TOKENIZED_PROMPT_KEY] = tp
        self._counters["ok"].inc()
        if ck is not None:
            self._cache[ck] = tp
            if len(self._cache) > self.params.cacheSize:
                self._cache.popitem(last=False)

    def _local(self, request: InferenceRequest) -> bytes | None:
        try:
            return self.local.tokenize(request)  # type: ignore[union-attr]
        except Exception as e:
            self._warn("local", f"local tokenization failed: {type(e).__name__}: {e}")
            return None

    async def _render(self, request: InferenceRequest, candidates: Sequence[Candidate]) -> bytes | None:
        chat = request.api == "chat/completions"
        path = CHAT_RENDER if chat else COMPLETIONS_RENDER
        body = self._render_body(request)
        client = self._client(chat)
        bases = self._bases(candidates)
        for i, base in enumerate(bases):
            try:
                raw = await client.post(base + path, body)
            except FetchError as e:
                # Another endpoint only if this one could not be reached; an answer (4xx/5xx) is final.
                if "cannot connect" in str(e) and i + 1 < len(bases):
                    continue
                self._warn("http", f"render failed: {e}")
                return None
            try:
                rendered = _decode_chat(raw) if chat else _decode_completions(raw)
                ids = rendered.token_ids if chat else rendered[0].token_ids
                return token_bytes(ids)
            except (msgspec.DecodeError, msgspec.ValidationError, IndexError, OverflowError) as e:
                self._warn("decode", f"render answer from {base}{path} has no token_ids list: {e}")
                return None
        return None

    def _render_body(self, request: InferenceRequest) -> bytes:
        model = self.params.modelName or request.target_model
        payload = request.payload
        if payload is not None and model and payload.get("model") != model:
            return reserialize(payload, model)
        return request.body

    def _bases(self, candidates: Sequence[Candidate]) -> list[str]:
        url = self.params.vllm.url
        if url:
            return [url.rstrip("/")]
        n = len(candidates)
        if n == 0:
            return []
        start = self._next % n
        self._next += 1
        picked = [candidates[(start + k) % n] for k in range(min(n, 2))]
        return [_base_url(c) for c in picked]

    def _client(self, chat: bool) -> ScrapeClient:
        c = self._clients.get(chat)
        if c is None:
            v = self.params.vllm
            timeout = max(v.timeout, v.mmTimeout) if chat else v.timeout
            c = self._clients[chat] = ScrapeClient(timeout=timeout, max_bytes=MAX_RENDER_BYTES)
        return c

    def _warn(self, kind: str, message: str) -> None:
        if kind in self._warned:
            log.debug("token-producer %s: %s", self.name, message)
            return
        self._warned.add(kind)
        log.warning("token-producer %s: %s (the request is routed without token IDs; further ones are "
                    "counted in epp_token_producer_requests_total, not logged)", self.name, message)


def _base_url(c: Candidate) -> str:
    address = c.metadata.address
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{c.metadata.port}"


registry.register_default_producer(TOKENIZED_PROMPT_KEY, "token-producer")

"""The aiohttp application of one simulated server: vLLM's OpenAI-compatible API.

Every response carries ``x-sim-server: <name>`` and ``x-sim-address: host:port``
so a test or benchmark can tell which server answered without parsing bodies.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from epp.sim.config import SimConfig
from epp.sim.engine import Engine
from epp.sim.metrics import CONTENT_TYPE, MetricsPage
from epp.sim.protocol import (
    APIError,
    Generation,
    StreamEncoder,
    chat_prompt_ids,
    full_response,
    new_id,
    parse_generation,
    render_replies,
    resolve_model,
)
from epp.sim.scheduler import SimRequest
from epp.sim.tokenizer import tokenize

SERVER_HEADER = "x-sim-server"
ADDRESS_HEADER = "x-sim-address"
# A request header that makes the server answer with that HTTP status at once.
FORCE_ERROR_HEADER = "x-sim-force-error"
VLLM_VERSION = "0.11.0"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def _error(err: APIError) -> web.Response:
    return _json(err.body(), status=err.status)


async def _read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"Invalid JSON body: {exc}") from None


class SimApp:
    """Routes and handlers bound to one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config: SimConfig = engine.config
        self.address = ""  # set by the fleet once the port is bound
        self._fail_rng = random.Random(self.config.seed ^ 0xFA11)
        self._closing = asyncio.Event()
        self._metrics = MetricsPage(engine)
        self.app = self._build()

    def _build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._stamp)
        r = app.router
        r.add_post("/v1/completions", self._api(self.completions))
        r.add_post("/v1/chat/completions", self._api(self.chat_completions))
        r.add_post("/v1/completions/render", self._api(self.render_completion))
        r.add_post("/v1/chat/completions/render", self._api(self.render_chat))
        r.add_get("/v1/models", self.models)
        r.add_post("/tokenize", self._api(self.tokenize))
        r.add_post("/v1/load_lora_adapter", self._api(self.load_lora))
        r.add_post("/v1/unload_lora_adapter", self._api(self.unload_lora))
        r.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        r.add_get("/health", self.health)
        r.add_get("/ping", self.health)
        r.add_post("/ping", self.health)
        r.add_get("/version", self.version)
        r.add_get("/metrics", self.metrics)
        r.add_get("/get_model_info", self.model_info)
        r.add_get("/get_server_info", self.server_info)
        return app

    def close(self) -> None:
        """Release hung requests so the HTTP server can shut down quickly."""
        self._closing.set()

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SERVER_HEADER] = self.config.name
        if self.address:
            response.headers[ADDRESS_HEADER] = self.address

    @staticmethod
    def _api(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except APIError as err:
                return _error(err)

        return wrapped

    # -- generation ----------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _inject_failure(self, request: web.Request) -> None:
        forced = request.headers.get(FORCE_ERROR_HEADER)
        if forced:
            try:
                status = int(forced)
            except ValueError:
                status = 500
            if not 400 <= status <= 599:
                status = 500
            raise APIError(status, f"Error forced by the {FORCE_ERROR_HEADER} header.")
        cfg = self.config
        if cfg.fail_rate and self._fail_rng.random() < cfg.fail_rate:
            raise APIError(500, "Simulated internal server error (--fail-rate).")
        if cfg.hang_rate and self._fail_rng.random() < cfg.hang_rate:
            # Never answer; the client's timeout (or our shutdown) ends it.
            await self._closing.wait()
            raise APIError(503, "Server is shutting down.")

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        await self._inject_failure(request)
        if self._closing.is_set():
            raise APIError(503, "Server is shutting down.")
        body = await _read_json(request)
        gen = parse_generation(body, chat, self.config, self.engine.scheduler.lora)
        engine = self.engine
        seqs = [
            engine.submit(
                prompt,
                model=gen.model,
                lora=gen.lora,
                max_tokens=gen.max_tokens,
                ignore_eos=gen.ignore_eos,
                min_tokens=gen.min_tokens,
                stream=gen.stream,
            )
            for prompt in gen.prompts
            for _ in range(gen.n)
        ]
        try:
            if gen.stream:
                return await self._stream(request, gen, seqs)
            while True:
                pending = [s for s in seqs if not s.finished]
                if not pending:
                    break
                await engine.wait(pending)
            if any(s.finish_reason == "abort" for s in seqs):
                raise APIError(503, "Request aborted: server is shutting down.")
            return _json(full_response(gen, new_id(chat), seqs))
        finally:
            # No-op for finished sequences; frees KV if the client went away.
            for s in seqs:
                engine.abort(s)

    async def _stream(self, request: web.Request, gen: Generation, seqs: list[SimRequest]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await self._stream_body(resp, gen, seqs)
        except ConnectionResetError:
            pass  # the client went away; _generate aborts the sequences
        return resp

    async def _stream_body(self, resp: web.StreamResponse, gen: Generation, seqs: list[SimRequest]) -> None:
        enc = StreamEncoder(gen, new_id(gen.chat), seqs)
        if gen.chat:
            await resp.write("".join(enc.role(i) for i in range(len(seqs))).encode())
        sent = [0] * len(seqs)
        aborted = False
        while True:
            frames: list[str] = []
            done = True
            for index, seq in enumerate(seqs):
                n_out = seq.num_output
                reason = seq.finish_reason
                if reason == "abort":
                    aborted = True
                    continue
                for pos in range(sent[index], n_out):
                    last = reason is not None and pos == n_out - 1
                    frames.append(enc.token(index, pos, reason if last else None))
                sent[index] = n_out
                if reason is None:
                    done = False
            if frames:
                await resp.write("".join(frames).encode())
                continue  # tokens may have arrived while we wrote
            if aborted:
                await resp.write((enc.error(APIError(503, "Request aborted: server is shutting down.")) +
                                  enc.DONE).encode())
                return
            if done:
                break
            await self.engine.wait([s for s in seqs if not s.finished])
        tail = enc.usage(seqs) if gen.include_usage else ""
        await resp.write((tail + enc.DONE).encode())
        await resp.write_eof()

    # -- tokens --------------------------------------------------------------------

    async def _token_ids(self, request: web.Request) -> list[int]:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        resolve_model(body, self.config, self.engine.scheduler.lora)
        if "messages" in body:
            return chat_prompt_ids(body["messages"])
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string", "prompt")
        return tokenize(prompt)

    async def tokenize(self, request: web.Request) -> web.Response:
        ids = await self._token_ids(request)
        return _json({"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids,
                      "token_strs": None})

    async def _render(self, request: web.Request, chat: bool) -> list[dict[str, Any]]:
        # The very parsing generation uses, so the ids are the engine's.
        body = await _read_json(request)
        gen = parse_generation(body, chat, self.config, self.engine.scheduler.lora)
        return render_replies(gen, body)

    async def render_completion(self, request: web.Request) -> web.Response:
        return _json(await self._render(request, chat=False))

    async def render_chat(self, request: web.Request) -> web.Response:
        return _json((await self._render(request, chat=True))[0])

    # -- models and adapters -------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        cfg = self.config
        created = int(self.engine.scheduler.stats.created)
        data: list[dict[str, Any]] = [
            {"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": cfg.model,
             "parent": None, "max_model_len": cfg.max_model_len, "permission": []}
            for name in cfg.served_model_names
        ]
        for name, path in self.engine.scheduler.lora.registered.items():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": path,
                         "parent": cfg.served_name, "max_model_len": None, "permission": []})
        return _json({"object": "list", "data": data})

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, "lora_name is required", "lora_name")
        if name in self.config.served_model_names:
            raise APIError(400, f"The lora adapter '{name}' clashes with a served model name.", "lora_name")
        path = body.get("lora_path") or f"/adapters/{name}"
        if not self.engine.scheduler.lora.register(name, str(path)):
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, "lora_name is required", "lora_name")
        if not self.engine.scheduler.lora.unregister(name):
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # -- operations ----------------------------------------------------------------

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /reset_prefix_cache[?reset_running_requests=true]``: 200, or 409 if blocks are in use."""
        reset_running = request.query.get("reset_running_requests", "false").lower() in ("true", "1", "yes", "on")
        if not self.engine.reset_prefix_cache(reset_running):
            return _json({"detail": "Prefix cache reset failed."}, status=409)
        return web.Response(status=200)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": VLLM_VERSION})

    async def metrics(self, request: web.Request) -> web.Response:
        text = self._metrics.render(time.time())
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def model_info(self, request: web.Request) -> web.Response:
        # sglang-router / vllm-router probe this to learn the model id.
        return _json({"model_path": self.config.model, "is_generation": True})

    async def server_info(self, request: web.Request) -> web.Response:
        cfg = self.config
        return _json({"model_path": cfg.model, "served_model_name": cfg.served_name,
                      "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
                      "block_size": cfg.block_size, "num_gpu_blocks": cfg.num_gpu_blocks})

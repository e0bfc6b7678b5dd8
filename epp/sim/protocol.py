"""OpenAI wire format: request parsing and validation, response and SSE chunk bodies.

Shapes follow vLLM's OpenAI server, which the ``openai`` SDK and the peer
routers accept. Unknown request fields are ignored (routers inject their own).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from epp.sim.config import SimConfig
from epp.sim.lora import LoraSlots
from epp.sim.scheduler import SimRequest
from epp.sim.tokenizer import render_chat, tokenize


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


# ---------------------------------------------------------------------------------
# errors

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}


class APIError(Exception):
    """An error to send back in OpenAI's ``{"error": {...}}`` shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        err_type = _ERROR_TYPES.get(self.status, "InternalServerError" if self.status >= 500 else "APIError")
        return {"error": {"message": self.message, "type": err_type, "param": self.param, "code": self.status}}


# ---------------------------------------------------------------------------------
# requests


@dataclass(slots=True)
class Generation:
    """A validated completions or chat request."""

    chat: bool
    model: str  # as named by the client: a served name or an adapter
    lora: str | None
    prompts: list[list[int]]
    n: int
    max_tokens: int
    ignore_eos: bool
    min_tokens: int
    stream: bool
    include_usage: bool


def resolve_model(body: Mapping[str, Any], config: SimConfig, lora: LoraSlots) -> tuple[str, str | None]:
    """(model name, adapter or None); a missing model means the base model, as in vLLM."""
    model = body.get("model")
    if model is None:
        return config.served_name, None
    if not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    if model in config.served_model_names:
        return model, None
    if model in lora.registered:
        return model, model
    raise APIError(404, f"The model `{model}` does not exist.", "model")


def _int_field(body: Mapping[str, Any], name: str, default: int | None, minimum: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer", name)
    if value < minimum:
        raise APIError(400, f"{name} must be at least {minimum}, got {value}.", name)
    return value


def _completion_prompts(prompt: Any) -> list[list[int]]:
    """prompt: str | list[str] | list[int] | list[list[int]] -> token ids per prompt."""
    if isinstance(prompt, str):
        return [tokenize(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [tokenize(p) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, or token ids", "prompt")


def chat_prompt_ids(messages: Any) -> list[int]:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
        raise APIError(400, "messages must be a non-empty list of objects", "messages")
    return tokenize(render_chat(messages))


def parse_generation(body: Any, chat: bool, config: SimConfig, lora: LoraSlots) -> Generation:
    if not isinstance(body, Mapping):
        raise APIError(400, "request body must be a JSON object")
    model, adapter = resolve_model(body, config, lora)
    if chat:
        prompts = [chat_prompt_ids(body.get("messages"))]
        max_tokens = _int_field(body, "max_completion_tokens", None, 1)
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens", None, 1)
    else:
        if "prompt" not in body:
            raise APIError(400, "prompt is required", "prompt")
        prompts = _completion_prompts(body["prompt"])
        if not all(prompts):
            raise APIError(400, "The decoder prompt cannot be empty", "prompt")
        # vLLM's completions default.
        max_tokens = _int_field(body, "max_tokens", 16, 1)
    n = _int_field(body, "n", 1, 1) or 1
    min_tokens = _int_field(body, "min_tokens", 0, 0) or 0
    limit = config.max_model_len
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        max_tokens = limit - longest
        if max_tokens < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{longest} input tokens. Please reduce the length of the input messages.",
                "messages" if chat else "prompt",
            )
    elif longest + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            "max_tokens",
        )
    if min_tokens > max_tokens:
        raise APIError(400, f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
                       "min_tokens")
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    include_usage = bool(stream and isinstance(options, Mapping) and options.get("include_usage"))
    return Generation(
        chat=chat,
        model=model,
        lora=adapter,
        prompts=prompts,
        n=n,
        max_tokens=max_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)),
        min_tokens=min_tokens,
        stream=stream,
        include_usage=include_usage,
    )


# ---------------------------------------------------------------------------------
# generated text

# Tokens are drawn from a small fixed list of words so responses look like text
# and JSON encoding can be precomputed.
_WORDS = (
    " the", " of", " and", " to", " a", " in", " is", " that", " for", " it", " as", " with",
    " was", " on", " be", " by", " this", " are", " from", " at", " or", " an", " which", " model",
    " token", " cache", " request", " server", " time", " data", " batch", " queue", " prefix",
    " route", " fast", " will", " can", " more", " each", " one", " two", " new", " we", " all",
    " not", " when", " has", " its", " into", " than", " other", " some", " these", " many",
    " first", " then", " may", " only", " also", " after", " where", " most", ".", ",",
)
_WORDS_JSON = tuple(json.dumps(w) for w in _WORDS)
_WORD_MASK = len(_WORDS) - 1
assert len(_WORDS) & _WORD_MASK == 0, "word list length must be a power of two"


def _text_offset(req: SimRequest) -> int:
    return req.prompt_len * 7 + len(req.rid)


def output_text(req: SimRequest) -> str:
    off = _text_offset(req)
    return "".join(_WORDS[(off + i) & _WORD_MASK] for i in range(req.num_output))


# ---------------------------------------------------------------------------------
# responses


def _usage(seqs: Sequence[SimRequest], n: int) -> dict[str, Any]:
    # With n > 1 the prompt is processed once, so count each prompt once.
    firsts = seqs[::n]
    prompt = sum(s.prompt_len for s in firsts)
    cached = sum(max(0, s.cached_tokens) for s in firsts)
    completion = sum(s.num_output for s in seqs)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


# Sampling fields copied from the request into a render reply when present; the
# length fields always appear, resolved as the engine resolves them.
_ECHOED_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                    "frequency_penalty", "repetition_penalty")


def render_replies(gen: Generation, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """vLLM's render reply: one ``GenerateRequest`` per prompt, with the engine's token ids.

    ``token_ids`` are exactly what generation would feed the engine (same
    parsing, same tokenizer), so they match the ``token_ids`` of its KV events.
    ``sampling_params`` is a subset of vLLM's (see _ECHOED_SAMPLING).
    """
    sampling: dict[str, Any] = {k: body[k] for k in _ECHOED_SAMPLING if body.get(k) is not None}
    sampling.update(n=gen.n, max_tokens=gen.max_tokens, min_tokens=gen.min_tokens, ignore_eos=gen.ignore_eos)
    options = body.get("stream_options")
    priority = body.get("priority", 0)
    return [
        {
            "request_id": new_id(gen.chat),
            "token_ids": ids,
            "features": None,
            "sampling_params": sampling,
            "model": gen.model,
            "stream": gen.stream,
            "stream_options": options if isinstance(options, Mapping) else None,
            "cache_salt": body.get("cache_salt"),
            "priority": priority if isinstance(priority, int) else 0,
            "kv_transfer_params": body.get("kv_transfer_params"),
        }
        for ids in gen.prompts
    ]


def full_response(gen: Generation, rid: str, seqs: Sequence[SimRequest]) -> dict[str, Any]:
    created = int(time.time())
    choices: list[dict[str, Any]] = []
    for index, seq in enumerate(seqs):
        text = output_text(seq)
        if gen.chat:
            choices.append({
                "index": index,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": None,
            })
        else:
            choices.append({
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": None,
            })
    return {
        "id": rid,
        "object": "chat.completion" if gen.chat else "text_completion",
        "created": created,
        "model": gen.model,
        "choices": choices,
        "usage": _usage(seqs, gen.n),
    }


class StreamEncoder:
    """Builds SSE frames from string templates: one JSON encode per stream, not per token."""

    __slots__ = ("gen", "_head", "_offsets")

    def __init__(self, gen: Generation, rid: str, seqs: Sequence[SimRequest]) -> None:
        self.gen = gen
        obj = "chat.completion.chunk" if gen.chat else "text_completion"
        head = _dumps({"id": rid, "object": obj, "created": int(time.time()), "model": gen.model})
        # '{"id": ..., "model": "m"' -- left open so choices can be appended.
        self._head = "data: " + head[:-1] + ',"choices":['
        self._offsets = [_text_offset(s) for s in seqs]

    def role(self, index: int) -> str:
        return (f'{self._head}{{"index":{index},"delta":{{"role":"assistant","content":""}},'
                '"logprobs":null,"finish_reason":null}]}\n\n')

    def token(self, index: int, position: int, finish_reason: str | None) -> str:
        word = _WORDS_JSON[(self._offsets[index] + position) & _WORD_MASK]
        reason = "null" if finish_reason is None else f'"{finish_reason}"'
        if self.gen.chat:
            return (f'{self._head}{{"index":{index},"delta":{{"content":{word}}},'
                    f'"logprobs":null,"finish_reason":{reason},"stop_reason":null}}]}}\n\n')
        return (f'{self._head}{{"index":{index},"text":{word},'
                f'"logprobs":null,"finish_reason":{reason},"stop_reason":null}}]}}\n\n')

    def usage(self, seqs: Sequence[SimRequest]) -> str:
        return f'{self._head}],"usage":{_dumps(_usage(seqs, self.gen.n))}}}\n\n'

    @staticmethod
    def error(err: APIError) -> str:
        return f"data: {_dumps(err.body())}\n\n"

    DONE = "data: [DONE]\n\n"

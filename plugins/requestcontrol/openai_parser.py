"""``openai-parser``: understands OpenAI-style request bodies and response usage (upstream §1.5-1.6).

The API type comes from the request path (``:path``, else ``x-original-path``, else
``x-forwarded-path``, else ``/v1/completions``) by suffix, as upstream does; each type has
its own required field. The parser also derives ``prefix_input``, the text the prefix-cache
producer hashes: the prompt for completions, the serialized messages for chat, etc.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Mapping

from epp.framework import ParseError, Parser, UsageReader, register
from epp.framework.types import InferenceRequest
from epp.framework.headers import OBJECTIVE, control_header
from plugins.requestcontrol.usage import JSONUsageReader, SSEUsageReader, is_event_stream

DEFAULT_PATH = "/v1/completions"

CONVERSATIONS = "conversations"
RESPONSES = "responses"
CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

# suffix -> api, in upstream's matching order (the longer chat suffix before completions)
_SUFFIXES = (
    ("/conversations", CONVERSATIONS),
    ("/responses", RESPONSES),
    ("/chat/completions", CHAT),
    ("/completions", COMPLETIONS),
    ("/embeddings", EMBEDDINGS),
)

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def request_path(headers: Mapping[str, str]) -> str:
    return headers.get(":path") or headers.get("x-original-path") or headers.get("x-forwarded-path") or DEFAULT_PATH


def api_from_path(path: str) -> str:
    for suffix, api in _SUFFIXES:
        if path.endswith(suffix):
            return api
    return COMPLETIONS


def _nonempty(v: Any) -> bool:
    return isinstance(v, (str, list)) and len(v) > 0


def _validate(api: str, payload: dict[str, Any]) -> None:
    if api == CHAT:
        msgs = payload.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(x, dict) for x in msgs):
            raise ParseError("invalid chat completions request: must have valid messages field")
    elif api == COMPLETIONS:
        if not _nonempty(payload.get("prompt")):
            raise ParseError("invalid completions request: must have prompt field")
    elif api == RESPONSES:
        if payload.get("input") is None:
            raise ParseError("invalid responses request: must have input field")
    elif api == CONVERSATIONS:
        items = payload.get("items")
        if not isinstance(items, list) or not items:
            raise ParseError("invalid conversations request: must have items field")
    elif api == EMBEDDINGS:
        if not _nonempty(payload.get("input")):
            raise ParseError("invalid embeddings request: must have input field")


def serialize_messages(messages: list[dict[str, Any]]) -> str:
    """Messages as one string in conversation order, for prefix hashing.

    Not JSON: serialising a 32 KB conversation with ``json.dumps`` costs ~0.2 ms, most of a
    decision's budget. Role and text content are concatenated as they are; any other field
    (names, tool calls, multi-part content) is JSON-encoded, which is small. Conversations
    that share leading messages still share a leading byte string, which is all the
    prefix-cache producer needs.
    """
    parts: list[str] = []
    append = parts.append
    for msg in messages:
        append("\x1e")
        append(str(msg.get("role", "")))
        for key, value in msg.items():
            if key == "role" or key == "content":
                continue
            append("\x1f")
            append(key)
            append("=")
            append(_dumps(value))
        append("\x1d")
        content = msg.get("content")
        if isinstance(content, str):
            append(content)
        elif content is not None:
            append(_dumps(content))
    return "".join(parts)


def prefix_input(api: str, payload: dict[str, Any]) -> bytes:
    """The bytes whose leading blocks identify the request's cacheable prefix."""
    if api == COMPLETIONS:
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            return prompt.encode()
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            return " ".join(prompt).encode()
        return _dumps(prompt).encode()  # token ids
    if api == CHAT:
        return serialize_messages(payload["messages"]).encode()
    if api == RESPONSES:
        parts = [{k: payload[k]} for k in ("instructions", "tools", "input") if payload.get(k) is not None]
        return _dumps(parts).encode()
    if api == CONVERSATIONS:
        return _dumps(payload.get("items")).encode()
    if api == EMBEDDINGS:
        return _dumps(payload.get("input")).encode()
    return b""


@register("openai-parser")
class OpenAIParser(Parser):
    def parse_request(self, body: bytes, headers: Mapping[str, str]) -> InferenceRequest:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ParseError(f"error unmarshaling request bodyMap: {e}") from None
        if not isinstance(payload, dict):
            raise ParseError(
                f"error unmarshaling request bodyMap: expected a JSON object, got {type(payload).__name__}"
            )
        path = request_path(headers)
        api = api_from_path(path)
        _validate(api, payload)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise ParseError("model not found in request body")
        salt = payload.get("cache_salt")
        return InferenceRequest(
            request_id=headers.get("x-request-id") or str(uuid.uuid4()),
            headers=headers if isinstance(headers, dict) else dict(headers),
            body=body,
            payload=payload,
            api=api,
            path=path,
            incoming_model=model,
            target_model=model,
            stream=payload.get("stream") is True,
            objective=control_header(headers, OBJECTIVE),
            cache_salt=salt if isinstance(salt, str) else "",
            prefix_input=prefix_input(api, payload),
            received_at=time.monotonic(),
        )

    def usage_reader(self, response_headers: Mapping[str, str]) -> UsageReader:
        return SSEUsageReader() if is_event_stream(response_headers) else JSONUsageReader()

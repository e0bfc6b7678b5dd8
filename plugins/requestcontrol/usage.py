"""Incremental token-usage reading for OpenAI-style responses (JSON bodies and SSE streams).

The reader is fed every response body chunk, once per streamed token in the worst case, so
the common chunk must cost almost nothing: a chunk is only split into lines and JSON-decoded
when its complete lines contain the bytes ``"usage"`` with a non-null value. Events split
across chunks are reassembled: the bytes after the last newline are kept until the line
completes.

``feed`` returns, for a non-final chunk, the usage that chunk carried (None if none); for
the final chunk (``end_of_stream``), the final usage known for the response (or None). The
newest usage wins, so servers that repeat cumulative usage in every chunk (vLLM's
``continuous_usage_stats``) end with the right totals. Call ``feed(b"", True)`` when the
stream ends by trailers. ``reader.usage`` always holds the newest usage.
"""

from __future__ import annotations

import json
import re
from typing import Any

from epp.framework.requestcontrol import UsageReader
from epp.framework.types import Usage

_USAGE = b'"usage"'
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')
MAX_JSON_BODY = 64 * 1024 * 1024  # larger non-streamed bodies are not buffered for usage
MAX_SSE_LINE = 16 * 1024 * 1024  # a longer unterminated line is dropped


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v == v and abs(v) != float("inf") else 0
    if isinstance(v, str):
        try:
            return int(float(v))
        except ValueError:
            return 0
    return 0


def usage_from_object(obj: Any) -> Usage | None:
    """Usage of a decoded response body or SSE event, or None if it carries none.

    Accepts chat/completions (``prompt_tokens``/``completion_tokens``), Responses and
    Conversations (``input_tokens``/``output_tokens``, also nested in a
    ``response.completed`` event), and cached tokens from OpenAI's
    ``prompt_tokens_details``, upstream's ``prompt_token_details`` spelling, or
    ``input_tokens_details``.
    """
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None and obj.get("type") == "response.completed":
        response = obj.get("response")
        if isinstance(response, dict):
            usage = response.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    if prompt is None:
        prompt = usage.get("input_tokens")
    completion = usage.get("completion_tokens")
    if completion is None:
        completion = usage.get("output_tokens")
    cached = 0
    for key in ("prompt_tokens_details", "prompt_token_details", "input_tokens_details"):
        details = usage.get(key)
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            cached = _to_int(details["cached_tokens"])
            break
    p, c = _to_int(prompt), _to_int(completion)
    total = usage.get("total_tokens")
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=_to_int(total) if total is not None else p + c,
                 cached_tokens=cached)


def _has_live_usage(block: bytes) -> bool:
    """True if ``block`` holds a "usage" key whose value is not null (cheap byte scan)."""
    n = block.count(_USAGE)
    if n == 0:
        return False
    return len(_NULL_USAGE.findall(block)) < n


class SSEUsageReader(UsageReader):
    __slots__ = ("usage", "_parts", "_pending", "_discarding")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._parts: list[bytes] = []  # the unterminated line so far
        self._pending = 0
        self._discarding = False  # dropping the rest of an over-long line

    def feed(self, chunk: bytes, end_of_stream: bool) -> Usage | None:
        found = None
        if chunk:
            nl = chunk.rfind(b"\n")
            if nl < 0:
                self._hold(chunk)
            else:
                if self._parts:
                    complete = b"".join(self._parts) + chunk[:nl]
                    self._parts = []
                    self._pending = 0
                elif self._discarding:
                    first = chunk.find(b"\n")
                    complete = chunk[first + 1:nl]
                else:
                    complete = chunk[:nl] if nl < len(chunk) - 1 else chunk
                self._discarding = False
                if _USAGE in complete:
                    found = self._scan(complete)
                if nl < len(chunk) - 1:
                    self._hold(chunk[nl + 1:])
        if end_of_stream:
            if self._parts:
                rest = b"".join(self._parts)
                self._parts = []
                self._pending = 0
                if _USAGE in rest:
                    self._scan(rest)
            return self.usage
        return found

    def _hold(self, data: bytes) -> None:
        if self._discarding:
            return
        self._pending += len(data)
        if self._pending > MAX_SSE_LINE:
            self._parts = []
            self._pending = 0
            self._discarding = True
            return
        self._parts.append(data)

    def _scan(self, block: bytes) -> Usage | None:
        if not _has_live_usage(block):
            return None
        found = None
        for line in block.split(b"\n"):
            if _USAGE not in line or not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]" or not _has_live_usage(payload):
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            u = usage_from_object(obj)
            if u is not None:
                found = u
        if found is not None:
            self.usage = found
        return found


class JSONUsageReader(UsageReader):
    """Non-streamed bodies: buffer to the end, decode once, and only if "usage" appears."""

    __slots__ = ("usage", "_parts", "_size", "_overflow")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._overflow = False

    def feed(self, chunk: bytes, end_of_stream: bool) -> Usage | None:
        if chunk and not self._overflow:
            self._size += len(chunk)
            if self._size > MAX_JSON_BODY:
                self._overflow = True
                self._parts = []
            else:
                self._parts.append(chunk)
        if not end_of_stream:
            return None
        body = b"".join(self._parts)
        self._parts = []
        if body and _USAGE in body:
            try:
                self.usage = usage_from_object(json.loads(body))
            except ValueError:
                self.usage = None
        return self.usage


def is_event_stream(headers: Any) -> bool:
    ct = headers.get("content-type")
    if ct is None:
        for k, v in headers.items():
            if k.lower() == "content-type":
                ct = v
                break
    return ct is not None and "text/event-stream" in ct.lower()

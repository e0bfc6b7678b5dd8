"""Usage reading from JSON bodies and SSE streams, incl. events split across chunks."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from sched_helpers import make

from epp.framework.types import Usage
from plugins.requestcontrol.usage import JSONUsageReader, SSEUsageReader

SSE = {"content-type": "text/event-stream; charset=utf-8"}
JSON = {"content-type": "application/json"}


def chunk_event(i: int, usage=None, include_null=True) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"tok{i} \"usage\""}}]}
    if usage is not None:
        obj["usage"] = usage
        obj["choices"] = []
    elif include_null:
        obj["usage"] = None
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


FINAL = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42, "prompt_tokens_details": {"cached_tokens": 8}}
STREAM = b"".join(chunk_event(i) for i in range(20)) + chunk_event(0, FINAL) + b"data: [DONE]\n\n"


def feed_all(reader, chunks):
    out = None
    for i, c in enumerate(chunks):
        got = reader.feed(c, i == len(chunks) - 1)
        if got is not None:
            out = got
    return out


def test_parser_picks_the_reader_by_content_type() -> None:
    p = make("openai-parser")
    assert isinstance(p.usage_reader(SSE), SSEUsageReader)
    assert isinstance(p.usage_reader({"Content-Type": "TEXT/EVENT-STREAM"}), SSEUsageReader)
    assert isinstance(p.usage_reader(JSON), JSONUsageReader)
    assert isinstance(p.usage_reader({}), JSONUsageReader)


def test_sse_usage_in_one_piece() -> None:
    r = make("openai-parser").usage_reader(SSE)
    assert r.feed(STREAM, True) == Usage(12, 30, 42, 8)


def test_sse_non_final_chunks_return_only_what_they_carry() -> None:
    r = SSEUsageReader()
    assert r.feed(chunk_event(1), False) is None  # "usage": null costs no JSON decoding and yields nothing
    assert r.feed(chunk_event(2, {"prompt_tokens": 5, "completion_tokens": 1}), False) == Usage(5, 1, 6, 0)
    assert r.feed(chunk_event(3, {"prompt_tokens": 5, "completion_tokens": 2}), False) == Usage(5, 2, 7, 0)
    assert r.feed(b"data: [DONE]\n\n", False) is None
    assert r.feed(b"", True) == Usage(5, 2, 7, 0)  # the newest usage wins (vLLM continuous usage stats)


def test_sse_event_without_trailing_newline_at_end_of_stream() -> None:
    r = SSEUsageReader()
    assert r.feed(b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}', False) is None
    assert r.feed(b"", True) == Usage(3, 4, 7, 0)


def test_sse_without_usage() -> None:
    r = SSEUsageReader()
    assert feed_all(r, [chunk_event(i) for i in range(5)] + [b"data: [DONE]\n\n"]) is None


def test_responses_api_completed_event() -> None:
    ev = {"type": "response.completed", "response": {"object": "response", "usage": {
        "input_tokens": 31, "output_tokens": 9, "total_tokens": 40, "input_tokens_details": {"cached_tokens": 16}}}}
    stream = (b'event: response.created\ndata: {"type":"response.created","response":{"usage":null}}\n\n'
              b"event: response.completed\ndata: " + json.dumps(ev).encode() + b"\n\n")
    assert SSEUsageReader().feed(stream, True) == Usage(31, 9, 40, 16)


def test_json_bodies() -> None:
    body = json.dumps({"object": "text_completion", "choices": [], "usage": {
        "prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17, "prompt_token_details": {"cached_tokens": 3}}}).encode()
    r = JSONUsageReader()
    assert r.feed(body[:10], False) is None
    assert r.feed(body[10:], True) == Usage(7, 10, 17, 3)
    resp = json.dumps({"object": "response", "usage": {"input_tokens": 2, "output_tokens": 5}}).encode()
    assert JSONUsageReader().feed(resp, True) == Usage(2, 5, 7, 0)
    assert JSONUsageReader().feed(b'{"usage": "n/a"}', True) is None
    assert JSONUsageReader().feed(b"<html>usage</html>", True) is None
    assert JSONUsageReader().feed(b"", True) is None
    odd = json.dumps({"usage": {"prompt_tokens": "12", "completion_tokens": 2.0, "total_tokens": None}}).encode()
    assert JSONUsageReader().feed(odd, True) == Usage(12, 2, 14, 0)


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40), crlf=st.booleans(),
       trailing_eos_chunk=st.booleans())
def test_any_chunking_gives_the_same_usage(cuts, crlf, trailing_eos_chunk) -> None:
    stream = STREAM.replace(b"\n", b"\r\n") if crlf else STREAM
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:])]
    if trailing_eos_chunk:
        chunks.append(b"")
    r = SSEUsageReader()
    assert feed_all(r, chunks) == Usage(12, 30, 42, 8)
    assert r.usage == Usage(12, 30, 42, 8)

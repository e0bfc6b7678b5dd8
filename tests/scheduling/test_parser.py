"""openai-parser: API detection, per-API validation, model, stream, cache salt, prefix input."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_helpers import make

from epp.framework import ParseError


@pytest.fixture(scope="module")
def parser():
    return make("openai-parser")


def body(**payload) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize("path,api", [
    ("/v1/completions", "completions"),
    ("/v1/chat/completions", "chat/completions"),
    ("/v1/projects/p/locations/l/endpoints/openapi/chat/completions", "chat/completions"),
    ("/v1/responses", "responses"),
    ("/v1/conversations", "conversations"),
    ("/v1/embeddings", "embeddings"),
    ("/v1/unknown", "completions"),
])
def test_api_from_path_header(parser, path, api) -> None:
    payloads = {
        "completions": {"prompt": "hi"}, "chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
        "responses": {"input": "hi"}, "conversations": {"items": [{"type": "message"}]}, "embeddings": {"input": "hi"},
    }
    req = parser.parse_request(body(model="m", **payloads[api]), {":path": path})
    assert (req.api, req.path) == (api, path)


def test_path_header_precedence(parser) -> None:
    chat = body(model="m", messages=[{"role": "user", "content": "x"}])
    assert parser.parse_request(chat, {"x-original-path": "/v1/chat/completions"}).api == "chat/completions"
    assert parser.parse_request(chat, {"x-forwarded-path": "/v1/chat/completions"}).api == "chat/completions"
    req = parser.parse_request(body(model="m", prompt="p"), {":path": "/v1/completions", "x-original-path": "/v1/chat/completions"})
    assert req.api == "completions"
    assert parser.parse_request(body(model="m", prompt="p"), {}).path == "/v1/completions"


@pytest.mark.parametrize("raw,message", [
    (b"", "error unmarshaling request bodyMap"),
    (b"{not json", "error unmarshaling request bodyMap"),
    (b"[1, 2]", "error unmarshaling request bodyMap: expected a JSON object, got list"),
    (b"\xff\xfe\x00", "error unmarshaling request bodyMap"),
    (b'{"prompt": "x"}', "model not found in request body"),
    (b'{"model": 7, "prompt": "x"}', "model not found in request body"),
    (b'{"model": "m"}', "invalid completions request: must have prompt field"),
    (b'{"model": "m", "prompt": ""}', "invalid completions request: must have prompt field"),
    (b'{"model": "m", "prompt": []}', "invalid completions request: must have prompt field"),
])
def test_completions_errors(parser, raw, message) -> None:
    with pytest.raises(ParseError, match=message.replace("(", r"\(")):
        parser.parse_request(raw, {":path": "/v1/completions"})


@pytest.mark.parametrize("path,payload,message", [
    ("/v1/chat/completions", {"model": "m"}, "invalid chat completions request: must have valid messages field"),
    ("/v1/chat/completions", {"model": "m", "messages": []}, "invalid chat completions request"),
    ("/v1/chat/completions", {"model": "m", "messages": "hi"}, "invalid chat completions request"),
    ("/v1/responses", {"model": "m"}, "invalid responses request: must have input field"),
    ("/v1/conversations", {"model": "m", "items": []}, "invalid conversations request: must have items field"),
    ("/v1/embeddings", {"model": "m", "input": ""}, "invalid embeddings request: must have input field"),
])
def test_per_api_validation(parser, path, payload, message) -> None:
    with pytest.raises(ParseError, match=message):
        parser.parse_request(body(**payload), {":path": path})


def test_fields(parser) -> None:
    req = parser.parse_request(body(model="llama", prompt="Hello", stream=True, cache_salt="tenant-a"),
                               {":path": "/v1/completions", "x-request-id": "abc", "x-gateway-inference-objective": "gold"})
    assert (req.request_id, req.incoming_model, req.target_model, req.stream, req.cache_salt, req.objective) == (
        "abc", "llama", "llama", True, "tenant-a", "gold")
    assert req.prefix_input == b"Hello"
    assert req.payload["prompt"] == "Hello" and req.body.startswith(b"{")
    other = parser.parse_request(body(model="m", prompt="p", stream="yes"), {})
    assert other.stream is False and other.cache_salt == "" and len(other.request_id) == 36


def test_prefix_input_per_api(parser) -> None:
    p = parser.parse_request(body(model="m", prompt=["a b", "c"]), {}).prefix_input
    assert p == b"a b c"
    assert parser.parse_request(body(model="m", prompt=[1, 2, 3]), {}).prefix_input == b"[1,2,3]"
    chat = lambda msgs: parser.parse_request(body(model="m", messages=msgs), {":path": "/v1/chat/completions"}).prefix_input
    sys_msg = {"role": "system", "content": "You are helpful."}
    a = chat([sys_msg, {"role": "user", "content": "first question"}])
    b = chat([sys_msg, {"role": "user", "content": "second"}])
    c = chat([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "first question"}])
    common = os.path.commonprefix([a, b])
    assert b"You are helpful." in common and b"first" not in common
    assert a != c and "first question".encode() in a
    # non-text parts and extra fields still distinguish messages
    tools = chat([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}])
    assert b"tool_calls" in tools
    resp = parser.parse_request(body(model="m", input="hello", instructions="be brief"), {":path": "/v1/responses"})
    assert json.loads(resp.prefix_input) == [{"instructions": "be brief"}, {"input": "hello"}]
    emb = parser.parse_request(body(model="m", input=["x"]), {":path": "/v1/embeddings"})
    assert emb.prefix_input == b'["x"]'


@settings(max_examples=200, deadline=None)
@given(raw=st.one_of(st.binary(max_size=200),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                                  lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                                  max_leaves=20).map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/conversations",
                             "/v1/embeddings", "/x"]))
def test_garbage_is_parsed_or_rejected_never_crashes(raw, path) -> None:
    parser = make("openai-parser")
    try:
        req = parser.parse_request(raw, {":path": path})
    except ParseError as e:
        assert str(e)
    else:
        assert isinstance(req.prefix_input, bytes) and req.incoming_model

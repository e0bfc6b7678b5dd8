"""The per-token path of full-duplex streaming: hand decoding and encoding agree with protobuf,
and the fast core's shortcut gives the same answers as the general path (and as grpcio)."""

from __future__ import annotations

import json
import random
import socket
import struct
import time

import grpc
import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc_support import (
    REQ_HEADERS,
    EppThread,
    JsonParser,
    Recorder,
    body_msg,
    completion_body,
    headers_msg,
    make_config,
    new_director,
    stub_for,
)
from google.protobuf.internal.decoder import _DecodeVarint
from google.protobuf.internal.encoder import _VarintBytes
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.extproc import messages as msg
from epp.extproc.fastserver import DATA, HEADERS, PREFACE, SETTINGS, WINDOW_UPDATE, frame
from epp.framework.requestcontrol import UsageReader

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


# --- hand decoding / encoding ----------------------------------------------------------------------
def _request(body: bytes, eos: bool, meta: dict | None, observability: bool, attrs: bool) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=eos))
    if meta is not None:
        req.metadata_context.filter_metadata["envoy.lb"].update(meta)
    if observability:
        req.observability_mode = True
    if attrs:
        req.attributes["envoy.filters.http.ext_proc"].update({"request.path": "/v1/x"})
    return req


bodies = st.one_of(st.binary(max_size=400), st.builds(lambda n: b"d" * n, st.integers(0, 70_000)))
metas = st.one_of(st.none(), st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=3))


@given(bodies, st.booleans(), metas, st.booleans(), st.booleans())
def test_response_body_decoded_by_hand_like_protobuf(body, eos, meta, observability, attrs):
    raw = _request(body, eos, meta, observability, attrs).SerializeToString()
    assert msg.parse_response_body(raw) == (body, eos)
    assert msg.parse_response_body(b"\x00\x00\x00\x00\x00" + raw, 5) == (body, eos)


@settings(max_examples=300)
@given(st.one_of(
    st.binary(max_size=64),
    # valid messages with bytes flipped, cut or appended
    st.builds(lambda b, i, v: (lambda raw: raw[:i % (len(raw) + 1)] + bytes([v]) + raw[i % (len(raw) + 1) + 1:])(
        _request(b, False, {"k": "v"}, False, False).SerializeToString()), bodies, st.integers(0, 500), st.integers(0, 255)),
    st.builds(lambda b, n: _request(b, True, None, False, False).SerializeToString()[:n], bodies, st.integers(0, 40)),
    st.builds(lambda b, t: _request(b, False, None, False, False).SerializeToString() + t, bodies, st.binary(max_size=8)),
    # other HttpBody fields and other ProcessingRequest kinds
    st.builds(lambda b: pb.ProcessingRequest(response_body=pb.HttpBody(body=b, end_of_stream_without_message=True))
              .SerializeToString(), st.binary(max_size=20)),
    st.builds(lambda b: pb.ProcessingRequest(request_body=pb.HttpBody(body=b)).SerializeToString(), st.binary(max_size=20)),
))
def test_hand_decoder_never_disagrees_with_protobuf(raw):
    """Whatever protobuf decodes, the hand decoder decodes the same way or declines (None).
    Bytes protobuf rejects are accepted only if the response_body field itself is valid and
    the rest are fields the hot path skips without decoding (metadata, attributes)."""
    got = msg.parse_response_body(raw)
    try:
        req = pb.ProcessingRequest.FromString(raw)
    except DecodeError:
        req = None
    if got is None:
        return
    if req is None:
        size, start = _DecodeVarint(raw, 1)
        first = pb.ProcessingRequest.FromString(raw[:start + size])  # must not raise
        req = first
        rest = raw[start + size:]
        assert rest and rest[0] in (0x42, 0x4A, 0x50)
    assert req.WhichOneof("request") == "response_body"
    assert (req.response_body.body, req.response_body.end_of_stream) == got
    assert not req.response_body.end_of_stream_without_message


@given(st.integers(0, 2**63 - 1), st.binary(max_size=4))
def test_varints_decode_like_protobuf(value, tail):
    raw = b"\x07" + _VarintBytes(value) + tail
    assert msg._read_varint(raw, 1) == (value, 1 + len(_VarintBytes(value)))


@given(st.integers(0, 200_000), st.booleans(), st.booleans())
def test_cached_echo_head_plus_payload_is_the_protobuf_message(n, eos, response):
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    head, tail = msg.streamed_chunk_head(n, eos, response=response)
    raw = head + data + tail
    assert raw == msg.streamed_chunk_bytes(data, eos, response=response)
    parsed = pb.ProcessingResponse.FromString(raw)
    body = parsed.response_body if response else parsed.request_body
    assert body.response.body_mutation.streamed_response.body == data
    assert body.response.body_mutation.streamed_response.end_of_stream == eos


# --- the fast core's shortcut against the general path -----------------------------------------------
def _sse_chunks(model: str, n: int) -> list[bytes]:
    """SSE events naming ``model``, cut at odd places; the usage event is split across chunks."""
    events = b"".join(b'data: {"id":"c","model":"' + model.encode() + b'","choices":[{"delta":{"content":"t%d"}}]}\n\n' % i
                      for i in range(n))
    events += b'data: {"id":"c","model":"' + model.encode() + b'","choices":[],"usage":{"prompt_tokens":11,' \
              b'"completion_tokens":' + str(n).encode() + b'}}\n\ndata: [DONE]\n\n'
    rng = random.Random(n)
    cuts = sorted(rng.sample(range(1, len(events)), 12))
    return [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)])]


def _duplex_conversation(epp: EppThread, chunks: list[bytes], headers: dict) -> list[pb.ProcessingResponse]:
    msgs = [headers_msg(headers), body_msg(completion_body(model="alias", stream=True), False), body_msg(b"", True),
            headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True)]
    msgs += [body_msg(c, False, response=True) for c in chunks] + [body_msg(b"", True, response=True)]
    with grpc.insecure_channel(epp.target) as ch:
        return list(stub_for(ch)(iter(msgs), timeout=10))


@pytest.mark.parametrize("core", ["fast", "grpcio"])
def test_streamed_answer_echo_usage_and_model_name_on_both_cores(core, monkeypatch):
    monkeypatch.setenv("EPP_EXTPROC_CORE", core)
    recorder = Recorder()
    director = new_director(make_config(recorder=recorder, streaming_hook=True))
    chunks = _sse_chunks("big-model", 40)
    headers = dict(REQ_HEADERS, **{"x-gateway-model-name-rewrite": "big-model"})
    with EppThread(director) as epp:
        out = _duplex_conversation(epp, chunks, headers)
        assert epp.wait_idle()
    echoed = [o.response_body.response.body_mutation.streamed_response for o in out[3:]]
    assert len(echoed) == len(chunks) + 1
    # The model name is restored per chunk (as upstream: an occurrence cut by a chunk
    # boundary stays as is).
    per_chunk = b"".join(c.replace(b'"model":"big-model"', b'"model":"alias"') for c in chunks)
    assert b"".join(e.body for e in echoed) == per_chunk
    assert per_chunk.count(b'"model":"alias"') > 20
    assert [e.end_of_stream for e in echoed] == [False] * len(chunks) + [True]
    (complete,) = recorder.of("complete")
    outcome, usage = complete[2]
    assert outcome == "complete" and (usage.prompt_tokens, usage.completion_tokens) == (11, 40)
    assert len(recorder.of("chunk")) == len(chunks) + 1  # the streaming hook saw every chunk
    assert director.in_flight == 0


class _BrokenReaderParser(JsonParser):
    def usage_reader(self, response_headers) -> UsageReader:
        raise RuntimeError("reader bug")


@pytest.mark.parametrize("core", ["fast", "grpcio"])
def test_a_failing_chunk_costs_its_request_not_the_server(core, monkeypatch):
    monkeypatch.setenv("EPP_EXTPROC_CORE", core)
    recorder = Recorder()
    config = make_config(recorder=recorder)
    config.parser = _BrokenReaderParser("parser")
    director = new_director(config)
    with EppThread(director) as epp:
        out = _duplex_conversation(epp, [b"data: {}\n\n"], REQ_HEADERS)
        assert out[-1].immediate_response.status.code == 500
        assert b"RuntimeError: reader bug" in out[-1].immediate_response.body
        assert epp.wait_idle()
    assert director.in_flight == 0
    assert recorder.of("complete")[0][2][0] == "error"


# --- frames split across reads (raw HTTP/2 to the fast core) -----------------------------------------
class _RawGrpc:
    """A minimal HTTP/2 gRPC client: one call, each message in one DATA frame, sent in pieces."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        settings_payload = struct.pack(">HI", 0x4, 2**31 - 1)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings_payload)
                          + frame(WINDOW_UPDATE, 0, 0, (2**31 - 1 - 65535).to_bytes(4, "big")))
        block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", PROCESS),
                                        (":authority", "epp"), ("content-type", "application/grpc"), ("te", "trailers")])
        self.sock.sendall(frame(HEADERS, 0x4, 1, block))

    def send(self, req: pb.ProcessingRequest, pieces: list[int] | None = None) -> None:
        raw = req.SerializeToString()
        data = frame(DATA, 0, 1, b"\x00" + len(raw).to_bytes(4, "big") + raw)
        cuts = sorted({p for p in pieces or [] if 0 < p < len(data)})
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            self.sock.sendall(data[a:b])
            if cuts:
                time.sleep(0.003)  # let each piece be its own read

    def recv(self, n: int) -> list[pb.ProcessingResponse]:
        out: list[pb.ProcessingResponse] = []
        grpc_buf = b""
        while len(out) < n:
            while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
                chunk = self.sock.recv(65536)
                assert chunk, "server closed the connection"
                self.buf += chunk
            length = int.from_bytes(self.buf[:3], "big")
            ftype, payload = self.buf[3], self.buf[9:9 + length]
            self.buf = self.buf[9 + length:]
            if ftype != DATA:
                continue
            grpc_buf += payload
            while len(grpc_buf) >= 5 and len(grpc_buf) >= 5 + int.from_bytes(grpc_buf[1:5], "big"):
                size = int.from_bytes(grpc_buf[1:5], "big")
                out.append(pb.ProcessingResponse.FromString(grpc_buf[5:5 + size]))
                grpc_buf = grpc_buf[5 + size:]
        return out

    def close(self) -> None:
        self.sock.close()


def test_chunk_frames_split_across_reads_are_echoed_whole(monkeypatch):
    monkeypatch.setenv("EPP_EXTPROC_CORE", "fast")
    recorder = Recorder()
    director = new_director(make_config(recorder=recorder))
    rng = random.Random(8)
    chunks = [json.dumps({"i": i, "pad": "x" * rng.randrange(0, 300)}).encode() + b"\n" for i in range(12)]
    with EppThread(director) as epp:
        client = _RawGrpc(epp.port)
        try:
            client.send(headers_msg(REQ_HEADERS))
            client.send(body_msg(completion_body(), False))
            client.send(body_msg(b"", True))
            assert client.recv(2)[0].HasField("request_headers")
            client.send(headers_msg({":status": "200"}, response=True))
            assert client.recv(1)[0].HasField("response_headers")
            for i, chunk in enumerate(chunks):
                # whole, cut inside the frame header, the gRPC prefix, the message, byte by byte
                pieces = [[], [4], [9, 12], [20, 40], list(range(1, 30))][i % 5]
                client.send(body_msg(chunk, False, response=True), pieces)
                (resp,) = client.recv(1)
                sr = resp.response_body.response.body_mutation.streamed_response
                assert (sr.body, sr.end_of_stream) == (chunk, False)
            client.send(body_msg(b"", True, response=True), [3])
            (last,) = client.recv(1)
            assert last.response_body.response.body_mutation.streamed_response.end_of_stream
        finally:
            client.close()
        assert epp.wait_idle()
    assert director.in_flight == 0
    assert recorder.of("complete")[0][2][0] == "complete"


def test_cached_efficient_mode_answers_are_the_protobuf_ones():
    dest = "10.9.8.7:8000"
    expected = pb.ProcessingResponse(request_body=pb.BodyResponse(response=msg._routing_common([(msg.DEST_HEADER, dest)])),
                                     dynamic_metadata=msg.lb_metadata(dest))
    first = msg.route_in_body([(msg.DEST_HEADER, dest)], dest, None)
    assert msg.route_in_body([(msg.DEST_HEADER, dest)], dest, None) is first  # cached
    assert pb.ProcessingResponse.FromString(first) == expected
    assert msg.route_in_headers([(msg.DEST_HEADER, dest)], dest) != first  # the headers answer is its own
    replaced = msg.route_in_body([(msg.DEST_HEADER, dest), ("content-length", "3")], dest, b"abc")
    assert isinstance(replaced, pb.ProcessingResponse) and replaced.request_body.response.body_mutation.body == b"abc"
    skip = pb.ProcessingResponse.FromString(msg.response_headers({}, body_mode_override=msg.NONE))
    assert skip.HasField("response_headers") and skip.mode_override.response_body_mode == msg.NONE
    with_header = msg.response_headers({"x-session-token": "t"}, body_mode_override=msg.NONE)
    assert with_header.mode_override.response_body_mode == msg.NONE
    assert with_header.response_headers.response.header_mutation.set_headers[0].header.key == "x-session-token"

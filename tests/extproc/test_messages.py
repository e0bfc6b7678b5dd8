"""The hand-encoded hot-path messages are byte-identical to protobuf's encoding."""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st

from epp.extproc import messages as msg


def _proto(data: bytes, eos: bool, response: bool) -> bytes:
    sbr = pb.StreamedBodyResponse(body=data, end_of_stream=eos)
    br = pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=sbr)))
    resp = pb.ProcessingResponse(response_body=br) if response else pb.ProcessingResponse(request_body=br)
    return resp.SerializeToString()


@given(st.one_of(st.binary(max_size=300), st.builds(lambda n: b"x" * n, st.integers(0, 70_000))), st.booleans(),
       st.booleans())
def test_streamed_chunk_bytes_match_protobuf(data, eos, response):
    raw = msg.streamed_chunk_bytes(data, eos, response=response)
    assert raw == _proto(data, eos, response)
    parsed = pb.ProcessingResponse.FromString(raw)
    body = parsed.response_body if response else parsed.request_body
    assert body.response.body_mutation.streamed_response.body == data
    assert body.response.body_mutation.streamed_response.end_of_stream == eos


def test_cached_route_answer_is_the_protobuf_one():
    dest = "10.1.2.3:8000"
    expected = pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=msg._routing_common([(msg.DEST_HEADER, dest)])),
        dynamic_metadata=msg.lb_metadata(dest))
    first = msg.route_in_headers([(msg.DEST_HEADER, dest)], dest)
    again = msg.route_in_headers([(msg.DEST_HEADER, dest)], dest)
    assert first is again  # cached
    assert pb.ProcessingResponse.FromString(first) == expected
    # with more headers than the destination, nothing is cached
    other = msg.route_in_headers([(msg.DEST_HEADER, dest), ("content-length", "10")], dest)
    assert isinstance(other, pb.ProcessingResponse)

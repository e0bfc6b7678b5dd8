"""Hypothesis: arbitrary ProcessingRequest sequences over a real gRPC channel never crash the
server and never leak in-flight state."""

from __future__ import annotations

import grpc
from extproc_support import REQ_HEADERS, EppThread, Mode, body_msg, completion_body, headers_msg, new_director, stub_for, trailers_msg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.extproc.stream import StreamSettings

modes = st.sampled_from([Mode.FULL_DUPLEX_STREAMED, Mode.BUFFERED, Mode.STREAMED, Mode.NONE])
bodies = st.one_of(
    st.just(completion_body()),
    st.just(completion_body(stream=True)),
    st.binary(max_size=64),
    st.builds(lambda n: completion_body(prompt="x" * n), st.integers(0, 150_000)),  # "huge" (> limit below)
)
message = st.one_of(
    st.builds(lambda eos, rm, sm, meta: headers_msg(REQ_HEADERS, eos=eos, req_mode=rm, resp_mode=sm, metadata=meta),
              st.booleans(), modes, modes,
              st.one_of(st.none(), st.builds(lambda v: {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": v}},
                                             st.one_of(st.text(max_size=20), st.lists(st.text(max_size=20), max_size=3))))),
    st.builds(lambda b, eos: body_msg(b, eos), bodies, st.booleans()),
    st.builds(lambda: trailers_msg()),
    st.builds(lambda eos, ct: headers_msg({":status": "200", "content-type": ct}, eos=eos, response=True),
              st.booleans(), st.sampled_from(["application/json", "text/event-stream"])),
    st.builds(lambda b, eos: body_msg(b, eos, response=True), st.binary(max_size=256), st.booleans()),
    st.builds(lambda: trailers_msg(response=True)),
)
# Mostly well-formed starts, then anything: reordered, duplicated, truncated.
prefix = st.sampled_from([[], [headers_msg(REQ_HEADERS)], [headers_msg(REQ_HEADERS), body_msg(completion_body(), True)]])
sequences = st.builds(lambda p, rest, cancel: (p + rest, cancel), prefix, st.lists(message, max_size=8), st.booleans())


def test_random_message_sequences_never_crash_or_leak():
    director = new_director()
    with EppThread(director, StreamSettings(max_body_bytes=100_000, request_timeout=2.0)) as epp:
        channel = grpc.insecure_channel(epp.target)
        process = stub_for(channel)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(sequences)
        def run(case):
            msgs, cancel = case
            call = process(iter(msgs), timeout=5)
            try:
                for i, _ in enumerate(call):
                    if cancel and i == 1:
                        call.cancel()
                        break
            except grpc.RpcError as e:
                # Only our own cancellation may end a call abnormally; the server never fails it.
                assert e.code() == grpc.StatusCode.CANCELLED and cancel, e

        run()
        assert epp.wait_idle(10)
        assert director.in_flight == 0
        # still serving
        out = list(process(iter([headers_msg(REQ_HEADERS), body_msg(completion_body(), True)]), timeout=5))
        assert out[0].HasField("request_headers")
        channel.close()

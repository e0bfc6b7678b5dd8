"""session-affinity-scorer: opaque tokens, round trip through the response header."""

from __future__ import annotations

from sched_helpers import cands, cycle, make, request

from epp.framework.types import InferenceResponse


def test_token_round_trip_and_opacity() -> None:
    s = make("session-affinity-scorer")
    cs = cands(3)
    resp = InferenceResponse(request_id="r1")
    s.response_received(request(), resp, cs[1].key)
    token = resp.added_headers["x-session-token"]
    assert "10.0.0.2" not in token and "8000" not in token
    import base64
    assert b"10.0.0.2" not in base64.urlsafe_b64decode(token + "==")
    got = s.score(cycle(), request(headers={"x-session-token": token}), cs)
    assert list(got) == [0.0, 1.0, 0.0]


def test_no_or_unknown_token_scores_zero_everywhere() -> None:
    s = make("session-affinity-scorer")
    cs = cands(2)
    assert list(s.score(cycle(), request(), cs)) == [0.0, 0.0]
    assert list(s.score(cycle(), request(headers={"x-session-token": "bogus"}), cs)) == [0.0, 0.0]


def test_tokens_depend_on_the_secret() -> None:
    a1 = make("session-affinity-scorer", {"secret": "s3cret"})
    a2 = make("session-affinity-scorer", {"secret": "s3cret"})
    b = make("session-affinity-scorer", {"secret": "other"})
    rnd = make("session-affinity-scorer")
    key = "10.0.0.1:8000"
    assert a1.token(key) == a2.token(key)
    assert a1.token(key) != b.token(key) != rnd.token(key)
    # a token issued by another replica with the same secret is honoured without a prior response
    cs = cands(3)
    assert list(a2.score(cycle(), request(headers={"x-session-token": a1.token(cs[2].key)}), cs)) == [0.0, 0.0, 1.0]

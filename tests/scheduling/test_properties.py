"""Hypothesis: every built-in scorer returns one score in [0, 1] per candidate, whatever the endpoints."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sched_helpers import cycle, make, request

from epp.datalayer.endpoint import Endpoint, EndpointMetadata, Metrics, now
from epp.framework.scheduling import ProfileResult, SchedulingResult
from epp.framework.types import Candidate

SCORERS = [
    ("queue-scorer", None), ("running-requests-size-scorer", None), ("kv-cache-utilization-scorer", None),
    ("lora-affinity-scorer", None), ("load-aware-scorer", None), ("active-request-scorer", {"idleThreshold": 1}),
    ("token-load-scorer", {"queueThresholdTokens": 500}), ("session-affinity-scorer", None),
    ("no-hit-lru-scorer", None), ("prefix-cache-scorer", None),
    ("metric-scorer", {"metricName": "m"}), ("metric-scorer", {"metricName": "m", "min": 0, "max": 10}),
]

models = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 3), max_size=3)
metrics = st.builds(
    lambda q, r, kv, am, wm, mx, m, age: (Metrics(waiting_queue_size=q, running_requests=r, kv_cache_usage=kv,
                                                  active_models=am, waiting_models=wm, max_active_models=mx,
                                                  update_time=now()), m, age),
    st.integers(0, 10_000), st.integers(0, 10_000), st.floats(0, 1), models, models, st.integers(0, 4),
    st.one_of(st.none(), st.floats(-1e9, 1e9)), st.floats(0, 5),
)


def build(specs) -> list[Candidate]:
    out = []
    for i, (mt, custom, age) in enumerate(specs):
        ep = Endpoint(EndpointMetadata(f"10.0.{i // 250}.{i % 250 + 1}", 8000), mt)
        if custom is not None:
            ep.set_custom({"m": custom}, at=now() - age)
        out.append(Candidate(ep))
    return out


@settings(max_examples=60, deadline=None)
@given(specs=st.lists(metrics, min_size=1, max_size=20), prompts=st.lists(st.binary(min_size=0, max_size=400), max_size=6),
       model=st.sampled_from(["a", "b", "z"]))
def test_scores_in_unit_interval(specs, prompts, model) -> None:
    producer = make("approx-prefix-cache-producer", {"blockSizeTokens": 4})
    inflight = make("inflight-load-producer")
    scorers = [make(t, p) for t, p in SCORERS]
    cs = build(specs)
    # earlier requests populate the prefix index and the in-flight counts
    for i, prompt in enumerate(prompts):
        req = request(model=model, prefix=prompt, rid=f"warm{i}")
        warm = build(specs)
        producer.produce(cycle(), req, warm)
        result = SchedulingResult({"default": ProfileResult([warm[i % len(warm)]])}, "default")
        producer.pre_request(req, result)
        inflight.pre_request(req, result)
    req = request(model=model, prefix=prompts[0] if prompts else b"", rid="probe",
                  headers={"x-session-token": scorers[7].token(cs[0].key)})
    producer.produce(cycle(), req, cs)
    inflight.produce(cycle(), req, cs)
    for s in scorers:
        got = list(s.score(cycle(), req, cs))
        assert len(got) == len(cs), s
        assert all(isinstance(x, float) and 0.0 <= x <= 1.0 for x in got), (s, got)

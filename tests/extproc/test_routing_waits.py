"""Routing that waits (flow control, a producer's I/O) over a real gRPC channel (both cores:
see conftest.py).

A waiting request parks its stream without holding up others; it is answered when what it
waits for is done; a client that goes away, or the EPP's deadline, cancels the wait at its
await (so a queue would drop the request at once) and leaves nothing in flight.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable, Sequence

import grpc
import pytest
from extproc_support import (
    REQ_HEADERS,
    EppThread,
    body_msg,
    completion_body,
    headers_msg,
    make_config,
    make_pool,
    set_headers_of,
    stub_for,
)

from epp.datalayer.endpoint import EndpointMetadata
from epp.extproc.stream import StreamSettings
from epp.framework.requestcontrol import AsyncDataProducer
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest
from epp.requestcontrol.director import ClusterObjects, Director, DirectorOptions
from epp.requestcontrol.errors import RequestError

class HoldingProducer(AsyncDataProducer):
    """Requests with header ``test-wait`` wait until the test releases them by that value;
    the wait is really I/O-shaped: a task of its own, as the interface asks."""

    plugin_type = "test-holding-producer"

    def __init__(self) -> None:
        super().__init__("holding")
        self.gates: dict[str, asyncio.Future] = {}
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.arrived = threading.Event()

    async def produce(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Candidate]) -> None:
        key = request.headers.get("test-wait")
        if key is None:
            return
        loop = asyncio.get_running_loop()
        gate = self.gates.setdefault(key, loop.create_future())

        async def io() -> str:
            async with asyncio.timeout(30):  # works: this runs in a real task
                return await gate

        self.arrived.set()
        try:
            cycle["held-for"] = await loop.create_task(io())
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        self.finished.append(key)


class Ticket:
    def __init__(self, waited: bool) -> None:
        self.waited = waited
        self.queue_time = 0.0
        self.targets: tuple[str, ...] = ()
        self.finished = False

    def scheduled(self, targets) -> None:
        self.targets = tuple(targets)

    def finish(self) -> None:
        self.finished = True


class HoldingGate:
    """A flow gate that holds requests carrying ``test-hold`` until released (the Director
    then schedules on the pool as it is at release time); ``test-reject`` is refused with a 429."""

    def __init__(self) -> None:
        self.release: asyncio.Future | None = None
        self.held = threading.Event()
        self.cancelled = 0
        self.tickets: list[Ticket] = []

    async def wait_for_dispatch(self, request: InferenceRequest) -> Ticket:
        if request.headers.get("test-reject"):
            raise RequestError("ResourceExhausted", "queue full", status=429,
                               headers={"x-llm-d-request-dropped-reason": "rejected-saturated"})
        if not request.headers.get("test-hold"):
            self.tickets.append(Ticket(False))
            return self.tickets[-1]
        self.release = asyncio.get_running_loop().create_future()
        self.held.set()
        try:
            await self.release
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.tickets.append(Ticket(True))
        return self.tickets[-1]


def _director(producer: HoldingProducer | None = None, *, prefer_port: int = 0, pool=None) -> Director:
    config = make_config(prefer_port=prefer_port)
    if producer is not None:
        config.producers.append(producer)
    return Director(config, pool if pool is not None else make_pool(8001, 8002, 8003), DirectorOptions())


def _request(headers: dict[str, str]) -> list:
    return [headers_msg(dict(REQ_HEADERS, **headers)), body_msg(completion_body(), True)]


def _start(epp: EppThread, headers: dict[str, str], timeout: float = 10.0, *, half_close: bool = False):
    """Send one request; returns (channel, iterator of answers). Like Envoy, the stream stays
    open after the request (until the channel closes) unless ``half_close``."""
    ch = grpc.insecure_channel(epp.target)
    closed = threading.Event()
    ch.close = _closing(ch.close, closed)  # type: ignore[method-assign]

    def messages():
        yield from _request(headers)
        if not half_close:
            closed.wait(timeout)

    call = stub_for(ch)(messages(), timeout=timeout)
    return ch, call


def _closing(close: Callable[[], None], closed: threading.Event) -> Callable[[], None]:
    def wrapped() -> None:
        closed.set()
        close()
    return wrapped


def _dest(answer) -> str:
    return set_headers_of(answer.request_headers.response)["x-gateway-destination-endpoint"]


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_a_waiting_request_parks_without_holding_up_others():
    producer = HoldingProducer()
    director = _director(producer)
    with EppThread(director) as epp:
        ch_a, call_a = _start(epp, {"test-wait": "a", "x-request-id": "a"})
        assert producer.arrived.wait(5)
        ch_b, call_b = _start(epp, {"x-request-id": "b"})
        assert _dest(next(call_b)).startswith("10.0.0.1:")  # B is routed while A waits
        assert director.in_flight == 1
        epp.loop.call_soon_threadsafe(producer.gates["a"].set_result, "released")
        assert _dest(next(call_a)).startswith("10.0.0.1:")
        assert producer.finished == ["a"] and producer.cancelled == []
        assert director.in_flight == 2
        assert [d.request_id for d in director.decisions.recent()] == ["a", "b"]  # newest first
        for ch in (ch_a, ch_b):
            ch.close()
        assert epp.wait_idle()
        assert director.in_flight == 0


def test_client_going_away_cancels_the_wait_at_once():
    producer = HoldingProducer()
    director = _director(producer)
    with EppThread(director) as epp:
        ch, call = _start(epp, {"test-wait": "gone"})
        assert producer.arrived.wait(5)
        call.cancel()
        ch.close()
        assert _until(lambda: producer.cancelled == ["gone"])
        assert epp.wait_idle()
        assert director.in_flight == 0 and producer.finished == []


def test_deadline_while_waiting_answers_504_and_cancels():
    producer = HoldingProducer()
    director = _director(producer)
    with EppThread(director, StreamSettings(request_timeout=0.3)) as epp:
        ch, call = _start(epp, {"test-wait": "slow"})
        answers = list(call)
        ch.close()
        assert len(answers) == 1 and answers[0].immediate_response.status.code == 504
        assert producer.cancelled == ["slow"]
        assert epp.wait_idle()
        assert director.in_flight == 0


def test_flow_gate_releases_onto_the_pool_as_it_is_then():
    pool = make_pool(8001, 8002)
    director = _director(prefer_port=8001, pool=pool)
    gate = HoldingGate()
    director.set_flow_gate(gate)
    with EppThread(director) as epp:
        ch, call = _start(epp, {"test-hold": "1"})
        assert gate.held.wait(5)
        # 8001 would win; it leaves the pool while the request is held.
        epp.loop.call_soon_threadsafe(pool.sync, [EndpointMetadata("10.0.0.1", 8002)])
        assert _until(lambda: len(pool) == 1)
        epp.loop.call_soon_threadsafe(gate.release.set_result, None)
        assert _dest(next(call)) == "10.0.0.1:8002"
        ch.close()
        assert epp.wait_idle()
        (ticket,) = gate.tickets
        assert ticket.targets == ("10.0.0.1:8002",) and ticket.finished  # booked, then released


def test_flow_gate_rejection_is_an_immediate_response_with_its_header():
    director = _director()
    director.set_flow_gate(HoldingGate())
    with EppThread(director) as epp:
        ch, call = _start(epp, {"test-reject": "1"})
        (answer,) = list(call)
        ch.close()
        imm = answer.immediate_response
        assert imm.status.code == 429
        assert imm.body == b"inference error: ResourceExhausted - queue full"
        headers = {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}
        assert headers["x-llm-d-request-dropped-reason"] == "rejected-saturated"
        assert director.in_flight == 0


def test_gate_survives_config_swap_and_cluster_objects():
    director = _director()
    gate = HoldingGate()
    director.set_flow_gate(gate)
    director.swap_config(make_config())
    director.set_cluster_objects(ClusterObjects(objectives={"batch": -1}))
    with EppThread(director) as epp:
        ch, call = _start(epp, {"test-reject": "1", "x-llm-d-inference-objective": "batch"})
        assert next(call).immediate_response.status.code == 429  # the gate still acts
        ch.close()
        assert epp.wait_idle()


def test_handle_request_refuses_to_wait():
    producer = HoldingProducer()
    director = _director(producer)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="routing waited"):
            director.handle_request(dict(REQ_HEADERS, **{"test-wait": "x"}), completion_body())
        assert producer.cancelled == ["x"]
        ctx = director.handle_request(dict(REQ_HEADERS), completion_body())  # nothing to wait for
        assert ctx.target.startswith("10.0.0.1:")

    asyncio.run(main())


def test_half_close_while_waiting_is_answered_first():
    producer = HoldingProducer()
    director = _director(producer)
    with EppThread(director) as epp:
        ch, call = _start(epp, {"test-wait": "hc"}, half_close=True)
        assert producer.arrived.wait(5)
        epp.loop.call_soon_threadsafe(producer.gates["hc"].set_result, "released")
        answers = list(call)  # routed, echoed body, then the stream ends
        ch.close()
        assert _dest(answers[0]).startswith("10.0.0.1:")
        assert answers[1].request_body.response.body_mutation.streamed_response.end_of_stream
        assert producer.finished == ["hc"]
        assert epp.wait_idle()
        assert director.in_flight == 0

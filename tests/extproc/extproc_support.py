"""Small test plugins, a hand-built LoadedConfig, and an in-process EPP on a real gRPC port.

The plugins are deliberately tiny and ours (not the built-ins) so these tests pin down the
transport and the director, whatever the scheduling plugins do.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Mapping, Sequence

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from epp.config.model import InferenceObjective, LoadedConfig, ModelRewrite
from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.pool import EndpointPool
from epp.extproc.grpcserver import start_grpc_servers
from epp.extproc.health import HealthService
from epp.extproc.service import ExtProcService
from epp.extproc.stream import StreamSettings
from epp.framework.plugin import Plugin
from epp.framework.requestcontrol import (
    AdmissionDenied,
    Admitter,
    ParseError,
    Parser,
    PreRequest,
    ResponseComplete,
    ResponseReceived,
    ResponseStreaming,
    SaturationDetector,
    UsageReader,
)
from epp.framework.scheduling import (
    CycleState,
    Filter,
    Picker,
    ProfileHandler,
    ProfileResult,
    ScoredCandidate,
    Scorer,
    SchedulingResult,
)
from epp.framework.types import Candidate, InferenceRequest, InferenceResponse, Usage
from epp.requestcontrol.director import Director, DirectorOptions
from epp.scheduling.profile import SchedulingProfile, WeightedScorer

Mode = processing_mode_pb2.ProcessingMode


# --- plugins -------------------------------------------------------------------------------
class JsonUsageReader(UsageReader):
    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, chunk: bytes, end_of_stream: bool) -> Usage | None:
        self.buf += chunk
        if not end_of_stream:
            return None
        for line in bytes(self.buf).splitlines():
            line = line.strip()
            if line.startswith(b"data: "):
                line = line[6:]
            if not line.startswith(b"{"):
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            u = doc.get("usage") if isinstance(doc, dict) else None
            if isinstance(u, dict):
                return Usage(prompt_tokens=u.get("prompt_tokens", 0), completion_tokens=u.get("completion_tokens", 0),
                             total_tokens=u.get("total_tokens", 0))
        return None


class JsonParser(Parser):
    plugin_type = "test-json-parser"

    def parse_request(self, body: bytes, headers: Mapping[str, str]) -> InferenceRequest:
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise ParseError(f"error unmarshaling request body: {e}") from None
        if not isinstance(doc, dict):
            raise ParseError("request body must be a JSON object")
        return InferenceRequest(request_id="", headers=dict(headers), body=body, payload=doc,
                                stream=doc.get("stream") is True, path=headers.get(":path", "/v1/completions"))

    def usage_reader(self, response_headers: Mapping[str, str]) -> UsageReader:
        return JsonUsageReader()


class PreferPortScorer(Scorer):
    """1.0 for endpoints on ``port``, 0.5 otherwise."""

    plugin_type = "test-prefer-port"

    def __init__(self, port: int = 0) -> None:
        super().__init__("prefer-port")
        self.port = port

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        return [1.0 if c.metadata.port == self.port else 0.5 for c in candidates]


class HeaderFilter(Filter):
    """Keeps only endpoints named in header ``test-only`` (absent = keep all)."""

    plugin_type = "test-header-filter"

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> list[Candidate]:
        only = request.headers.get("test-only")
        if only is None:
            return candidates
        keep = {s.strip() for s in only.split(",")}
        return [c for c in candidates if c.key in keep]


class MaxPicker(Picker):
    plugin_type = "test-max-picker"

    def pick(self, cycle: CycleState, request: InferenceRequest, scored: list[ScoredCandidate]) -> list[Candidate]:
        if not scored:
            return []
        best = max(scored, key=lambda s: s.score)
        return [best.candidate]


class OneProfile(ProfileHandler):
    plugin_type = "test-single-profile"

    def pick_profiles(self, cycle, request, profiles, results):
        return {} if results else dict(profiles)

    def process_results(self, cycle, request, results: Mapping[str, ProfileResult | None]) -> SchedulingResult:
        name = next(iter(results))
        return SchedulingResult(dict(results), name)


class FixedSaturation(SaturationDetector):
    plugin_type = "test-fixed-saturation"

    def __init__(self, value: float = 0.0) -> None:
        super().__init__("fixed-saturation")
        self.value = value

    def saturation(self, candidates: Sequence[Candidate]) -> float:
        return self.value


class DenyHeaderAdmitter(Admitter):
    plugin_type = "test-deny-admitter"

    def admit(self, request: InferenceRequest, candidates: Sequence[Candidate]) -> AdmissionDenied | None:
        return AdmissionDenied(403, "denied by test") if request.headers.get("test-deny") else None


class Recorder(Plugin, PreRequest, ResponseReceived, ResponseStreaming, ResponseComplete):
    """Records every lifecycle call; adds ``x-session-token`` to responses."""

    plugin_type = "test-recorder"

    def __init__(self) -> None:
        super().__init__("recorder")
        self.events: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()

    def _add(self, kind: str, rid: str, extra: Any = None) -> None:
        with self.lock:
            self.events.append((kind, rid, extra))

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        self._add("pre", request.request_id, result.targets[0].key)

    def response_received(self, request: InferenceRequest, response: InferenceResponse, target: str) -> None:
        response.added_headers["x-session-token"] = f"tok-{target}"
        self._add("received", request.request_id, response.status)

    def response_streaming(self, request: InferenceRequest, response: InferenceResponse, chunk: bytes, target: str) -> None:
        self._add("chunk", request.request_id, len(chunk))

    def response_complete(self, request: InferenceRequest, response: InferenceResponse, target: str) -> None:
        self._add("complete", request.request_id, (response.outcome, response.usage))

    def of(self, kind: str) -> list[tuple[str, str, Any]]:
        with self.lock:
            return [e for e in self.events if e[0] == kind]


def make_config(*, saturation: float = 0.0, prefer_port: int = 0, recorder: Recorder | None = None,
                objectives: dict[str, int] | None = None, rewrites: dict[str, ModelRewrite] | None = None,
                streaming_hook: bool = False) -> LoadedConfig:
    parser = JsonParser("parser")
    profile = SchedulingProfile("default", filters=[HeaderFilter("header-filter")],
                                scorers=[WeightedScorer(PreferPortScorer(prefer_port), 2.0)],
                                picker=MaxPicker("picker"))
    handler = OneProfile("handler")
    rec = recorder or Recorder()
    return LoadedConfig(
        document={}, plugins={"parser": parser, "handler": handler, "recorder": rec},
        profiles={"default": profile}, profile_handler=handler, parser=parser,
        saturation_detector=FixedSaturation(saturation),
        admitters=[DenyHeaderAdmitter("deny")],
        pre_request=[rec], response_received=[rec], response_complete=[rec],
        response_streaming=[rec] if streaming_hook else [],
        objectives={k: InferenceObjective(k, v) for k, v in (objectives or {}).items()},
        model_rewrites=dict(rewrites or {}),
    )


def make_pool(*ports: int, host: str = "10.0.0.1") -> EndpointPool:
    pool = EndpointPool("test-pool")
    pool.sync([EndpointMetadata(host, p) for p in ports])
    return pool


# --- an in-process EPP on a real gRPC port ---------------------------------------------------
class EppThread:
    """Runs ExtProcService + health on 127.0.0.1 in a background event loop."""

    def __init__(self, director: Director, settings: StreamSettings | None = None, *, secure: bool = False,
                 cert_path: str | None = None, health_port: int | None = None) -> None:
        self.director = director
        self.service = ExtProcService(director, settings or StreamSettings())
        self.health = HealthService(lambda: director.pool.synced)
        self._secure = secure
        self._cert_path = cert_path
        self._health_port = health_port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0
        self.health_bound: int | None = None

    def __enter__(self) -> "EppThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self.servers = await start_grpc_servers(self.service, self.health, host="127.0.0.1", port=0,
                                                health_port=self._health_port, secure=self._secure,
                                                cert_path=self._cert_path, max_body_bytes=16 << 20)
        self.port = self.servers.extproc_port
        self.health_bound = self.servers.health_port

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.servers.stop(0.2), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """True once no stream is active (the server side of every RPC has finished)."""
        import time
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.service.active_streams == 0:
                return True
            time.sleep(0.01)
        return False


def stub_for(channel: grpc.Channel):
    return channel.stream_stream("/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                                 request_serializer=pb.ProcessingRequest.SerializeToString,
                                 response_deserializer=pb.ProcessingResponse.FromString)


# --- message builders for the client side --------------------------------------------------------
def headers_msg(headers: dict[str, str], *, eos: bool = False, req_mode: int | None = Mode.FULL_DUPLEX_STREAMED,
                resp_mode: int = Mode.FULL_DUPLEX_STREAMED, metadata: dict[str, Any] | None = None,
                response: bool = False) -> pb.ProcessingRequest:
    hm = pb.HttpHeaders(end_of_stream=eos)
    for k, v in headers.items():
        hm.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    req = pb.ProcessingRequest(response_headers=hm) if response else pb.ProcessingRequest(request_headers=hm)
    if req_mode is not None and not response:
        req.protocol_config.request_body_mode = req_mode
        req.protocol_config.response_body_mode = resp_mode
    if metadata:
        for ns, values in metadata.items():
            st = struct_pb2.Struct()
            st.update(values)
            req.metadata_context.filter_metadata[ns].CopyFrom(st)
    return req


def body_msg(data: bytes, eos: bool, *, response: bool = False) -> pb.ProcessingRequest:
    b = pb.HttpBody(body=data, end_of_stream=eos)
    return pb.ProcessingRequest(response_body=b) if response else pb.ProcessingRequest(request_body=b)


def trailers_msg(*, response: bool = False) -> pb.ProcessingRequest:
    t = pb.HttpTrailers()
    return pb.ProcessingRequest(response_trailers=t) if response else pb.ProcessingRequest(request_trailers=t)


def set_headers_of(common: pb.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def lb_metadata_of(resp: pb.ProcessingResponse) -> str | None:
    fields = resp.dynamic_metadata.fields
    if "envoy.lb" not in fields:
        return None
    return fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value


REQ_HEADERS = {":method": "POST", ":path": "/v1/completions", "content-type": "application/json", "x-request-id": "r1"}


def completion_body(model: str = "m1", prompt: str = "hello", **extra: Any) -> bytes:
    return json.dumps({"model": model, "prompt": prompt, **extra}).encode()


def new_director(config: LoadedConfig | None = None, pool: EndpointPool | None = None, **opts: Any) -> Director:
    return Director(config or make_config(), make_pool(8001, 8002, 8003) if pool is None else pool, DirectorOptions(**opts))

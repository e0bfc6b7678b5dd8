"""gRPC health (grpc.health.v1) with upstream's semantics (``cmd/epp/runner/health.go``).

Ready means: the endpoint pool has synced (for Kubernetes: the InferencePool exists and its
pods were listed) and the EPP is not draining after SIGTERM.

- Leader election off: every service name gets the same answer, SERVING when ready, so
  probes work whatever name they use (``inference-extension``, ``""``, ...).
- Leader election on: ``liveness`` is always SERVING (a standby is alive); ``readiness``,
  ``""`` and ``envoy.service.ext_proc.v3.ExternalProcessor`` are SERVING only when ready
  *and* this replica holds the Lease; any other name is SERVICE_UNKNOWN.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.extproc.messages import SERVICE_NAME

LIVENESS = "liveness"
READINESS = "readiness"
KNOWN_SERVICES = ("", LIVENESS, READINESS, "inference-extension", SERVICE_NAME)
_READINESS_NAMES = frozenset({"", READINESS, SERVICE_NAME})

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, ready: Callable[[], bool], watch_interval: float = 0.5, *, leader_election: bool = False,
                 is_leader: Callable[[], bool] | None = None) -> None:
        self._ready = ready
        self._watch_interval = watch_interval
        self.leader_election = leader_election
        self._is_leader = is_leader or (lambda: True)
        self.draining = False  # set on SIGTERM: readiness goes NOT_SERVING, ext_proc keeps serving

    def _serving(self, leader_matters: bool) -> bool:
        try:
            return not self.draining and self._ready() and (not leader_matters or self._is_leader())
        except Exception:
            return False

    def status(self, service: str = "") -> int:
        if not self.leader_election:
            return SERVING if self._serving(False) else NOT_SERVING
        if service == LIVENESS:
            return SERVING
        if service in _READINESS_NAMES:
            return SERVING if self._serving(True) else NOT_SERVING
        return SERVICE_UNKNOWN

    def statuses(self) -> dict[str, int]:
        """What ``List`` reports: every name a probe is known to use."""
        return {name: self.status(name) for name in KNOWN_SERVICES}

    def list_response(self) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=s) for name, s in self.statuses().items()})

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        return health_pb2.HealthCheckResponse(status=self.status(request.service))

    async def List(self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext):
        return self.list_response()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(self._watch_interval)


def add_health(server: grpc.aio.Server, service: HealthService) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(service, server)

"""gRPC health (grpc.health.v1) with upstream's semantics.

Without leader election upstream answers every service name the same way: SERVING once the
endpoint pool has synced, NOT_SERVING before. Probes therefore work whatever name they use
(``inference-extension``, ``envoy.service.ext_proc.v3.ExternalProcessor``, ``""``...).
"""

from __future__ import annotations

import asyncio
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.extproc.messages import SERVICE_NAME

KNOWN_SERVICES = ("", "liveness", "readiness", "inference-extension", SERVICE_NAME)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, ready: Callable[[], bool], watch_interval: float = 0.5) -> None:
        self._ready = ready
        self._watch_interval = watch_interval

    def status(self) -> int:
        try:
            return _SERVING if self._ready() else _NOT_SERVING
        except Exception:
            return _NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        return health_pb2.HealthCheckResponse(status=self.status())

    async def List(self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext):
        status = health_pb2.HealthCheckResponse(status=self.status())
        return health_pb2.HealthListResponse(statuses={name: status for name in KNOWN_SERVICES})

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        last = None
        while True:
            status = self.status()
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(self._watch_interval)


def add_health(server: grpc.aio.Server, service: HealthService) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(service, server)

"""Assembles the gRPC servers: ext_proc (+ health) on the main port, health on its own port."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from epp.extproc.health import HealthService, add_health
from epp.extproc.service import ExtProcService
from epp.extproc.tls import CertificateReloader, server_credentials

# Room for the largest request body in one message (BUFFERED mode sends the body whole).
MESSAGE_MARGIN = 1 << 20


def server_options(max_body_bytes: int) -> list[tuple[str, int]]:
    limit = max_body_bytes + MESSAGE_MARGIN
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Two EPPs must never silently share a port (gRPC enables SO_REUSEPORT by default).
        ("grpc.so_reuseport", 0),
        # Envoy keeps one long-lived HTTP/2 connection; let it ping us.
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class PortInUseError(OSError):
    pass


@dataclass
class GrpcServers:
    extproc: grpc.aio.Server
    health: grpc.aio.Server | None
    extproc_port: int
    health_port: int | None
    reloader: CertificateReloader | None

    async def start(self) -> None:
        await self.extproc.start()
        if self.health is not None:
            await self.health.start()

    async def stop(self, grace: float = 1.0) -> None:
        if self.health is not None:
            await self.health.stop(grace)
        await self.extproc.stop(grace)


def _bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    try:
        port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises RuntimeError("Failed to bind ...")
        raise PortInUseError(f"cannot listen on {address}: {e}") from None
    if port == 0:
        raise PortInUseError(f"cannot listen on {address} (in use?)")
    return port


def build_grpc_servers(service: ExtProcService, health: HealthService, *, host: str, port: int,
                       health_port: int | None, secure: bool, cert_path: str | None,
                       max_body_bytes: int) -> GrpcServers:
    opts = server_options(max_body_bytes)
    ext = grpc.aio.server(options=opts)
    ext.add_generic_rpc_handlers((service.handler(),))
    add_health(ext, health)
    reloader = None
    creds = None
    if secure:
        creds, reloader = server_credentials(cert_path)
    bound = _bind(ext, f"{host}:{port}", creds)
    hs = None
    hport = None
    if health_port is not None:
        hs = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_health(hs, health)
        hport = _bind(hs, f"{host}:{health_port}", None)
    return GrpcServers(ext, hs, bound, hport, reloader)

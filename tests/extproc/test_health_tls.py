"""gRPC health semantics and TLS (self-signed, and certificate files that reload)."""

from __future__ import annotations

import os
import time

import grpc
import pytest
from extproc_support import REQ_HEADERS, EppThread, body_msg, completion_body, headers_msg, new_director, stub_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.datalayer.pool import EndpointPool
from epp.extproc.tls import CertificateReloader, self_signed_certificate
from epp.requestcontrol.director import Director

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=3).status


def test_health_follows_pool_sync_for_any_service_name_on_both_ports():
    from epp.datalayer.endpoint import EndpointMetadata
    from extproc_support import make_config

    pool = EndpointPool("p")
    director = Director(make_config(), pool)
    with EppThread(director, health_port=0) as epp:
        hp = f"127.0.0.1:{epp.health_bound}"
        for target in (hp, epp.target):
            for name in ("", "inference-extension", "envoy.service.ext_proc.v3.ExternalProcessor", "whatever"):
                assert check(target, name) == NOT_SERVING
        pool.sync([EndpointMetadata("10.0.0.1", 8000)])
        for target in (hp, epp.target):
            for name in ("", "liveness", "inference-extension", "anything-else"):
                assert check(target, name) == SERVING
        with grpc.insecure_channel(hp) as ch:
            listed = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=3)
        assert listed.statuses["envoy.service.ext_proc.v3.ExternalProcessor"].status == SERVING


def _write_pair(d, cert: bytes, key: bytes) -> None:
    # Replace atomically, as a Kubernetes secret update does.
    for name, data in (("tls.crt", cert), ("tls.key", key)):
        tmp = d / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, d / name)


def _request_ok(target: str, root_cert: bytes) -> bool:
    creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
    opts = [("grpc.ssl_target_name_override", "localhost")]
    try:
        with grpc.secure_channel(target, creds, options=opts) as ch:
            msgs = [headers_msg(REQ_HEADERS), body_msg(completion_body(), True)]
            out = list(stub_for(ch)(iter(msgs), timeout=3))
            return out[0].HasField("request_headers")
    except grpc.RpcError:
        return False


def test_tls_with_certificate_files_reloads_on_change(tmp_path):
    cert1, key1 = self_signed_certificate()
    cert2, key2 = self_signed_certificate()
    _write_pair(tmp_path, cert1, key1)
    with EppThread(new_director(), secure=True, cert_path=str(tmp_path)) as epp:
        epp.servers.reloader.check_interval = 0.05
        assert _request_ok(epp.target, cert1)
        assert not _request_ok(epp.target, cert2)  # the client does not trust cert2 yet
        time.sleep(0.02)
        _write_pair(tmp_path, cert2, key2)
        deadline = time.monotonic() + 5
        ok = False
        while time.monotonic() < deadline and not ok:
            time.sleep(0.1)
            ok = _request_ok(epp.target, cert2)
        assert ok, "new certificate not served after the files changed"
        assert epp.servers.reloader.reloads >= 1


def test_self_signed_serving_without_cert_path():
    import socket
    import ssl

    with EppThread(new_director(), secure=True) as epp:
        with grpc.insecure_channel(epp.target) as ch:  # plaintext is refused
            with pytest.raises(grpc.RpcError):
                list(stub_for(ch)(iter([headers_msg(REQ_HEADERS)]), timeout=2))
        # Envoy's HTTP/2 cluster needs ALPN h2; it does not verify the certificate (upstream shape).
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", epp.port), timeout=3) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == "h2"
                pem = ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)).encode()
        assert _request_ok(epp.target, pem)  # the generated certificate serves real requests


def test_reloader_rejects_missing_files(tmp_path):
    with pytest.raises(OSError):
        CertificateReloader(tmp_path)

"""TLS for the ext_proc port: a self-signed certificate by default, or files that reload.

With ``--cert-path DIR`` the server reads ``DIR/tls.crt`` and ``DIR/tls.key`` and picks up
new versions (e.g. a rotated Kubernetes secret) for new connections: gRPC asks our fetcher
at each handshake, and the fetcher re-reads the files when their mtime changed (checked at
most once a second). ALPN ``h2`` is negotiated by gRPC itself.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import threading
import time
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


def self_signed_certificate(hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                            days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for an ECDSA P-256 self-signed certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "epp"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "epp self-signed")])
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem


class CertificateReloader:
    """Watches ``tls.crt``/``tls.key`` of a directory; both servers ask it for new versions."""

    def __init__(self, cert_dir: str | os.PathLike[str], check_interval: float = 1.0) -> None:
        self.cert_path = Path(cert_dir) / CERT_FILE
        self.key_path = Path(cert_dir) / KEY_FILE
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._next_check = time.monotonic() + check_interval
        self.reloads = 0
        self.pair = self._read()  # raises if the files are missing or unreadable

    def _mtimes(self) -> tuple[int, int]:
        return (self.cert_path.stat().st_mtime_ns, self.key_path.stat().st_mtime_ns)

    def _read(self) -> tuple[bytes, bytes]:
        return self.cert_path.read_bytes(), self.key_path.read_bytes()

    def poll(self) -> tuple[bytes, bytes] | None:
        """(certificate PEM, key PEM) if the files changed since the last look, else None."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        with self._lock:
            self._next_check = now + self.check_interval
            try:
                stamp = self._mtimes()
                if stamp == self._stamp:
                    return None
                pair = self._read()
            except OSError as e:  # mid-rotation (one file replaced, not yet the other): retry later
                log.warning("cannot reload TLS certificate from %s: %s", self.cert_path.parent, e)
                return None
            self._stamp = stamp
            self.pair = pair
            self.reloads += 1
            log.info("reloaded TLS certificate from %s", self.cert_path.parent)
            return pair

    @staticmethod
    def grpc_config(pair: tuple[bytes, bytes]) -> grpc.ServerCertificateConfiguration:
        cert, key = pair
        return grpc.ssl_server_certificate_configuration([(key, cert)])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpcio's fetcher callback (called at handshakes): a new configuration or None."""
        pair = self.poll()
        return None if pair is None else self.grpc_config(pair)


def server_credentials(cert_path: str | None) -> tuple[grpc.ServerCredentials, CertificateReloader | None]:
    """Credentials for the ext_proc port: reloading files when ``cert_path`` is set, else a
    certificate generated now."""
    if cert_path:
        reloader = CertificateReloader(cert_path)
        creds = grpc.dynamic_ssl_server_credentials(reloader.grpc_config(reloader.pair), reloader.fetch,
                                                    require_client_authentication=False)
        return creds, reloader
    cert, key = self_signed_certificate()
    return grpc.ssl_server_credentials([(key, cert)]), None

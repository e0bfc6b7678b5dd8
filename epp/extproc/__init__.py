"""Envoy ext_proc: the gRPC servicer, the per-stream state machine, health and TLS."""

from epp.extproc.service import ExtProcService
from epp.extproc.stream import ExtProcStream, StreamSettings

__all__ = ["ExtProcService", "ExtProcStream", "StreamSettings"]

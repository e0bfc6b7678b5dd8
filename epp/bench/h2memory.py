"""Memory of the ext_proc port per HTTP/2 connection and per open stream, from the outside.

Why: the HTTP/2 core bounds what a peer can make it hold (``epp/extproc/h2/README.md`` has the
worst case per connection); this measures what ordinary use costs and whether memory comes back.
One ``epp serve`` (default configuration, one endpoint); its RSS (``/proc/<pid>/status``) is read

- after start-up,
- with ``connections`` idle connections open (preface, SETTINGS, ACK; nothing else),
- with ``streams`` ext_proc streams open at once (call headers only, spread over connections
  of ``SETTINGS_MAX_CONCURRENT_STREAMS`` streams each), then after the client reset them all,
  and the same burst again on new connections (``bursts`` times: do later bursts reuse the
  memory of the first, or does RSS keep growing?).

Each step waits for a PING ACK on every connection, so the server has handled everything sent.

    python -m epp.bench.h2memory [--connections 100] [--streams 10000] [--bursts 2] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from typing import Any

from epp.bench.procs import ProcessGroup
from epp.bench.stacks import start_epp
from epp.extproc.h2.frames import (
    F_ACK,
    F_END_HEADERS,
    HEADERS,
    MAX_CONCURRENT_STREAMS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    frame,
)
from epp.extproc.h2.headers import literal

_HEAD = struct.Struct(">BHBBI")
_CALL = b"".join(literal(k, v) for k, v in (
    (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"epp"),
    (b":path", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
    (b"content-type", b"application/grpc"), (b"te", b"trailers")))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class _Client:
    """One blocking HTTP/2 client connection that reads (and drops) what the server sends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.server_settings: dict[int, int] = {}
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        while not self.server_settings:
            ftype, flags, _, payload = self._next()
            if ftype == SETTINGS and not flags & F_ACK:
                self.server_settings = {k: v for k, v in struct.iter_unpack(">HI", payload)}
        self.sock.sendall(frame(SETTINGS, F_ACK, 0))
        self.sync()

    def _next(self) -> tuple[int, int, int, bytes]:
        while True:
            if len(self.buf) >= 9:
                hi, lo, ftype, flags, sid = _HEAD.unpack_from(self.buf)
                n = hi << 16 | lo
                if len(self.buf) >= 9 + n:
                    payload, self.buf = self.buf[9:9 + n], self.buf[9 + n:]
                    return ftype, flags, sid, payload
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk

    def sync(self) -> None:
        """Send a PING and read until its ACK: the server has handled everything before it."""
        self.sock.sendall(frame(PING, 0, 0, b"h2memory"))
        while True:
            ftype, flags, _, payload = self._next()
            if ftype == PING and flags & F_ACK and payload == b"h2memory":
                return

    def open_streams(self, first_sid: int, count: int) -> list[int]:
        sids = list(range(first_sid, first_sid + 2 * count, 2))
        self.sock.sendall(b"".join(frame(HEADERS, F_END_HEADERS, sid, _CALL) for sid in sids))
        return sids

    def reset(self, sids: list[int]) -> None:
        self.sock.sendall(b"".join(frame(RST_STREAM, 0, sid, b"\x00\x00\x00\x08") for sid in sids))

    def close(self) -> None:
        self.sock.close()


def _settle(pid: int, seconds: float) -> float:
    time.sleep(seconds)  # a moment for the loop's housekeeping (timers, deferred metrics)
    return rss_mib(pid)


def _burst(port: int, streams: int) -> tuple[list[_Client], list[list[int]]]:
    """``streams`` open at once over as many connections as the stream limit requires."""
    clients: list[_Client] = []
    opened: list[list[int]] = []
    left = streams
    while left > 0:
        c = _Client(port)
        n = min(left, c.server_settings.get(MAX_CONCURRENT_STREAMS, left))
        clients.append(c)
        opened.append(c.open_streams(1, n))
        left -= n
    for c in clients:
        c.sync()
    return clients, opened


def measure(connections: int = 100, streams: int = 10_000, bursts: int = 2, settle: float = 0.5) -> dict[str, Any]:
    with ProcessGroup() as group:
        epp = start_epp(group, ["127.0.0.1:9"], name="epp-h2memory")
        pid = epp.process.pid
        out: dict[str, Any] = {"connections": connections, "streams": streams}
        warm = _Client(epp.grpc_port)  # one connection and stream first: lazy imports and caches
        warm.reset(warm.open_streams(1, 1))
        warm.sync()
        warm.close()
        out["start_mib"] = base = _settle(pid, settle)
        idle = [_Client(epp.grpc_port) for _ in range(connections)]
        out["idle_connections_mib"] = _settle(pid, settle)
        out["per_idle_connection_kib"] = (out["idle_connections_mib"] - base) * 1024 / connections
        for c in idle:
            c.close()
        out["after_idle_closed_mib"] = _settle(pid, settle)
        for burst in range(1, bursts + 1):
            clients, opened = _burst(epp.grpc_port, streams)
            out[f"burst{burst}_open_mib"] = _settle(pid, settle)
            out[f"burst{burst}_connections"] = len(clients)
            for c, sids in zip(clients, opened):
                c.reset(sids)
            for c in clients:
                c.sync()
            out[f"burst{burst}_reset_mib"] = _settle(pid, settle)
            for c in clients:
                c.close()
            out[f"burst{burst}_closed_mib"] = _settle(pid, settle)
        out["per_open_stream_kib"] = (out["burst1_open_mib"] - out["after_idle_closed_mib"]) * 1024 / streams
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--bursts", type=int, default=2, help="how many times the stream burst is repeated")
    ap.add_argument("--out", help="also write the result here (JSON)")
    args = ap.parse_args(argv)
    result = {k: round(v, 2) if isinstance(v, float) else v for k, v in measure(args.connections, args.streams, args.bursts).items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

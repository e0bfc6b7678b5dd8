"""What one HTTP/2 connection may cost us, and the token bucket that caps reset floods.

Every number here bounds memory or work that a peer can cause; the defaults are sized for
Envoy (one or a few long-lived connections carrying every ext_proc stream of a worker) and
documented in ``epp/extproc/h2/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    # Streams open at once per connection (SETTINGS_MAX_CONCURRENT_STREAMS); more are
    # refused with REFUSED_STREAM. Envoy opens another connection when it needs more.
    max_concurrent_streams: int = 1000
    # Receive window of each stream (SETTINGS_INITIAL_WINDOW_SIZE). Not below 65535: the
    # peer may use the default before it sees our SETTINGS.
    stream_window: int = 65535
    # Receive window of the connection. Credit is returned as frames are read (what a
    # connection holds is bounded per stream), so this only bounds bytes in flight.
    connection_window: int = 1 << 20
    # Largest frame we accept (SETTINGS_MAX_FRAME_SIZE); 1 MiB means fewer frames for bodies.
    max_frame_size: int = 1 << 20
    # SETTINGS_MAX_HEADER_LIST_SIZE: decoded size (RFC 9113 §6.5.2) and, since a header
    # block is buffered before decoding, the largest compressed block we collect.
    max_header_list_size: int = 64 << 10
    # CONTINUATION frames in one header block (a flood of empty ones costs CPU, not bytes).
    max_continuations: int = 64
    # Whole messages larger than a stream's window are granted window for their full length
    # (the gRPC layer knows the length from the prefix) while the granted total of the
    # connection stays within this budget; others wait for earlier messages to complete.
    buffer_budget: int = 64 << 20
    # Stop reading while more than this is queued for the socket (a peer that does not read).
    write_high_water: int = 1 << 20
    write_low_water: int = 256 << 10
    # Flow-control-blocked output at which new streams are refused.
    max_blocked_bytes: int = 64 << 20
    # Resets of streams we had not answered yet ("rapid reset", CVE-2023-44487): a token
    # bucket per connection; when it runs dry, GOAWAY ENHANCE_YOUR_CALM.
    premature_reset_burst: int = 1000
    premature_resets_per_second: float = 200.0
    # Streams the peer may open after our GOAWAY (each is refused) before we close.
    max_streams_after_goaway: int = 100
    # A connection without streams for this long is closed (GOAWAY NO_ERROR); 0 = never.
    idle_timeout: float = 600.0
    # Our SETTINGS must be acknowledged (and so the preface received) within this (§6.5.3).
    settings_timeout: float = 10.0
    # A draining connection (after our GOAWAY) is closed after this even with streams open.
    drain_timeout: float = 30.0
    # Open connections per server; more are answered with GOAWAY ENHANCE_YOUR_CALM and closed.
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if not 65535 <= self.stream_window <= 2**31 - 1:
            raise ValueError("stream_window must be within 65535 .. 2^31-1")
        if not 65535 <= self.connection_window <= 2**31 - 1:
            raise ValueError("connection_window must be within 65535 .. 2^31-1")
        if not 16384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError("max_frame_size must be within 16384 .. 2^24-1")
        for name in ("max_concurrent_streams", "max_header_list_size", "max_connections", "buffer_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; ``take`` says whether one was left."""

    __slots__ = ("burst", "rate", "tokens", "stamp")

    def __init__(self, burst: int, rate: float, now: float) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True

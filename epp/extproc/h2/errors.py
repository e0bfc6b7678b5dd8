"""The two kinds of HTTP/2 error (RFC 9113 §5.4): one that ends the connection, one that ends a stream."""

from __future__ import annotations


class H2ConnectionError(Exception):
    """A connection error: we send GOAWAY with ``code`` and close (§5.4.1)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class H2StreamError(Exception):
    """A stream error: we send RST_STREAM with ``code`` on ``sid`` and forget the stream (§5.4.2)."""

    def __init__(self, sid: int, code: int, message: str) -> None:
        super().__init__(message)
        self.sid = sid
        self.code = code

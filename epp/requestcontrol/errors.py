"""Request errors and how they become HTTP answers.

Upstream turns an error into an Envoy ImmediateResponse with the status of its code and the
body ``inference error: <Code> - <Msg>``; we keep the code names and the body shape so
clients and dashboards that match on them keep working. Codes beyond upstream's
(``RequestTooLarge``, ``DeadlineExceeded``) follow the same pattern.
"""

from __future__ import annotations

from typing import Mapping

STATUS_BY_CODE: dict[str, int] = {
    "BadRequest": 400,
    "Unauthorized": 401,
    "Forbidden": 403,
    "NotFound": 404,
    "RequestTooLarge": 413,
    "ResourceExhausted": 429,
    "Internal": 500,
    "ServiceUnavailable": 503,
    "DeadlineExceeded": 504,
}

_CODE_BY_STATUS = {v: k for k, v in STATUS_BY_CODE.items()}


class RequestError(Exception):
    """A request the EPP answers itself instead of routing it."""

    __slots__ = ("code", "status", "message", "headers")

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 500)
        self.message = message
        self.headers = dict(headers or {})

    @classmethod
    def from_status(cls, status: int, message: str) -> "RequestError":
        """For plugin denials that carry an HTTP status but no code name."""
        return cls(_CODE_BY_STATUS.get(status, "Internal"), message, status=status)

    @property
    def body(self) -> bytes:
        return f"inference error: {self.code} - {self.message}".encode()


def bad_request(message: str) -> RequestError:
    return RequestError("BadRequest", message)


def unavailable(message: str) -> RequestError:
    return RequestError("ServiceUnavailable", message)


def exhausted(message: str) -> RequestError:
    return RequestError("ResourceExhausted", message)


def internal(message: str) -> RequestError:
    return RequestError("Internal", message)


# Exact upstream messages (clients and tests match on them).
MSG_NO_CANDIDATES = "failed to find endpoint candidates for serving the request"
MSG_MODEL_MISSING = "model not found in request body"
MSG_SHED = "system saturated, sheddable request dropped"
MSG_NOT_ADMITTED = "request cannot be admitted"
MSG_NO_PODS = "no pods available in datastore"

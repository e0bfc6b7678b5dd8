"""``session-affinity-scorer``: send a client's follow-up requests to the endpoint that served it.

The endpoint is named in an opaque token: HMAC-SHA256 of the endpoint key under a secret
(random per process unless ``secret`` is configured; configure the same secret on every
EPP replica so tokens survive restarts and work across replicas). Clients learn the token
from the ``x-session-token`` response header, added when the response headers pass
through, and send it back as the ``x-session-token`` request header. Upstream uses a
readable base64 pod name and sets the header too late to reach the client; we do neither.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Sequence

from epp.framework import ResponseReceived, Scorer, register
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest, InferenceResponse

SESSION_TOKEN_HEADER = "x-session-token"
_CACHE_LIMIT = 65536


@dataclass
class SessionAffinityParams:
    secret: str = ""  # empty: a random secret per process


@register("session-affinity-scorer")
class SessionAffinityScorer(Scorer, ResponseReceived):
    """1.0 for the endpoint named by the request's session token, 0 for every other."""

    Params = SessionAffinityParams

    def __init__(self, name: str | None = None, params: SessionAffinityParams | None = None) -> None:
        super().__init__(name, params)
        secret = self.params.secret
        self._secret = secret.encode() if secret else os.urandom(32)
        self._token_of: dict[str, str] = {}
        self._key_of: dict[str, str] = {}

    def token(self, endpoint_key: str) -> str:
        tok = self._token_of.get(endpoint_key)
        if tok is None:
            digest = hmac.new(self._secret, endpoint_key.encode(), hashlib.sha256).digest()[:18]
            tok = base64.urlsafe_b64encode(digest).decode()
            if len(self._token_of) >= _CACHE_LIMIT:  # endpoints churned a lot; start over
                self._token_of.clear()
                self._key_of.clear()
            self._token_of[endpoint_key] = tok
            self._key_of[tok] = endpoint_key
        return tok

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> Sequence[float]:
        tok = request.headers.get(SESSION_TOKEN_HEADER)
        if not tok:
            return [0.0] * len(candidates)
        tok = tok.strip()
        key = self._key_of.get(tok)
        if key is None:  # issued before a restart (with a configured secret) or never seen
            for c in candidates:
                if self.token(c.key) == tok:
                    key = c.key
                    break
        return [1.0 if c.key == key else 0.0 for c in candidates]

    def response_received(self, request: InferenceRequest, response: InferenceResponse, target: str) -> None:
        if target:
            response.added_headers[SESSION_TOKEN_HEADER] = self.token(target.split(",", 1)[0].strip())

"""Shared machinery of the HTTP data sources: one pooled client, capped reads, auth.

Each source instance owns ONE ``ScrapeClient`` (``epp/datalayer/httpclient.py``: our lean
HTTP/1.1 keep-alive client; a connection per endpoint is kept alive between ticks) for all
endpoints, created lazily on the collector's event loop and closed in ``close()``. The client
is never pickled, so a source can be shipped to the collector process before or after it
was started.
"""

from __future__ import annotations

import os
import ssl
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.errors import DataSourceError
from epp.datalayer.httpclient import DEFAULT_CONNECT_TIMEOUT, ScrapeClient
from epp.framework.datalayer import DataSource, Extractor
from epp.framework.params import Duration
from epp.framework.plugin import Handle

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
_TOKEN_RECHECK = 5.0  # seconds between looks at the bearer token file (tokens rotate)


@dataclass
class HTTPSourceParams:
    """The parameters every HTTP data source shares; subclasses set their ``path`` default."""

    scheme: Literal["http", "https"] = "http"
    path: str = "/"
    insecureSkipVerify: bool = True
    bearerTokenFile: str = ""
    timeout: Duration = Duration(1.0)
    connectTimeout: Duration = Duration(DEFAULT_CONNECT_TIMEOUT)
    maxBytes: int = DEFAULT_MAX_BYTES
    compression: bool = False

    def validate(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"'path' must start with '/', got {self.path!r}")
        if self.timeout <= 0:
            raise ValueError("'timeout' must be > 0")
        if self.connectTimeout <= 0:
            raise ValueError("'connectTimeout' must be > 0")
        if self.maxBytes <= 0:
            raise ValueError("'maxBytes' must be > 0")


class HTTPDataSource(DataSource):
    """GET ``<scheme>://<metrics host:port><path>`` per endpoint; subclasses decode the body.

    ``Params`` is an ``HTTPSourceParams`` (or a subclass).
    """

    accept = "*/*"
    collect_awaits_only_the_get = False  # see limit_timeout(); for subclasses overriding collect()

    def __init__(self, name: str | None = None, params: Any = None) -> None:
        super().__init__(name, params)
        self._client: ScrapeClient | None = None
        self._timeout = float(self.params.timeout)
        self._urls: dict[str, str] = {}
        self._token = ""
        self._token_checked = 0.0
        self._token_mtime = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, handle: Handle) -> None:
        self._ensure_client()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # sockets stay with the loop that opened them
        return state

    def _ensure_client(self) -> ScrapeClient:
        if self._client is None:
            p = self.params
            context = None
            if p.scheme == "https":
                context = ssl.create_default_context()
                if p.insecureSkipVerify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
            headers = {"Accept": self.accept}
            if self._token:  # a client rebuilt after close() or unpickling keeps the token read so far
                headers["Authorization"] = f"Bearer {self._token}"
            self._client = ScrapeClient(timeout=self._timeout, max_bytes=p.maxBytes, compression=p.compression,
                                        ssl=context, headers=headers, connect_timeout=float(p.connectTimeout))
        return self._client

    def limit_timeout(self, seconds: float) -> bool:
        """The collector's hook: bound every GET by ``seconds`` too; True if that bounds collect().

        This class's collect() awaits nothing but the client's GET (one timer per GET covers
        connect, TLS, redirects and the body), then decodes synchronously, so the collector
        can skip its own timer. A subclass that overrides collect() may await more, so it
        keeps the collector's timer unless it sets ``collect_awaits_only_the_get``.
        """
        self._timeout = min(float(self.params.timeout), float(seconds))
        if self._client is not None:
            self._client.timeout = self._timeout
        return type(self).collect is HTTPDataSource.collect or self.collect_awaits_only_the_get

    # -- one fetch ---------------------------------------------------------------------------

    def url(self, endpoint: EndpointMetadata) -> str:
        host = endpoint.metrics_host
        url = self._urls.get(host)
        if url is None:
            if len(self._urls) > 4096:  # endpoints come and go; do not grow forever
                self._urls.clear()
            url = self._urls[host] = f"{self.params.scheme}://{host}{self.params.path}"
        return url

    async def fetch(self, endpoint: EndpointMetadata) -> bytes:
        """The body of ``GET url(endpoint)``; DataSourceError ("GET <url>: ...") otherwise."""
        client = self._client or self._ensure_client()
        if self.params.bearerTokenFile:
            self._refresh_token(client)
        return await client.get(self.url(endpoint))

    async def collect(self, endpoint: EndpointMetadata) -> Any:
        return self.decode(await self.fetch(endpoint), endpoint)

    @abstractmethod
    def decode(self, body: bytes, endpoint: EndpointMetadata) -> Any:
        """Turn the body into this source's ``output_type``; raise DataSourceError if it cannot."""

    def bind(self, extractors: Sequence[Extractor]) -> None:
        """HTTP sources fetch one document whatever the extractors; subclasses may narrow parsing."""

    # -- bearer token ------------------------------------------------------------------------

    def _refresh_token(self, client: ScrapeClient) -> None:
        path = self.params.bearerTokenFile
        t = time.monotonic()
        if t - self._token_checked < _TOKEN_RECHECK and self._token:
            return
        self._token_checked = t
        try:
            mtime = os.stat(path).st_mtime
            if mtime != self._token_mtime or not self._token:
                with open(path, encoding="utf-8") as f:
                    token = f.read().strip()
                client.set_header("Authorization", f"Bearer {token}")
                self._token, self._token_mtime = token, mtime
        except (OSError, ValueError) as e:
            if not self._token:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise DataSourceError(f"cannot read bearerTokenFile {path!r}: {reason}") from None
            # keep using the last token; the file may be mid-rotation

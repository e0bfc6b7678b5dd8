"""Shared machinery of the HTTP data sources: one pooled session, capped reads, auth.

Each source instance owns ONE ``aiohttp.ClientSession`` for all endpoints (connections are
kept alive per endpoint), created on the collector's event loop and closed in ``close()``.
The session is never pickled, so a source can be shipped to the collector process before
or after it was started.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import aiohttp

from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.errors import DataSourceError
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
    maxBytes: int = DEFAULT_MAX_BYTES
    compression: bool = False

    def validate(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"'path' must start with '/', got {self.path!r}")
        if self.timeout <= 0:
            raise ValueError("'timeout' must be > 0")
        if self.maxBytes <= 0:
            raise ValueError("'maxBytes' must be > 0")


class HTTPDataSource(DataSource):
    """GET ``<scheme>://<metrics host:port><path>`` per endpoint; subclasses decode the body.

    ``Params`` is an ``HTTPSourceParams`` (or a subclass).
    """

    accept = "*/*"

    def __init__(self, name: str | None = None, params: Any = None) -> None:
        super().__init__(name, params)
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, str] = {}
        self._timeout = aiohttp.ClientTimeout(total=float(self.params.timeout))
        self._ssl: ssl.SSLContext | bool | None = None
        self._token = ""
        self._token_checked = 0.0
        self._token_mtime = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, handle: Handle) -> None:
        self._ensure_session()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None
        state["_ssl"] = None
        return state

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            p = self.params
            if p.scheme == "https":
                self._ssl = False if p.insecureSkipVerify else ssl.create_default_context()
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30)
            headers = {"Accept": self.accept, "User-Agent": "epp-datalayer"}
            if not p.compression:
                # At 20 scrapes/s per endpoint, gzip costs the model server and us more CPU
                # than the bytes it saves on a cluster network.
                headers["Accept-Encoding"] = "identity"
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=headers,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self._timeout,
                raise_for_status=False,
            )
        return self._session

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
        session = self._session if self._session is not None and not self._session.closed else self._ensure_session()
        url = self.url(endpoint)
        headers = self._auth_headers()
        try:
            resp = await session.get(url, headers=headers, ssl=self._ssl)
        except asyncio.TimeoutError:
            raise DataSourceError(f"GET {url}: timed out after {float(self.params.timeout):g}s") from None
        except aiohttp.ClientError as e:
            raise DataSourceError(f"GET {url}: {type(e).__name__}: {e}") from None
        try:
            if resp.status != 200:
                raise DataSourceError(f"GET {url}: HTTP {resp.status} {resp.reason or ''}".rstrip())
            body = await read_capped(resp, self.params.maxBytes, url)
        except BaseException as e:
            resp.close()  # the body was not read to the end: this connection cannot be reused
            if isinstance(e, asyncio.TimeoutError):
                raise DataSourceError(f"GET {url}: timed out reading the body") from None
            if isinstance(e, aiohttp.ClientError):
                raise DataSourceError(f"GET {url}: {type(e).__name__} while reading the body: {e}") from None
            raise
        resp.release()
        return body

    async def collect(self, endpoint: EndpointMetadata) -> Any:
        return self.decode(await self.fetch(endpoint), endpoint)

    @abstractmethod
    def decode(self, body: bytes, endpoint: EndpointMetadata) -> Any:
        """Turn the body into this source's ``output_type``; raise DataSourceError if it cannot."""

    def bind(self, extractors: Sequence[Extractor]) -> None:
        """HTTP sources fetch one document whatever the extractors; subclasses may narrow parsing."""

    # -- bearer token ------------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str] | None:
        path = self.params.bearerTokenFile
        if not path:
            return None
        t = time.monotonic()
        if t - self._token_checked >= _TOKEN_RECHECK or not self._token:
            self._token_checked = t
            try:
                mtime = os.stat(path).st_mtime
                if mtime != self._token_mtime or not self._token:
                    with open(path, encoding="utf-8") as f:
                        self._token = f.read().strip()
                    self._token_mtime = mtime
            except OSError as e:
                if not self._token:
                    raise DataSourceError(f"cannot read bearerTokenFile {path!r}: {e.strerror or e}") from None
                # keep using the last token; the file may be mid-rotation
        return {"Authorization": f"Bearer {self._token}"}


async def read_capped(resp: aiohttp.ClientResponse, limit: int, url: str) -> bytes:
    """The whole body, or DataSourceError once it exceeds ``limit`` bytes (after decompression)."""
    length = resp.content_length
    if length is not None and length > limit:
        raise DataSourceError(f"GET {url}: body of {length} bytes exceeds the {limit}-byte limit")
    if length is not None and "Content-Encoding" not in resp.headers:
        return await resp.read()
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise DataSourceError(f"GET {url}: body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)

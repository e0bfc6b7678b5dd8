"""The EPP's Kubernetes API access: credentials, and raw JSON list / watch / get / write.

Credentials and transport come from ``lightkube`` (kubeconfig files with token, client
certificate and exec-plugin users, the in-cluster service account with token rotation);
requests go through its configured HTTP client and bodies stay plain JSON (decoded with
msgspec), so the informers can handle resourceVersions, bookmarks and 410 Gone themselves
(see ``informer.py`` and the measurements in the README's dependency table).

Watch streams are read with aiohttp instead (same TLS context, the Authorization header from
lightkube's auth flow): one event at a time costs ~4x less CPU there than through httpx's
anyio stack, which matters at pod-churn rates (``epp bench discovery``).

Where the credentials come from, in upstream's order (controller-runtime): ``--kubeconfig``,
else ``$KUBECONFIG`` (the first file of a list), else the in-cluster service account, else
``~/.kube/config``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import msgspec

from epp.discovery.resources import ResourceType

Obj = dict[str, Any]
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# httpx logs every request at INFO: a watch restart or a Lease renewal is not news.
logging.getLogger("httpx2").setLevel(logging.WARNING)
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class KubeConfigError(ValueError):
    """No usable credentials; the message says which sources were tried."""


class KubeApiError(Exception):
    """The API server answered with an error Status (or could not be reached: code 0)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}" if code else message)
        self.code, self.reason, self.message = code, reason, message


class Gone(KubeApiError):
    """410: the resourceVersion asked for is older than the server's history (relist)."""


def _error(code: int, body: bytes) -> KubeApiError:
    try:
        status = _decode(body)
        reason, message = status.get("reason", ""), status.get("message", "")
    except (msgspec.DecodeError, AttributeError):
        reason, message = "", body[:200].decode("utf-8", "replace")
    return (Gone if code == 410 else KubeApiError)(code, reason or "Error", message)


def load_config(kubeconfig: str | None = None, *, service_account: str = SERVICE_ACCOUNT) -> Any:
    """A lightkube ``SingleConfig`` from the first source that exists (see the module doc)."""
    from lightkube.config.kubeconfig import KubeConfig
    from lightkube.core.exceptions import ConfigError

    tried: list[str] = []
    try:
        if kubeconfig:
            return KubeConfig.from_file(kubeconfig).get()
        env = os.environ.get("KUBECONFIG", "")
        first = next((p for p in env.split(os.pathsep) if p), "")
        if first:
            return KubeConfig.from_file(first).get()
        tried.append("--kubeconfig (not given)")
        tried.append("$KUBECONFIG (not set)")
        if os.environ.get("KUBERNETES_SERVICE_HOST") and Path(service_account, "token").exists():
            return KubeConfig.from_service_account(service_account).get()
        tried.append(f"the in-cluster service account ($KUBERNETES_SERVICE_HOST and {service_account}/token)")
        default = Path("~/.kube/config").expanduser()
        if default.is_file():
            return KubeConfig.from_file(default).get()
        tried.append(str(default))
    except (ConfigError, KeyError, OSError, ValueError, TypeError, AttributeError) as e:
        raise KubeConfigError(f"cannot load Kubernetes credentials: {e}") from None
    raise KubeConfigError("no Kubernetes credentials found; tried " + ", ".join(tried))


class KubeClient:
    """Raw JSON access to one API server. ``timeout`` bounds every request but watches."""

    def __init__(self, config: Any, *, timeout: float = 10.0) -> None:
        import httpx2
        from lightkube.config.client_adapter import ConnectionParams

        self._httpx = httpx2
        params = ConnectionParams(timeout=httpx2.Timeout(timeout)).httpx_params(config)
        self._auth = params.get("auth")
        self._ssl = params.get("verify")  # an ssl.SSLContext with the CA and any client certificate
        self._http = httpx2.AsyncClient(**params)
        self.server = str(config.cluster.server).rstrip("/")
        self._timeout = timeout
        self._aio: Any = None  # aiohttp session for watches, created on first use (needs a loop)

    @classmethod
    def from_options(cls, kubeconfig: str | None = None, **kw: Any) -> "KubeClient":
        return cls(load_config(kubeconfig), **kw)

    async def close(self) -> None:
        await self._http.aclose()
        if self._aio is not None:
            await self._aio.close()
            self._aio = None

    async def _auth_headers(self, url: str) -> dict[str, str]:
        """The headers lightkube's auth flow puts on a request (token, token file, exec plugin)."""
        if self._auth is None:
            return {}
        request = self._httpx.Request("GET", url)
        flow = self._auth.async_auth_flow(request)
        try:
            request = await flow.__anext__()
        finally:
            await flow.aclose()
        return {k: v for k, v in request.headers.items() if k.lower() == "authorization"}

    def _watch_session(self) -> Any:
        if self._aio is None:
            import ssl

            import aiohttp

            ssl_arg = self._ssl if isinstance(self._ssl, ssl.SSLContext) else (None if self._ssl else False)
            self._aio = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_arg), auto_decompress=False)
        return self._aio

    async def _request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                       body: Obj | None = None) -> Obj:
        content = _encode(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            r = await self._http.request(method, path, params=params, content=content, headers=headers)
        except self._httpx.HTTPError as e:
            raise KubeApiError(0, "Unreachable", f"{method} {self.server}{path}: {e!r}") from None
        if r.status_code >= 400:
            raise _error(r.status_code, r.content)
        return _decode(r.content)

    # --- reads -----------------------------------------------------------------------------
    async def get(self, rtype: ResourceType, namespace: str, name: str) -> Obj | None:
        try:
            return await self._request("GET", rtype.path(namespace, name))
        except KubeApiError as e:
            if e.code == 404:
                return None
            raise

    async def list(self, rtype: ResourceType, namespace: str | None, *, label_selector: str = "",
                   field_selector: str = "") -> tuple[list[Obj], str]:
        """(items, the list's resourceVersion)."""
        params = _selectors(label_selector, field_selector)
        doc = await self._request("GET", rtype.path(namespace), params=params)
        return list(doc.get("items") or []), str((doc.get("metadata") or {}).get("resourceVersion", ""))

    async def watch(self, rtype: ResourceType, namespace: str | None, resource_version: str, *,
                    label_selector: str = "", field_selector: str = "",
                    timeout_seconds: int = 300) -> AsyncIterator[Obj]:
        """Watch events (dicts with ``type`` and ``object``) after ``resource_version``, bookmarks
        included, until the server ends the stream. Raises Gone for 410, KubeApiError else."""
        params = _selectors(label_selector, field_selector)
        params.update(watch="true", allowWatchBookmarks="true", timeoutSeconds=str(timeout_seconds))
        if resource_version:
            params["resourceVersion"] = resource_version
        import aiohttp

        url = self.server + rtype.path(namespace)
        # The read timeout outlasts the server's own: bookmarks keep an idle watch alive.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=timeout_seconds + 30.0)
        try:
            headers = {"Accept": "application/json", **await self._auth_headers(url)}
            async with self._watch_session().get(url, params=params, headers=headers, timeout=timeout) as r:
                if r.status >= 400:
                    body = await r.read()
                    if r.status == 401:  # let lightkube's auth refresh a rotated token (on an httpx request)
                        await self._refresh_auth(rtype, namespace)
                    raise _error(r.status, body)
                async for line in r.content:
                    if not line.strip():
                        continue
                    event = _decode(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        code = int(status.get("code") or 500)
                        raise (Gone if code == 410 else KubeApiError)(code, status.get("reason", "Error"),
                                                                      status.get("message", ""))
                    yield event
        except (aiohttp.ClientError, asyncio.TimeoutError, self._httpx.HTTPError) as e:
            raise KubeApiError(0, "Unreachable", f"watch {url}: {e!r}") from None
        except msgspec.DecodeError as e:
            raise KubeApiError(0, "BadResponse", f"watch {rtype}: undecodable event: {e}") from None

    async def _refresh_auth(self, rtype: ResourceType, namespace: str | None) -> None:
        try:
            await self._request("GET", rtype.path(namespace), params={"limit": "1"})
        except KubeApiError:
            pass

    async def served(self, rtype: ResourceType) -> bool:
        """API discovery: whether the server serves this group/version/resource (CRD installed)."""
        try:
            doc = await self._request("GET", rtype.group_version_path)
        except KubeApiError as e:
            if e.code == 404:
                return False
            raise
        return any(r.get("kind") == rtype.kind for r in doc.get("resources") or [])

    # --- writes (the Lease) ----------------------------------------------------------------
    async def create(self, rtype: ResourceType, namespace: str, obj: Obj) -> Obj:
        return await self._request("POST", rtype.path(namespace), body=obj)

    async def replace(self, rtype: ResourceType, namespace: str, name: str, obj: Obj) -> Obj:
        """PUT; 409 Conflict when ``obj``'s resourceVersion is no longer the current one."""
        return await self._request("PUT", rtype.path(namespace, name), body=obj)


def _selectors(label_selector: str, field_selector: str) -> dict[str, str]:
    params: dict[str, str] = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params

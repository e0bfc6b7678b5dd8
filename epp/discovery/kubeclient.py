"""The EPP's Kubernetes API access: credentials, and raw JSON list / watch / get / write.

Credentials and transport come from ``lightkube`` (kubeconfig files with token, client
certificate and exec-plugin users, the in-cluster service account with token rotation);
requests go through its configured HTTP client and bodies stay plain JSON (decoded with
msgspec), so the informers can handle resourceVersions, bookmarks and 410 Gone themselves
(see ``informer.py`` and the measurements in the README's dependency table).

Where the credentials come from, in upstream's order (controller-runtime): ``--kubeconfig``,
else ``$KUBECONFIG`` (the first file of a list), else the in-cluster service account, else
``~/.kube/config``.
"""

from __future__ import annotations

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
        from lightkube.config.client_adapter import AsyncClient, ConnectionParams

        self._httpx = httpx2
        self._http = AsyncClient(config, ConnectionParams(timeout=httpx2.Timeout(timeout)))
        self.server = str(config.cluster.server)
        self._timeout = timeout

    @classmethod
    def from_options(cls, kubeconfig: str | None = None, **kw: Any) -> "KubeClient":
        return cls(load_config(kubeconfig), **kw)

    async def close(self) -> None:
        await self._http.aclose()

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
        # No read timeout: bookmarks keep an idle watch alive, the server's timeoutSeconds ends it.
        timeout = self._httpx.Timeout(self._timeout, read=timeout_seconds + 30.0)
        try:
            async with self._http.stream("GET", rtype.path(namespace), params=params, timeout=timeout) as r:
                if r.status_code >= 400:
                    raise _error(r.status_code, await r.aread())
                async for line in r.aiter_lines():
                    if not line.strip():
                        continue
                    event = _decode(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        code = int(status.get("code") or 500)
                        raise (Gone if code == 410 else KubeApiError)(code, status.get("reason", "Error"),
                                                                      status.get("message", ""))
                    yield event
        except self._httpx.HTTPError as e:
            raise KubeApiError(0, "Unreachable", f"watch {self.server}{rtype.path(namespace)}: {e!r}") from None
        except msgspec.DecodeError as e:
            raise KubeApiError(0, "BadResponse", f"watch {rtype}: undecodable event: {e}") from None

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

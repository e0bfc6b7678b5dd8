"""Static endpoint discovery: ``--endpoint HOST:PORT`` flags and a watched ``--endpoints-file``.

The file (YAML)::

    pool: {name: vllm-pool, namespace: default}     # optional; used in metric labels
    endpoints:
    - name: vllm-0                # optional; default "<address>:<port>"
      address: 127.0.0.1
      port: 8001
      metricsPort: 8001           # optional; default = port
      labels: {llm-d.ai/engine-type: vllm, llm-d.ai/role: decode}

The file is polled (stat every ``poll_interval``, content re-read when the stat changes and
at least once a second, since mtime granularity can hide a quick same-size edit), so an
add, remove or relabel lands within a second without a restart and without a file-watching
dependency. A broken edit is logged once with the exact problem and the last good list
stays in force. Endpoints given by flags are always present; a file entry with the same
``address:port`` overrides the flag's (it can carry a name and labels).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from epp.datalayer.endpoint import EndpointMetadata
from epp.datalayer.pool import EndpointPool
from epp.framework.datalayer import Discovery
from epp.framework.params import NoParams

log = logging.getLogger(__name__)

_ENDPOINT_KEYS = {"name", "address", "port", "metricsPort", "labels", "namespace"}
_TOP_KEYS = {"pool", "endpoints"}
_FORCED_READ_EVERY = 1.0


class DiscoveryError(ValueError):
    """The endpoint list is invalid; the message names the entry and the field."""


@dataclass(frozen=True)
class EndpointList:
    """One successful reading of the flags plus the file."""

    endpoints: tuple[EndpointMetadata, ...]
    pool_name: str | None = None
    pool_namespace: str | None = None
    warnings: tuple[str, ...] = ()


def parse_endpoint_flag(text: str, namespace: str = "default") -> EndpointMetadata:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    s = text.strip()
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
    else:
        host, sep, port = s.rpartition(":")
    if not sep or not host or ":" in host and not s.startswith("["):
        raise DiscoveryError(f"--endpoint {text!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    return EndpointMetadata(address=host, port=_port(port, f"--endpoint {text!r}"), namespace=namespace)


def _port(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise DiscoveryError(f"{where}: port must be an integer 1-65535, got {value!r}")
    return value


def parse_endpoints_document(text: str, source: str = "endpoints file") -> EndpointList:
    """Validate and convert one endpoints-file document. Raises DiscoveryError."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise DiscoveryError(f"{source}: invalid YAML{where}: {problem}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise DiscoveryError(f"{source}: expected a mapping with 'endpoints', got {type(doc).__name__}")
    warnings = [f"{source}: unknown key '{k}' is ignored" for k in doc if k not in _TOP_KEYS]
    pool_name = pool_ns = None
    pool = doc.get("pool")
    if pool is not None:
        if not isinstance(pool, dict):
            raise DiscoveryError(f"{source}: pool: expected a mapping {{name, namespace}}")
        pool_name = _str(pool.get("name", ""), f"{source}: pool.name") or None
        pool_ns = _str(pool.get("namespace", ""), f"{source}: pool.namespace") or None
        warnings += [f"{source}: unknown key 'pool.{k}' is ignored" for k in pool if k not in ("name", "namespace")]
    raw = doc.get("endpoints", [])
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise DiscoveryError(f"{source}: endpoints: expected a list, got {type(raw).__name__}")
    out: list[EndpointMetadata] = []
    seen: dict[str, int] = {}
    names: dict[str, int] = {}
    for i, item in enumerate(raw):
        where = f"{source}: endpoints[{i}]"
        if not isinstance(item, dict):
            raise DiscoveryError(f"{where}: expected a mapping with address and port, got {item!r}")
        warnings += [f"{where}: unknown key '{k}' is ignored" for k in item if k not in _ENDPOINT_KEYS]
        if "address" not in item:
            raise DiscoveryError(f"{where}: 'address' is required")
        if "port" not in item:
            raise DiscoveryError(f"{where}: 'port' is required")
        address = _address(item["address"], f"{where}.address")
        port = _port(item["port"], f"{where}.port")
        metrics_port = _port(item["metricsPort"], f"{where}.metricsPort") if item.get("metricsPort") is not None else 0
        labels = item.get("labels") or {}
        if not isinstance(labels, dict):
            raise DiscoveryError(f"{where}.labels: expected a mapping of strings")
        labels = {_str(k, f"{where}.labels"): _scalar(v, f"{where}.labels.{k}") for k, v in labels.items()}
        meta = EndpointMetadata(
            address=address,
            port=port,
            name=_str(item.get("name", ""), f"{where}.name"),
            namespace=_str(item.get("namespace", ""), f"{where}.namespace") or pool_ns or "default",
            metrics_port=metrics_port,
            labels=labels,
        )
        if meta.key in seen:
            raise DiscoveryError(f"{where}: {meta.key} is already listed as endpoints[{seen[meta.key]}]")
        if meta.name in names:
            raise DiscoveryError(f"{where}: name {meta.name!r} is already used by endpoints[{names[meta.name]}]")
        seen[meta.key] = i
        names[meta.name] = i
        out.append(meta)
    return EndpointList(tuple(out), pool_name, pool_ns, tuple(warnings))


def _str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DiscoveryError(f"{where}: expected a string, got {value!r}")
    return value.strip()


def _scalar(value: Any, where: str) -> str:
    # Kubernetes label values are strings; YAML turns `version: 1` or `canary: true` into
    # other scalars, which we take as their text.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise DiscoveryError(f"{where}: expected a string, got {value!r}")


def _address(value: Any, where: str) -> str:
    addr = _str(value, where)
    if not addr:
        raise DiscoveryError(f"{where}: must not be empty")
    addr = addr.strip("[]")
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        if any(c.isspace() or c in "/:@?#" for c in addr):
            raise DiscoveryError(f"{where}: {value!r} is neither an IP address nor a host name") from None
    return addr


class StaticDiscovery(Discovery):
    """Endpoints from flags and an optional watched YAML file."""

    plugin_type = "static-discovery"

    def __init__(
        self,
        endpoints: Sequence[str] = (),
        endpoints_file: str | None = None,
        *,
        poll_interval: float = 0.25,
        name: str | None = None,
        params: Any = None,
    ) -> None:
        super().__init__(name or self.plugin_type, params if params is not None else NoParams())
        self.flag_endpoints = tuple(parse_endpoint_flag(e) for e in endpoints)
        self.endpoints_file = endpoints_file or None
        self.poll_interval = poll_interval
        self.current: EndpointList | None = None
        self.reloads = 0  # successful loads that changed the pool (for tests and logs)
        self._digest: bytes | None = None
        self._bad_digest: bytes | None = None
        self._stat: tuple[int, int, int] | None = None

    @classmethod
    def from_options(cls, endpoints: Sequence[str] | None, endpoints_file: str | None,
                     **kwargs: Any) -> "StaticDiscovery":
        """Build from the ``--endpoint`` (repeatable) and ``--endpoints-file`` flags."""
        return cls(tuple(endpoints or ()), endpoints_file, **kwargs)

    def load(self) -> EndpointList:
        """Read everything once (flags + file); raises DiscoveryError. No pool involved."""
        if self.endpoints_file is None:
            return EndpointList(self.flag_endpoints)
        data = _read_file(self.endpoints_file)
        return self._merge(parse_endpoints_document(data.decode("utf-8", "replace"), self.endpoints_file))

    def _merge(self, from_file: EndpointList) -> EndpointList:
        by_key = {m.key: m for m in self.flag_endpoints}
        by_key.update({m.key: m for m in from_file.endpoints})
        return EndpointList(tuple(by_key.values()), from_file.pool_name, from_file.pool_namespace, from_file.warnings)

    async def run(self, pool: EndpointPool) -> None:
        """Load (raising DiscoveryError if the first load fails), sync the pool, then watch."""
        first = await asyncio.to_thread(self.load)
        self._apply(pool, first)
        if self.endpoints_file is None:
            return
        self._digest = await asyncio.to_thread(_digest_of, self.endpoints_file)
        self._stat = _stat_of(self.endpoints_file)
        forced = 0.0
        while True:
            await asyncio.sleep(self.poll_interval)
            forced += self.poll_interval
            st = _stat_of(self.endpoints_file)
            if st == self._stat and forced < _FORCED_READ_EVERY:
                continue
            forced = 0.0
            self._stat = st
            await self._reload(pool)

    async def _reload(self, pool: EndpointPool) -> None:
        path = self.endpoints_file
        assert path is not None
        try:
            data = await asyncio.to_thread(_read_file, path)
        except DiscoveryError as e:
            self._report_bad(str(e).encode(), str(e))
            return
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return
        try:
            parsed = self._merge(parse_endpoints_document(data.decode("utf-8", "replace"), path))
        except DiscoveryError as e:
            self._report_bad(digest, str(e))
            return
        self._digest = digest
        self._bad_digest = None
        self._apply(pool, parsed)

    def _report_bad(self, digest: bytes, message: str) -> None:
        if digest != self._bad_digest:  # once per broken version, not every poll
            self._bad_digest = digest
            log.error("endpoints file not applied, keeping the last good list of %d endpoint(s): %s",
                      len(self.current.endpoints) if self.current else 0, message)

    def _apply(self, pool: EndpointPool, new: EndpointList) -> None:
        for w in new.warnings:
            log.warning("%s", w)
        if new.pool_name:
            pool.name = new.pool_name
        if new.pool_namespace:
            pool.namespace = new.pool_namespace
        before = {ep.key: ep.metadata for ep in pool.endpoints()}
        pool.sync(new.endpoints)
        after = {m.key: m for m in new.endpoints}
        added = sorted(k for k in after if k not in before)
        removed = sorted(k for k in before if k not in after)
        changed = sorted(k for k in after if k in before and before[k] != after[k])
        if self.current is None:
            log.info("static discovery: %d endpoint(s): %s", len(after), ", ".join(sorted(after)) or "none")
        elif added or removed or changed:
            log.info("endpoints file reloaded: added %s, removed %s, updated %s",
                     added or "none", removed or "none", changed or "none")
        if self.current is None or added or removed or changed:
            self.reloads += 1
        self.current = new


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(16 * 1024 * 1024)
    except OSError as e:
        raise DiscoveryError(f"cannot read endpoints file {path!r}: {e.strerror or e}") from None


def _digest_of(path: str) -> bytes | None:
    try:
        return hashlib.sha256(_read_file(path)).digest()
    except DiscoveryError:
        return None


def _stat_of(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)

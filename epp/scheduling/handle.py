"""A plain ``Handle`` for building plugins outside the config loader (benchmarks, tests, tools)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from epp.framework.plugin import Plugin, RuntimeSettings
from epp.framework.registry import Registry, registry

if TYPE_CHECKING:
    from epp.datalayer.pool import EndpointPool


class SimpleHandle:
    """Holds created plugins by name; collects warnings instead of logging them."""

    def __init__(self, pool: "EndpointPool | None" = None, settings: RuntimeSettings | None = None,
                 reg: Registry | None = None) -> None:
        self._plugins: dict[str, Plugin] = {}
        self._pool = pool
        self._settings = settings or RuntimeSettings()
        self._registry = reg or registry
        self.warnings: list[str] = []

    def plugin(self, name: str) -> Plugin:
        return self._plugins[name]

    def plugins(self) -> list[Plugin]:
        return list(self._plugins.values())

    @property
    def pool(self) -> "EndpointPool | None":
        return self._pool

    @property
    def settings(self) -> RuntimeSettings:
        return self._settings

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def create(self, type_name: str, name: str | None = None, params: Any = None) -> Any:
        """Create a registered plugin (parameters as they would appear in YAML) and keep it by name."""
        spec = self._registry.get(type_name)
        name = name or type_name
        plugin = spec.factory(name, params, self)
        self._plugins[name] = plugin
        return plugin

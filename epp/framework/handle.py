"""A ready-made ``Handle`` over a known set of plugins.

Used when plugins are started (every plugin exists by then), inside the collector's child
process, and by tools and tests that build plugins without the config loader. The config
loader has its own handle, which attributes warnings to config paths.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from epp.framework.plugin import Plugin, RuntimeSettings
from epp.framework.registry import Registry, registry

if TYPE_CHECKING:
    from epp.datalayer.pool import EndpointPool

log = logging.getLogger("epp.plugins")


class PluginHandle:
    """Plugins by name, the pool and the settings; warnings go to ``warn`` (default: collected)."""

    def __init__(
        self,
        plugins: Mapping[str, Plugin] | Iterable[Plugin] = (),
        *,
        pool: "EndpointPool | None" = None,
        settings: RuntimeSettings | None = None,
        warn: Callable[[str], None] | None = None,
        reg: Registry | None = None,
    ) -> None:
        items = plugins.values() if isinstance(plugins, Mapping) else plugins
        self._plugins: dict[str, Plugin] = {p.name: p for p in items}
        self._pool = pool
        self._settings = settings or RuntimeSettings()
        self._warn = warn
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
        if self._warn is not None:
            self._warn(message)

    def create(self, type_name: str, name: str | None = None, params: Any = None) -> Any:
        """Create a registered plugin (``params`` as they would appear in YAML) and keep it by name."""
        spec = self._registry.get(type_name)
        name = name or type_name
        plugin = spec.factory(name, params, self)
        self._plugins[name] = plugin
        return plugin


def logging_warn(message: str) -> None:
    log.warning("%s", message)

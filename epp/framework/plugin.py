"""The base every plugin derives from, and the handle a factory receives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from epp.framework.params import NoParams, decode_params

if TYPE_CHECKING:
    from epp.datalayer.pool import EndpointPool

P = TypeVar("P", bound="Plugin")


class Handle(Protocol):
    """What a plugin factory may use while the configuration is being built.

    Plugins are created in the order they appear in the config, so ``plugin()`` only sees
    plugins listed earlier; anything needing a later plugin should look it up in
    ``start()`` (called once every plugin exists).
    """

    def plugin(self, name: str) -> "Plugin":
        """A configured plugin by name; KeyError if there is none."""
        ...

    def plugins(self) -> "list[Plugin]":
        """Every configured plugin, in config order."""
        ...

    @property
    def pool(self) -> "EndpointPool | None":
        """The live endpoint pool (None in `epp check-config`)."""
        ...

    @property
    def settings(self) -> "RuntimeSettings":
        ...

    def warn(self, message: str) -> None:
        """Report a configuration warning (e.g. an unknown parameter)."""
        ...


class RuntimeSettings:
    """Process-wide settings that come from flags, not from the plugin config."""

    __slots__ = ("refresh_metrics_interval", "metrics_staleness_threshold", "pool_name", "pool_namespace")

    def __init__(
        self,
        refresh_metrics_interval: float = 0.05,
        metrics_staleness_threshold: float = 2.0,
        pool_name: str = "",
        pool_namespace: str = "default",
    ) -> None:
        self.refresh_metrics_interval = refresh_metrics_interval
        self.metrics_staleness_threshold = metrics_staleness_threshold
        self.pool_name = pool_name
        self.pool_namespace = pool_namespace


class Plugin:
    """Base class of every plugin.

    A plugin is identified by its registered ``plugin_type`` (e.g. ``queue-scorer``) and the
    instance ``name`` given in the config (defaults to the type). Its parameters are a
    dataclass, ``Params``; the registry decodes the raw YAML into it before construction.

    A plugin may implement several extension points by inheriting several interfaces,
    e.g. ``class UtilizationDetector(SaturationDetector, Filter)``.
    """

    plugin_type: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init__(self, name: str | None = None, params: Any = None) -> None:
        self.name = name or self.plugin_type or type(self).__name__
        self.params = params if params is not None else decode_params(self.Params, None)

    @classmethod
    def create(cls: type[P], name: str, params: Any, handle: Handle) -> P:
        """Factory used by the config loader; override to use the handle."""
        return cls(name, params)

    async def start(self, handle: Handle) -> None:
        """Called once when the EPP starts serving, after every plugin was created."""

    async def close(self) -> None:
        """Release resources (sessions, tasks). Called on shutdown and on config reload."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.plugin_type}/{self.name}>"

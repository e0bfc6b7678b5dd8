"""Maps plugin type names to factories.

Built-in plugins register themselves when ``plugins`` is imported. Third-party packages
register through the entry-point group ``epp.plugins``: the entry point may name a module
(importing it registers its plugins with ``@register``) or a callable taking the registry.

    [project.entry-points."epp.plugins"]
    my-plugins = "my_package.epp_plugins"
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from epp.framework.params import decode_params

if TYPE_CHECKING:
    from epp.framework.plugin import Handle, Plugin

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "epp.plugins"

Factory = Callable[[str, Any, "Handle"], "Plugin"]
C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class PluginSpec:
    type_name: str
    factory: Factory
    cls: type | None = None
    params: type | None = None
    aliases: tuple[str, ...] = ()
    source: str = "builtin"


@dataclass
class Registry:
    _specs: dict[str, PluginSpec] = field(default_factory=dict)
    _default_producers: dict[str, str] = field(default_factory=dict)
    _entry_point_errors: dict[str, str] = field(default_factory=dict)
    _loaded: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(
        self,
        type_name: str,
        factory: Factory,
        *,
        cls: type | None = None,
        params: type | None = None,
        aliases: tuple[str, ...] = (),
        source: str = "builtin",
    ) -> None:
        spec = PluginSpec(type_name, factory, cls, params, tuple(aliases), source)
        for name in (type_name, *aliases):
            existing = self._specs.get(name)
            if existing is not None and existing.factory is not factory and existing.cls is not cls:
                raise ValueError(f"plugin type '{name}' is already registered by {existing.source}")
            self._specs[name] = spec

    def register_class(self, cls: C, type_name: str, *, aliases: tuple[str, ...] = (), source: str = "builtin") -> C:
        """Register a Plugin subclass: its ``Params`` are decoded before ``create`` is called."""
        params_cls = getattr(cls, "Params", None)

        def factory(name: str, raw: Any, handle: "Handle") -> "Plugin":
            params = decode_params(params_cls, raw, handle.warn) if params_cls else raw
            return cls.create(name, params, handle)  # type: ignore[attr-defined]

        if not getattr(cls, "plugin_type", ""):
            cls.plugin_type = type_name  # type: ignore[attr-defined]
        self.register(type_name, factory, cls=cls, params=params_cls, aliases=aliases, source=source)
        return cls

    def register_default_producer(self, data_key: str, type_name: str) -> None:
        """Declare which producer type is auto-created when a consumer needs ``data_key``."""
        self._default_producers[data_key] = type_name

    def default_producer(self, data_key: str) -> str | None:
        return self._default_producers.get(data_key)

    def get(self, type_name: str) -> PluginSpec:
        self.load()
        return self._specs[type_name]

    def __contains__(self, type_name: object) -> bool:
        self.load()
        return type_name in self._specs

    def known_types(self) -> list[str]:
        self.load()
        return sorted(self._specs)

    def entry_point_errors(self) -> dict[str, str]:
        return dict(self._entry_point_errors)

    def load(self) -> None:
        """Import built-ins and third-party entry points (once)."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            importlib.import_module("plugins")
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, (ModuleType, type)):
                    obj(self)
            except Exception as e:  # a broken third-party package must not take the EPP down
                self._entry_point_errors[ep.name] = f"{type(e).__name__}: {e}"
                log.warning("failed to load plugin entry point %r (%s): %s", ep.name, ep.value, e)


registry = Registry()


def register(type_name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[C], C]:
    """Class decorator registering a plugin type in the default registry.

    Third-party modules loaded through the entry point use it the same way.
    """

    def deco(cls: C) -> C:
        module = getattr(cls, "__module__", "")
        source = "builtin" if module.startswith("plugins") else module
        return registry.register_class(cls, type_name, aliases=aliases, source=source)

    return deco

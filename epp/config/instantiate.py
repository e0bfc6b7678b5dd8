"""Creating plugin objects from their config entries, with the Handle factories see."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from epp.config.errors import Problems
from epp.config.schema import PluginEntry, join
from epp.framework.params import ParameterError
from epp.framework.plugin import Plugin, RuntimeSettings
from epp.framework.registry import Registry

if TYPE_CHECKING:
    from epp.datalayer.pool import EndpointPool


class PluginSet:
    """The plugins of one load, by name in config order, plus the Handle given to factories."""

    def __init__(
        self, registry: Registry, problems: Problems, settings: RuntimeSettings, pool: "EndpointPool | None"
    ) -> None:
        self.registry = registry
        self.problems = problems
        self.settings = settings
        self.pool = pool
        self.by_name: dict[str, Plugin] = {}
        self.entries: dict[str, PluginEntry] = {}

    # -- Handle protocol (shared by every factory; see _EntryHandle for per-plugin warnings)

    def plugin(self, name: str) -> Plugin:
        return self.by_name[name]

    def plugins(self) -> list[Plugin]:
        return list(self.by_name.values())

    def warn(self, message: str) -> None:
        self.problems.warn("", message)

    # -- creation

    def create(self, entry: PluginEntry) -> Plugin | None:
        """Instantiate ``entry`` through the registry; record a path-named error on failure."""
        where, lead = (
            ("plugins", f"cannot add the default plugin '{entry.type}' (needed because {entry.added_because}): ")
            if entry.added_because
            else (entry.path, "")
        )
        if entry.type not in self.registry:
            self.problems.error(where, lead + self._unregistered(entry.type, suggest=not entry.added_because))
            return None
        spec = self.registry.get(entry.type)
        handle = _EntryHandle(self, entry)
        try:
            plugin = spec.factory(entry.name, entry.parameters, handle)
        except ParameterError as e:
            path = join(entry.path, "parameters") + (("." + e.key) if e.key and not e.key.startswith("[") else e.key)
            self.problems.error(path, f"{e.message} (plugin '{entry.name}', type '{entry.type}')")
            return None
        except Exception as e:  # a plugin's own validation: report it, never crash the loader
            detail = str(e) or type(e).__name__
            self.problems.error(where, f"{lead}failed to create {entry.label()}: {detail}")
            return None
        if not isinstance(plugin, Plugin):
            self.problems.error(where, f"{lead}the factory of type '{entry.type}' returned {type(plugin).__name__}, not a Plugin")
            return None
        if plugin.name != entry.name:
            plugin.name = entry.name  # the config name is what every reference and metric uses
        self.by_name[entry.name] = plugin
        self.entries[entry.name] = entry
        return plugin

    def _unregistered(self, type_name: str, *, suggest: bool) -> str:
        known = self.registry.known_types()
        msg = f"plugin type '{type_name}' is not registered"
        close = difflib.get_close_matches(type_name, known, n=1, cutoff=0.75) if suggest else []
        if close:
            msg += f" (did you mean '{close[0]}'?)"
        msg += "; known types: " + (", ".join(known) if known else "none")
        failed = self.registry.entry_point_errors()
        if failed:
            msg += "; plugin packages that failed to load: " + ", ".join(f"{k} ({v})" for k, v in sorted(failed.items()))
        return msg


class _EntryHandle:
    """The Handle one factory receives: warnings are attributed to its plugin entry."""

    def __init__(self, owner: PluginSet, entry: PluginEntry) -> None:
        self._owner = owner
        self._entry = entry

    def plugin(self, name: str) -> Plugin:
        return self._owner.plugin(name)

    def plugins(self) -> list[Plugin]:
        return self._owner.plugins()

    @property
    def pool(self) -> "EndpointPool | None":
        return self._owner.pool

    @property
    def settings(self) -> RuntimeSettings:
        return self._owner.settings

    def warn(self, message: str) -> None:
        self._owner.problems.warn(self._entry.path, f"{self._entry.label()}: {message}")

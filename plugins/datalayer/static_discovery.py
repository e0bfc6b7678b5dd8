"""``static-discovery``: the flag/file discovery as a plugin, for ``discovery: {pluginRef}``.

Same behaviour as ``--endpoint`` / ``--endpoints-file`` (see ``epp.discovery.static``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.discovery.static import DiscoveryError, StaticDiscovery, parse_endpoint_flag
from epp.framework import Duration, register
from epp.framework.plugin import Handle


@dataclass
class StaticDiscoveryParams:
    endpoints: list[str] = field(default_factory=list)
    endpointsFile: str = ""
    pollInterval: Duration = Duration(0.25)

    def validate(self) -> None:
        for i, e in enumerate(self.endpoints):
            try:
                parse_endpoint_flag(e)
            except DiscoveryError as err:
                raise ValueError(f"endpoints[{i}]: {err}") from None
        if not self.endpoints and not self.endpointsFile:
            raise ValueError("give 'endpoints' and/or 'endpointsFile'")
        if self.pollInterval <= 0:
            raise ValueError("'pollInterval' must be > 0")


@register("static-discovery")
class StaticDiscoveryPlugin(StaticDiscovery):
    Params = StaticDiscoveryParams

    @classmethod
    def create(cls, name: str, params: StaticDiscoveryParams, handle: Handle) -> "StaticDiscoveryPlugin":
        return cls(params.endpoints, params.endpointsFile or None, poll_interval=float(params.pollInterval), name=name,
                   params=params)

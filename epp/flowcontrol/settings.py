"""The flow-control configuration with every default applied and every plugin resolved.

Built by the config loader from the ``flowControl:`` section (``epp.config``), consumed by the
controller. Limits of 0 mean "unlimited" globally; per-band limits are always bounded
(upstream: 0 or unset = the default, 1 GB and 5000 requests).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from epp.framework.flowcontrol import FairnessPolicy, OrderingPolicy, UsageLimitPolicy
from epp.framework.requestcontrol import SaturationDetector

DEFAULT_BAND_MAX_BYTES = 1_000_000_000
DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_REQUEST_TTL = 60.0
# Idle flows and dynamically provisioned bands are forgotten after these (upstream's values).
FLOW_GC_AFTER = 300.0
BAND_GC_AFTER = 600.0


@dataclass(frozen=True)
class BandSettings:
    """One priority band (or, with ``priority`` None, a template for unlisted priorities)."""

    priority: int | None
    fairness: FairnessPolicy
    ordering: OrderingPolicy
    max_bytes: int = DEFAULT_BAND_MAX_BYTES
    max_requests: int = DEFAULT_BAND_MAX_REQUESTS

    def at(self, priority: int) -> "BandSettings":
        return replace(self, priority=priority)


@dataclass(frozen=True)
class FlowControlSettings:
    detector: SaturationDetector
    usage_limit: UsageLimitPolicy
    default_band: BandSettings
    negative_band: BandSettings | None = None  # None: negative priorities use default_band
    bands: tuple[BandSettings, ...] = ()
    max_bytes: int = 0  # global; 0 = unlimited
    max_requests: int = 0
    default_ttl: float = DEFAULT_REQUEST_TTL  # 0 = never expire
    no_endpoint_ttl: float = DEFAULT_REQUEST_TTL  # the budget while the pool has no endpoints
    enable_eviction: bool = False  # accepted for compatibility; in-flight eviction is not implemented

    def template_for(self, priority: int) -> BandSettings:
        """The band a priority nobody configured gets (dynamic provisioning)."""
        template = self.negative_band if priority < 0 and self.negative_band is not None else self.default_band
        return template.at(priority)

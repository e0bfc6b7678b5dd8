"""Flow control: queue requests while the pool is saturated, release them by priority band,
fairness between tenants and per-tenant ordering (upstream's ``flowControl`` feature gate).

See README.md in this folder for the design; the policies are plugins in
``plugins/flowcontrol/`` behind the interfaces of ``epp.framework.flowcontrol``.
"""

from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.outcomes import DROPPED_REASON_HEADER, Outcome
from epp.flowcontrol.queue import FlowItem
from epp.flowcontrol.saturation import DispatchLedger
from epp.flowcontrol.settings import BandSettings, FlowControlSettings

__all__ = ["DROPPED_REASON_HEADER", "BandSettings", "DispatchLedger", "FlowControlSettings", "FlowController",
           "FlowItem", "Outcome"]

"""Flow-control extension points: how queued requests are ordered, shared and gated.

Flow control (``featureGates: [flowControl]``) holds requests in the EPP while the pool is
saturated and releases them in three tiers, as upstream does:

1. **Priority band** (strict, highest priority first), gated by a ``UsageLimitPolicy``: a band
   may dispatch only while the pool's saturation is below its ceiling.
2. **Fairness** between the flows (fairness ids) of one band: a ``FairnessPolicy`` picks the
   flow queue to serve next.
3. **Ordering** inside one flow's queue: an ``OrderingPolicy`` gives each request a sort key;
   the smallest key is served first.

The controller (``epp.flowcontrol``) owns the queues; policies only read them through the
small views below, so a policy cannot corrupt queue state. All calls happen on the event
loop and must be cheap (no I/O): they run for every dispatch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Protocol, Sequence

from epp.framework.plugin import Plugin
from epp.framework.types import InferenceRequest


class FlowKey(NamedTuple):
    """A flow: all requests of one fairness id at one priority."""

    id: str
    priority: int


class QueueItem(Protocol):
    """What policies may read about one queued request."""

    @property
    def request(self) -> InferenceRequest: ...

    @property
    def key(self) -> FlowKey: ...

    @property
    def byte_size(self) -> int: ...

    @property
    def enqueued_at(self) -> float:
        """Monotonic seconds (``epp.datalayer.endpoint.now`` clock) when the request was queued."""

    @property
    def ttl(self) -> float | None:
        """The queue-wait budget in seconds the request was queued with (None = no expiry)."""

    @property
    def order(self) -> Any:
        """The key the band's ordering policy gave this item."""

    @property
    def seq(self) -> int:
        """Arrival number: breaks ties between equal ``order`` keys (first come first)."""


class FlowQueue(Protocol):
    """One flow's queue as a fairness policy sees it (never empty when offered to a policy)."""

    @property
    def key(self) -> FlowKey: ...

    def __len__(self) -> int: ...

    @property
    def byte_size(self) -> int: ...

    def peek(self) -> QueueItem:
        """The item the band's ordering policy would serve next."""


class Band(Protocol):
    """One priority band as a fairness policy sees it."""

    @property
    def priority(self) -> int: ...

    def flows(self) -> Sequence[FlowQueue]:
        """The non-empty flow queues, sorted by fairness id."""

    @property
    def ordering(self) -> "OrderingPolicy": ...


class OrderingPolicy(Plugin, ABC):
    """Orders the requests inside one flow queue."""

    @abstractmethod
    def sort_key(self, item: QueueItem) -> Any:
        """A comparable key computed once when the item is queued; the smallest is served first.

        Keys of different flows of the same band are compared too (global-strict fairness
        picks the best head across flows), so a key must mean the same in every flow.
        Ties are broken by arrival order.
        """


class FairnessPolicy(Plugin, ABC):
    """Picks which flow of a band is served next."""

    def new_state(self) -> Any:
        """Per-band state (a band keeps it and passes it back to ``pick``); None if stateless."""
        return None

    @abstractmethod
    def pick(self, band: Band, state: Any) -> FlowQueue | None:
        """The flow queue to dispatch from, or None to skip the band this cycle."""


class UsageLimitPolicy(Plugin, ABC):
    """Per-band dispatch ceilings: a band may dispatch while saturation < its ceiling."""

    @abstractmethod
    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        """One ceiling in [0, 1] per priority; ``priorities`` are ordered highest first."""


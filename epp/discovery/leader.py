"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does it.

Several EPP replicas serve one pool; the holder of the Lease ``epp-<namespace>-<pool>.llm-d.ai``
(upstream's name) is the leader and the only one whose readiness is SERVING, so the Gateway
sends traffic to it. Standbys keep discovering endpoints, so a stray request is still routed.

Every ``retry_period`` a replica reads the Lease and:

- creates it if there is none (it becomes the leader);
- renews it if it holds it (``renewTime``), with the resourceVersion it read, so two
  writers cannot both succeed (the API server answers 409 Conflict to the slower one);
- takes it over when the holder is empty (released) or has not renewed it for
  ``leaseDurationSeconds`` as measured on *our* clock since we last saw it change (clock
  skew between nodes does not matter, as in client-go);
- otherwise stays a standby.

A leader that cannot renew within ``renew_deadline`` steps down (readiness NOT_SERVING) and
keeps trying; upstream's controller-runtime exits the process instead. ``release()``
(SIGTERM) empties the holder at once so a standby takes over without waiting for expiry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

from epp.discovery import resources as R
from epp.discovery.kubeclient import KubeApiError, KubeClient, Obj
from epp.observability import metrics as m

log = logging.getLogger(__name__)


def lease_name(namespace: str, pool: str) -> str:
    return f"epp-{namespace}-{pool}.llm-d.ai"


def deployment_name(pod_name: str) -> str:
    """``vllm-epp-7d9f8c6b5-x2k4q`` -> ``vllm-epp``: standalone mode names the Lease after the
    EPP's Deployment, found from ``$POD_NAME`` as upstream does. Raises ValueError."""
    parts = pod_name.split("-")
    if len(parts) < 3 or not all(parts[-2:]) or not parts[0]:
        raise ValueError(f"cannot tell the Deployment from pod name {pod_name!r} (expected <deployment>-<hash>-<id>)")
    return "-".join(parts[:-2])


def default_identity() -> str:
    """``<pod name or host name>_<uuid>``, controller-runtime's form."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4()}"


def _micro_time(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, client: KubeClient, namespace: str, name: str, *, identity: str | None = None,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_change = on_change
        self.is_leader = False
        self.holder = ""  # the holder we last saw
        self.transitions = 0
        self._observed: tuple[Any, ...] | None = None  # the holder record we last saw ...
        self._observed_at = 0.0  # ... and when it last changed, on our monotonic clock
        self._renewed_at = 0.0  # our last successful acquire/renew (monotonic)
        self._released = False
        self._failing = False  # logged once per run of failures
        m.LEADER.set(0)

    def status(self) -> dict[str, Any]:
        return {"lease": f"{self.namespace}/{self.name}", "identity": self.identity, "leader": self.is_leader,
                "holder": self.holder, "transitions": self.transitions}

    async def run(self) -> None:
        while not self._released:
            try:
                await self.try_acquire_or_renew()
                if self._failing:
                    log.info("leader election: Lease %s/%s reachable again", self.namespace, self.name)
                    self._failing = False
            except asyncio.CancelledError:
                raise
            except KubeApiError as e:
                (log.debug if self._failing else log.warning)(
                    "leader election: cannot read or write Lease %s/%s: %s", self.namespace, self.name, e)
                self._failing = True
            except Exception:
                log.exception("leader election: unexpected failure")
            if self.is_leader and time.monotonic() - self._renewed_at > self.renew_deadline:
                log.error("leader election: could not renew Lease %s/%s within %.1fs; stepping down",
                          self.namespace, self.name, self.renew_deadline)
                self._set_leader(False)
            await asyncio.sleep(self.retry_period)

    async def try_acquire_or_renew(self) -> bool:
        now = time.monotonic()
        lease = await self.client.get(R.LEASES, self.namespace, self.name)
        if lease is None:
            try:
                await self.client.create(R.LEASES, self.namespace, self._lease_object(None, acquire=True))
            except KubeApiError as e:
                if e.code == 409:  # another replica created it first
                    return False
                raise
            self._won(now, new=True)
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("acquireTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        self.holder = holder
        self.transitions = int(spec.get("leaseTransitions") or 0)
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and now < self._observed_at + duration:
            if self.is_leader:
                log.warning("leader election: Lease %s/%s is held by %s; stepping down", self.namespace,
                            self.name, holder)
                self._set_leader(False)
            return False
        try:
            await self.client.replace(R.LEASES, self.namespace, self.name,
                                      self._lease_object(lease, acquire=holder != self.identity))
        except KubeApiError as e:
            if e.code == 409:  # someone else wrote it since we read it: look again next round
                return False
            raise
        self._won(now, new=holder != self.identity)
        return True

    def _lease_object(self, current: Obj | None, *, acquire: bool) -> Obj:
        spec = dict((current or {}).get("spec") or {})
        now = _micro_time()
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=max(1, round(self.lease_duration)),
                    renewTime=now)
        if acquire:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if current is not None else 0)
        meta: Obj = {"name": self.name, "namespace": self.namespace}
        if current is not None:
            meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        return {"apiVersion": R.LEASES.api_version, "kind": R.LEASES.kind, "metadata": meta, "spec": spec}

    def _won(self, now: float, *, new: bool) -> None:
        self._renewed_at = now
        self.holder = self.identity
        if new or not self.is_leader:
            log.info("leader election: %s acquired Lease %s/%s; this replica is the leader", self.identity,
                     self.namespace, self.name)
        self._set_leader(True)

    def _set_leader(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            m.LEADER.set(1 if leader else 0)
            if self.on_change is not None:
                self.on_change(leader)

    async def release(self) -> None:
        """Give the Lease up now (SIGTERM): a standby takes over at its next retry."""
        self._released = True
        if not self.is_leader:
            return
        self._set_leader(False)
        try:
            lease = await self.client.get(R.LEASES, self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            obj = self._lease_object(lease, acquire=False)
            obj["spec"].update(holderIdentity="", leaseDurationSeconds=1)
            await self.client.replace(R.LEASES, self.namespace, self.name, obj)
            log.info("leader election: released Lease %s/%s", self.namespace, self.name)
        except KubeApiError as e:
            log.warning("leader election: could not release Lease %s/%s (%s); it expires in %.0fs", self.namespace,
                        self.name, e, self.lease_duration)

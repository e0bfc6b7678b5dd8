"""InferenceObjective and InferenceModelRewrite objects -> the Director's priorities and rewrites.

As upstream (``pkg/epp/server/controller_config.go``, ``pkg/epp/datastore``):

- API discovery at startup picks, per kind, ``llm-d.ai/v1alpha2`` if the server serves it,
  else the legacy ``inference.networking.x-k8s.io/v1alpha2``; with both installed it warns
  and ignores the legacy objects; with neither it skips that kind.
- Only objects in the pool's namespace whose ``spec.poolRef`` names this EPP's pool (name,
  and group defaulting to ``inference.networking.k8s.io``) count.
- InferenceObjective: the request header ``x-llm-d-inference-objective`` (legacy
  ``x-gateway-inference-objective``) names an object by ``metadata.name``; its
  ``spec.priority`` (default 0, negative = sheddable) is the request's priority.
- InferenceModelRewrite: ``spec.rules[]`` with ``matches[].model{type: Exact, value}`` (no
  matches = every model) and weighted ``targets[]{modelRewrite, weight}``; an exact match wins
  over a generic rule, then the oldest object, then the first rule.

The result is applied whole on every change (a handful of objects: recomputing is cheaper
than bookkeeping) as the Director's ``ClusterObjects``, which win over the config's
``inferenceObjectives`` / ``modelRewrites`` on a clash; while the pool is gone nothing
applies, as upstream's ``Clear()``; when it returns the cached objects apply again.

Rewrites are keyed by the object's name (the ``model_rewrite_name`` metric label, as
upstream); an object whose rules win for several models gets ``<name>/<model>`` keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, Mapping

from epp.config.model import ModelRewrite, ModelRewriteTarget
from epp.discovery import resources as R
from epp.discovery.informer import Informer
from epp.discovery.kubeclient import KubeApiError, KubeClient, Obj
from epp.discovery.resources import ResourceType
from epp.requestcontrol.director import ClusterObjects
from epp.requestcontrol.rewrite import ANY_MODEL

log = logging.getLogger(__name__)

Targets = tuple[ModelRewriteTarget, ...]


def _refers_to(obj: Obj, pool_name: str, pool_group: str) -> bool:
    ref = (obj.get("spec") or {}).get("poolRef") or {}
    return ref.get("name") == pool_name and (ref.get("group") or R.POOL_GROUP) == pool_group \
        and (ref.get("kind") or "InferencePool") == "InferencePool"


def objective_priorities(objects: Mapping[str, Obj], pool_name: str, pool_group: str) -> dict[str, int]:
    out = {}
    for name, obj in objects.items():
        if not _refers_to(obj, pool_name, pool_group):
            continue
        priority = (obj.get("spec") or {}).get("priority")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            log.error("InferenceObjective %s: spec.priority %r is not an integer; ignored", name, priority)
            continue
        out[name] = int(priority or 0)
    return out


def rewrite_rules(objects: Mapping[str, Obj], pool_name: str, pool_group: str) -> dict[str, ModelRewrite]:
    """Rule key -> rewrite, precedence applied: exact matches, then one generic rule (match
    ``ANY_MODEL``); among candidates for the same model, the oldest object, then its first rule."""
    ordered = sorted((o for o in objects.values() if _refers_to(o, pool_name, pool_group)),
                     key=lambda o: ((o.get("metadata") or {}).get("creationTimestamp") or "",
                                    (o.get("metadata") or {}).get("name") or ""))
    winners: dict[str, tuple[str, Targets]] = {}  # model (ANY_MODEL for generic) -> (object, targets)
    for obj in ordered:
        name = (obj.get("metadata") or {}).get("name", "")
        for i, rule in enumerate((obj.get("spec") or {}).get("rules") or []):
            targets = _targets(rule, f"InferenceModelRewrite {name}: spec.rules[{i}]")
            if targets is None:
                continue
            models = [str(model["value"]) for match in rule.get("matches") or []
                      if (model := (match or {}).get("model") or {}).get("value")
                      and (model.get("type") or "Exact") == "Exact"]
            for model in models or [ANY_MODEL]:
                winners.setdefault(model, (name, targets))
    per_object: dict[str, int] = {}
    for owner, _ in winners.values():
        per_object[owner] = per_object.get(owner, 0) + 1
    return {(owner if per_object[owner] == 1 else f"{owner}/{model or '*'}"): ModelRewrite(model, targets)
            for model, (owner, targets) in winners.items()}


def _targets(rule: Obj, where: str) -> Targets | None:
    raw = rule.get("targets") or []
    weights = [t.get("weight") for t in raw if isinstance(t, dict)]
    if not raw or len(weights) != len(raw) or any(not t.get("modelRewrite") for t in raw):
        log.error("%s: every target needs a modelRewrite; rule ignored", where)
        return None
    if any(w is not None for w in weights) and any(w is None for w in weights):
        log.error("%s: weights must be given for all targets or none; rule ignored", where)
        return None
    return tuple(ModelRewriteTarget(str(t["modelRewrite"]), int(t.get("weight") or 1)) for t in raw)


class _Recompute:
    """Informer handler that recomputes everything from the informer's cache on any change."""

    def __init__(self, apply: Callable[[], None]) -> None:
        self._apply = apply

    def replaced(self, objects: dict[str, Obj]) -> None:
        self._apply()

    def changed(self, name: str, obj: Obj | None) -> None:
        self._apply()


class CrdSync:
    def __init__(self, client: KubeClient, namespace: str, pool_name: str, pool_group: str, *,
                 apply: Callable[[ClusterObjects], None], **informer_kw: Any) -> None:
        self.client = client
        self.namespace = namespace
        self.pool_name = pool_name
        self.pool_group = pool_group
        self._apply_to = apply  # Director.set_cluster_objects
        self._informer_kw = informer_kw
        self.informers: dict[str, Informer] = {}
        self.pool_present = False
        self.groups: dict[str, str] = {}  # kind -> the group in use
        self.discovered = False  # API discovery done (informers started for what is served)

    def pool_changed(self, spec: Any) -> None:
        """KubernetesDiscovery listener: the pool appeared (spec) or went away (None)."""
        present = spec is not None
        if present != self.pool_present:
            self.pool_present = present
            self._apply()

    async def run(self) -> None:
        chosen = [(kind, rtype) for kind, options in (("InferenceObjective", R.OBJECTIVES),
                                                      ("InferenceModelRewrite", R.REWRITES))
                  if (rtype := await self._discover(kind, options)) is not None]
        tasks = []
        for kind, rtype in chosen:
            informer = Informer(self.client, rtype, self.namespace, _Recompute(self._apply), **self._informer_kw)
            self.informers[kind] = informer
            tasks.append(asyncio.create_task(informer.run(), name=f"kubernetes-{rtype.plural}"))
        self.discovered = True
        try:
            await asyncio.Event().wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _discover(self, kind: str, options: tuple[ResourceType, ...]) -> ResourceType | None:
        """The preferred served group for ``kind``; retried with backoff while the API is away."""
        delay = 0.5
        while True:
            try:
                served = [rtype for rtype in options if await self.client.served(rtype)]
                break
            except KubeApiError as e:
                log.warning("kubernetes: API discovery for %s failed (%s); retrying in %.1fs", kind, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        if not served:
            log.info("kubernetes: no %s CRD is installed (%s); skipping it", kind,
                     " or ".join(r.group for r in options))
            return None
        if len(served) > 1:
            log.warning("kubernetes: both %s and the legacy %s %s CRDs are installed; using %s and ignoring the "
                        "legacy objects", served[0].group, served[1].group, kind, served[0].group)
        self.groups[kind] = served[0].group
        log.info("kubernetes: watching %s in %s (%s)", kind, self.namespace, served[0].api_version)
        return served[0]

    def _cache(self, kind: str) -> dict[str, Obj]:
        informer = self.informers.get(kind)
        return informer.cache if informer is not None and self.pool_present else {}

    def objects(self) -> ClusterObjects:
        return ClusterObjects(
            objectives=objective_priorities(self._cache("InferenceObjective"), self.pool_name, self.pool_group),
            rewrites=rewrite_rules(self._cache("InferenceModelRewrite"), self.pool_name, self.pool_group))

    def _apply(self) -> None:
        self._apply_to(self.objects())

    def status(self) -> dict[str, Any]:
        return {"groups": dict(self.groups), "watches": [i.status() for i in self.informers.values()]}

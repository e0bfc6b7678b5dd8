"""InferenceObjective and InferenceModelRewrite objects: API-discovery group fallback, poolRef
filtering, rewrite precedence, and the Director using them."""

from __future__ import annotations

import asyncio
import random

import pytest
from kube_helpers import start_api, wait_until

from epp.bench.kubeapi import KubeStore
from epp.config.model import ModelRewrite, ModelRewriteTarget
from epp.discovery import resources as R
from epp.discovery.crds import CrdSync, objective_priorities, rewrite_rules
from epp.requestcontrol.director import ClusterObjects
from epp.requestcontrol.rewrite import ANY_MODEL, ModelRewriter

NS = "default"
LLMD_OBJ, LEGACY_OBJ = R.OBJECTIVES
LLMD_RW, LEGACY_RW = R.REWRITES


def objective(name: str, priority: int | None, pool: str = "p", group: str | None = None) -> dict:
    ref = {"name": pool, **({"group": group} if group else {})}
    spec = {"poolRef": ref, **({"priority": priority} if priority is not None else {})}
    return {"metadata": {"name": name, "namespace": NS}, "spec": spec}


def rewrite(name: str, rules: list, pool: str = "p", created: str = "2026-01-01T00:00:00Z") -> dict:
    return {"metadata": {"name": name, "namespace": NS, "creationTimestamp": created},
            "spec": {"poolRef": {"name": pool}, "rules": rules}}


def rule(models: list[str], *targets: tuple[str, int | None]) -> dict:
    return {"matches": [{"model": {"value": m}} for m in models],
            "targets": [{"modelRewrite": t, **({"weight": w} if w is not None else {})} for t, w in targets]}


def test_objectives_are_filtered_by_pool_ref():
    objs = {o["metadata"]["name"]: o for o in (
        objective("batch", -1), objective("chat", None), objective("other-pool", 5, pool="q"),
        objective("other-group", 5, group="example.com"), objective("explicit", 2, group=R.POOL_GROUP))}
    assert objective_priorities(objs, "p", R.POOL_GROUP) == {"batch": -1, "chat": 0, "explicit": 2}


def test_rewrite_precedence_exact_then_oldest_then_first_rule():
    objs = {
        "young": rewrite("young", [rule(["m"], ("from-young", None)), rule(["y"], ("y1", 2), ("y2", 1))],
                         created="2026-02-01T00:00:00Z"),
        "old": rewrite("old", [rule([], ("generic-old", None)), rule(["m"], ("from-old", None)),
                               rule(["m"], ("second-rule", None))], created="2026-01-01T00:00:00Z"),
        "generic-young": rewrite("generic-young", [rule([], ("generic-young", None))], created="2026-03-01T00:00:00Z"),
        "elsewhere": rewrite("elsewhere", [rule(["m"], ("not-ours", None))], pool="q"),
        "bad": rewrite("bad", [rule(["x"], ("a", 1), ("b", None))]),  # weights all-or-none
    }
    rules = rewrite_rules(objs, "p", R.POOL_GROUP)
    assert rules == {
        "old/m": ModelRewrite("m", (ModelRewriteTarget("from-old", 1),)),  # two models won by "old": keyed per model
        "old/*": ModelRewrite(ANY_MODEL, (ModelRewriteTarget("generic-old", 1),)),
        "young": ModelRewrite("y", (ModelRewriteTarget("y1", 2), ModelRewriteTarget("y2", 1))),
    }


def test_rewriter_config_and_cluster_rules():
    config = {"cfg": ModelRewrite("c", (ModelRewriteTarget("from-config", 1),)),
              "cfg-m": ModelRewrite("m", (ModelRewriteTarget("config-m", 1),))}
    cluster = {"crd": ModelRewrite("m", (ModelRewriteTarget("crd-m", 1),)),
               "generic": ModelRewrite(ANY_MODEL, (ModelRewriteTarget("any", 1),))}
    rw = ModelRewriter({**config, **cluster}, random.Random(1))  # as the Director layers them
    assert rw.target("m", {}) == ("crd-m", "crd")  # a cluster rule wins over the config on the same model
    assert rw.target("c", {}) == ("from-config", "cfg")  # an exact rule before a generic one
    assert rw.target("zzz", {}) == ("any", "generic")
    weighted = ModelRewriter({"w": ModelRewrite("w", (ModelRewriteTarget("a", 1), ModelRewriteTarget("b", 3)))},
                             random.Random(2))
    picks = [weighted.target("w", {})[0] for _ in range(400)]
    assert 0.6 < picks.count("b") / 400 < 0.9


@pytest.mark.parametrize("installed,expected_group", [
    ((LLMD_OBJ, LLMD_RW, LEGACY_OBJ, LEGACY_RW), R.LLMD_GROUP),  # both: prefer llm-d.ai, ignore legacy
    ((LEGACY_OBJ, LEGACY_RW), R.LEGACY_GROUP),  # only the legacy group
    ((), None),  # neither: skipped
])
async def test_group_fallback_and_live_updates(tmp_path, installed, expected_group):
    store = KubeStore([R.PODS, R.LEASES, *R.INFERENCE_POOLS.values(), *installed])
    for rtype in installed:  # one object in every installed group, to see which is read
        if rtype.kind == "InferenceObjective":
            store.create(rtype, objective(f"from-{rtype.group}", 3))
        else:
            store.create(rtype, rewrite(f"rw-{rtype.group}", [rule(["m"], (f"to-{rtype.group}", None))]))
    api, client = await start_api(tmp_path, store)
    seen: dict = {}

    def apply(objects: ClusterObjects) -> None:
        seen.update(objectives=objects.objectives, rewrites=objects.rewrites)

    sync = CrdSync(client, NS, "p", R.POOL_GROUP, apply=apply, backoff_initial=0.05, backoff_max=0.2)
    sync.pool_changed(object())  # the pool exists
    task = asyncio.create_task(sync.run())
    try:
        if expected_group is None:
            await wait_until(lambda: sync.discovered, what="API discovery")
            assert sync.groups == {} and not sync.informers and not task.done()
            assert seen["objectives"] == {} and seen["rewrites"] == {}
            return
        await wait_until(lambda: seen.get("objectives") == {f"from-{expected_group}": 3}, what="objectives")
        await wait_until(lambda: bool(seen["rewrites"]), what="rewrites")
        assert seen["rewrites"] == {f"rw-{expected_group}": ModelRewrite("m", (ModelRewriteTarget(f"to-{expected_group}", 1),))}
        assert sync.groups == {"InferenceObjective": expected_group, "InferenceModelRewrite": expected_group}
        obj_type = next(t for t in installed if t.group == expected_group and t.kind == "InferenceObjective")
        store.patch(obj_type, NS, f"from-{expected_group}", {"spec": {"priority": -2}})
        store.create(obj_type, objective("late", 1))
        await wait_until(lambda: seen["objectives"] == {f"from-{expected_group}": -2, "late": 1}, what="update")
        sync.pool_changed(None)  # the pool is gone: nothing applies ...
        assert seen["objectives"] == {} and seen["rewrites"] == {}
        sync.pool_changed(object())  # ... and it all comes back with it
        assert seen["objectives"] == {f"from-{expected_group}": -2, "late": 1}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await api.stop()


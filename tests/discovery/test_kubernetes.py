"""Kubernetes discovery against the in-memory API server: pool and standalone modes, watch
resilience (410 Gone, API-server restarts, outages), credentials."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from kube_helpers import start_api, wait_until

from epp.bench.kubeapi import KubeApiServer, KubeStore, inference_pool, pod, ready_patch, write_kubeconfig
from epp.datalayer.pool import EndpointPool
from epp.discovery import resources as R
from epp.discovery.kubeclient import KubeClient, KubeConfigError, load_config
from epp.discovery.kubernetes import KubernetesDiscovery, PoolSpecError, active_ports, parse_pool
from epp.observability.metrics import REGISTRY

NS = "default"
POOL = R.INFERENCE_POOLS[R.POOL_GROUP]
FAST = dict(backoff_initial=0.05, backoff_max=0.2)


def keys(pool: EndpointPool) -> set[str]:
    return {ep.key for ep in pool.endpoints()}


def names(pool: EndpointPool) -> set[str]:
    return {ep.metadata.name for ep in pool.endpoints()}


@contextlib.asynccontextmanager
async def running(tmp_path, store: KubeStore | None = None, *, api_kw=None, **kw):
    api, client = await start_api(tmp_path, store, **(api_kw or {}))
    pool = EndpointPool()
    disc = KubernetesDiscovery(client, NS, **{**FAST, **kw})
    task = asyncio.create_task(disc.run(pool))
    try:
        yield api, disc, pool
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await api.stop()


def _store_with_pool(ports=(8000,), legacy=False) -> KubeStore:
    store = KubeStore()
    group = R.LEGACY_GROUP if legacy else R.POOL_GROUP
    store.create(R.INFERENCE_POOLS[group], inference_pool("p", {"app": "vllm"}, list(ports), legacy=legacy))
    store.create(R.PODS, pod("a", "10.0.0.1", {"app": "vllm", "llm-d.ai/role": "decode"}))
    store.create(R.PODS, pod("b", "10.0.0.2", {"app": "vllm"}, ready=False))
    store.create(R.PODS, pod("other", "10.0.0.9", {"app": "sglang"}))
    return store


async def test_pool_pods_become_rank_endpoints_with_their_labels(tmp_path):
    store = _store_with_pool(ports=(8000, 8001))
    async with running(tmp_path, store, pool_name="p") as (api, disc, pool):
        await wait_until(disc.ready, what="pool ready")
        assert keys(pool) == {"10.0.0.1:8000", "10.0.0.1:8001"}  # b is not Ready, other does not match
        ep = pool.get("10.0.0.1:8001")
        assert (ep.metadata.name, ep.metadata.namespace) == ("a-rank-1", NS)
        assert dict(ep.metadata.labels) == {"app": "vllm", "llm-d.ai/role": "decode"}
        assert pool.name == "p"

        store.patch(R.PODS, NS, "b", ready_patch(True))  # turns Ready
        await wait_until(lambda: "10.0.0.2:8000" in keys(pool), what="b ready")
        store.patch(R.PODS, NS, "a", ready_patch(False))  # turns not Ready
        await wait_until(lambda: "10.0.0.1:8000" not in keys(pool), what="a gone")
        store.patch(R.PODS, NS, "b", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})  # terminating
        await wait_until(lambda: not keys(pool), what="b terminating")
        store.patch(R.PODS, NS, "b", {"metadata": {"deletionTimestamp": None}})
        await wait_until(lambda: len(keys(pool)) == 2, what="b back")
        store.patch(R.PODS, NS, "b", {"metadata": {"labels": {"app": "other"}}})  # leaves the selector
        await wait_until(lambda: not keys(pool), what="b out of the selector")
        store.patch(R.PODS, NS, "b", {"metadata": {"labels": {"app": "vllm"}}})
        await wait_until(lambda: len(keys(pool)) == 2, what="b in the selector again")
        store.delete(R.PODS, NS, "b")
        await wait_until(lambda: not keys(pool), what="b deleted")


async def test_pool_spec_changes_resync_and_deletion_clears(tmp_path):
    store = _store_with_pool()
    async with running(tmp_path, store, pool_name="p") as (api, disc, pool):
        await wait_until(lambda: keys(pool) == {"10.0.0.1:8000"}, what="first sync")
        # targetPorts change: every pod's ranks recomputed
        store.patch(POOL, NS, "p", {"spec": {"targetPorts": [{"number": 9000}, {"number": 9001}]}})
        await wait_until(lambda: keys(pool) == {"10.0.0.1:9000", "10.0.0.1:9001"}, what="new ports")
        assert names(pool) == {"a-rank-0", "a-rank-1"}
        # selector change: the pods of the new selector, none of the old
        store.patch(POOL, NS, "p", {"spec": {"selector": {"matchLabels": {"app": "sglang"}}}})
        await wait_until(lambda: keys(pool) == {"10.0.0.9:9000", "10.0.0.9:9001"}, what="resync on selector")
        # the pool deleted: no endpoints, not ready; recreated: back
        store.delete(POOL, NS, "p")
        await wait_until(lambda: not disc.ready() and not keys(pool), what="pool deleted")
        assert REGISTRY.get_sample_value("epp_kubernetes_inference_pool_present", {"name": "p"}) == 0
        store.create(POOL, inference_pool("p", {"app": "vllm"}, [8000]))
        await wait_until(lambda: disc.ready() and keys(pool) == {"10.0.0.1:8000"}, what="pool back")
        # a pool being deleted (finalizers) counts as gone
        store.patch(POOL, NS, "p", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})
        await wait_until(lambda: not disc.ready() and not keys(pool), what="pool terminating")


async def test_an_app_protocol_without_a_parser_is_not_ready(tmp_path):
    store = _store_with_pool()
    async with running(tmp_path, store, pool_name="p") as (api, disc, pool):
        await wait_until(disc.ready, what="ready")
        store.patch(POOL, NS, "p", {"spec": {"appProtocol": "kubernetes.io/h2c"}})
        await wait_until(lambda: not disc.ready(), what="h2c: NOT_SERVING")
        assert keys(pool) == {"10.0.0.1:8000"}  # the endpoints stay known
        store.patch(POOL, NS, "p", {"spec": {"appProtocol": "http"}})
        await wait_until(disc.ready, what="http again")


async def test_missing_pool_is_not_ready_until_created(tmp_path):
    store = KubeStore()
    store.create(R.PODS, pod("a", "10.0.0.1", {"app": "vllm"}))
    async with running(tmp_path, store, pool_name="p") as (api, disc, pool):
        await wait_until(lambda: disc.pool_informer is not None and disc.pool_informer.synced, what="pool listed")
        assert not disc.ready() and not keys(pool)
        assert disc.status()["pool_present"] is False
        store.create(POOL, inference_pool("p", {"app": "vllm"}, [8000]))
        await wait_until(disc.ready, what="pool created")
        assert keys(pool) == {"10.0.0.1:8000"}


async def test_legacy_v1alpha2_pool(tmp_path):
    store = _store_with_pool(ports=(8002,), legacy=True)
    async with running(tmp_path, store, pool_name="p", pool_group=R.LEGACY_GROUP) as (api, disc, pool):
        await wait_until(lambda: keys(pool) == {"10.0.0.1:8002"}, what="legacy pool")


async def test_active_ports_annotation(tmp_path):
    store = _store_with_pool(ports=(8000, 8001, 8002))
    async with running(tmp_path, store, pool_name="p") as (api, disc, pool):
        await wait_until(lambda: len(keys(pool)) == 3, what="three ranks")
        store.patch(R.PODS, NS, "a", {"metadata": {"annotations": {"llm-d.ai/active-ports": "8002, 8000,9999"}}})
        await wait_until(lambda: names(pool) == {"a-rank-0", "a-rank-2"}, what="inactive rank removed")
        # the legacy key counts only without the new one
        store.patch(R.PODS, NS, "a", {"metadata": {"annotations": {
            "llm-d.ai/active-ports": None, "inference.networking.k8s.io/active-ports": "8001"}}})
        await wait_until(lambda: names(pool) == {"a-rank-1"}, what="legacy annotation")


def test_active_ports_rules():
    def p(ann):
        return {"metadata": {"annotations": ann}}

    assert active_ports(p({}), (1, 2)) == {1, 2}
    assert active_ports(p({"llm-d.ai/active-ports": ""}), (1, 2)) == set()
    assert active_ports(p({"llm-d.ai/active-ports": "2", "inference.networking.k8s.io/active-ports": "1"}), (1, 2)) == {2}


def test_pool_spec_errors_name_the_field():
    with pytest.raises(PoolSpecError, match="spec.selector.matchLabels"):
        parse_pool({"metadata": {"name": "p"}, "spec": {"targetPorts": [{"number": 1}]}}, R.POOL_GROUP)
    with pytest.raises(PoolSpecError, match="spec.targetPorts: 0"):
        parse_pool({"spec": {"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 0}]}}, R.POOL_GROUP)
    with pytest.raises(PoolSpecError, match="spec.targetPortNumber"):
        parse_pool({"spec": {"selector": {"a": "b"}}}, R.LEGACY_GROUP)


async def test_invalid_pool_update_keeps_the_last_good_spec(tmp_path, caplog):
    store = _store_with_pool()
    async with running(tmp_path, store, pool_name="p") as (api, disc, pool):
        await wait_until(lambda: keys(pool) == {"10.0.0.1:8000"}, what="first sync")
        store.patch(POOL, NS, "p", {"spec": {"targetPorts": []}})
        await wait_until(lambda: "distinct ports" in caplog.text, what="error logged")
        assert keys(pool) == {"10.0.0.1:8000"} and disc.ready()


async def test_standalone_selector_and_ports(tmp_path):
    store = KubeStore()
    store.create(R.PODS, pod("a", "10.0.0.1", {"app": "vllm", "tier": "gold"}))
    store.create(R.PODS, pod("b", "10.0.0.2", {"app": "vllm", "tier": "bronze"}))
    async with running(tmp_path, store, endpoint_selector="app=vllm,tier in (gold,silver)",
                       target_ports=(8000, 8001)) as (api, disc, pool):
        await wait_until(disc.ready, what="standalone ready")
        assert keys(pool) == {"10.0.0.1:8000", "10.0.0.1:8001"}
        store.patch(R.PODS, NS, "b", {"metadata": {"labels": {"tier": "silver"}}})
        await wait_until(lambda: len(keys(pool)) == 4, what="b joins")
        assert disc.status()["mode"] == "standalone"


async def test_api_restart_resumes_the_watch_without_losing_updates(tmp_path):
    store = _store_with_pool()
    async with running(tmp_path, store, pool_name="p") as (api, disc, pool):
        await wait_until(lambda: keys(pool) == {"10.0.0.1:8000"}, what="first sync")
        pods = disc.pod_informer
        lists = pods.stats.lists
        await api.stop()  # every watch cut, port closed
        store.patch(R.PODS, NS, "b", ready_patch(True))  # changes while the server is away
        store.delete(R.PODS, NS, "a")
        await wait_until(lambda: not pods.connected, what="outage noticed")
        assert keys(pool) == {"10.0.0.1:8000"}  # last known endpoints kept
        assert disc.status()["connected"] is False
        assert REGISTRY.get_sample_value("epp_kubernetes_watch_connected", {"resource": "pods"}) == 0
        await api.start()
        await wait_until(lambda: keys(pool) == {"10.0.0.2:8000"}, what="updates made during the outage")
        assert pods.connected and pods.stats.lists == lists  # resumed from its resourceVersion, no relist


async def test_410_gone_relists_and_drops_what_vanished(tmp_path):
    store = _store_with_pool()
    async with running(tmp_path, store, pool_name="p") as (api, disc, pool):
        await wait_until(lambda: keys(pool) == {"10.0.0.1:8000"}, what="first sync")
        pods = disc.pod_informer
        await api.stop()
        store.delete(R.PODS, NS, "a")  # a DELETED event that only history had...
        store.patch(R.PODS, NS, "b", ready_patch(True))
        store.compact()  # ...and history is gone: the watch gets 410
        await api.start()
        await wait_until(lambda: keys(pool) == {"10.0.0.2:8000"}, what="relist after 410")
        assert pods.stats.gone >= 1
        assert REGISTRY.get_sample_value("epp_kubernetes_lists_total", {"resource": "pods", "reason": "gone"}) >= 1


async def test_bookmarks_advance_the_resource_version(tmp_path):
    store = _store_with_pool()
    async with running(tmp_path, store, pool_name="p", api_kw={"bookmark_interval": 0.05}) as (api, disc, pool):
        await wait_until(disc.ready, what="ready")
        pods = disc.pod_informer
        store.create(R.LEASES, {"metadata": {"name": "unrelated", "namespace": NS}})  # advances the revision only
        await wait_until(lambda: pods.stats.bookmarks > 0 and pods.resource_version == str(store.revision),
                         what="bookmark")


async def test_wrong_credentials_are_reported_and_retried(tmp_path, caplog):
    store = _store_with_pool()
    api = await KubeApiServer(store, token="right").start()
    client = KubeClient.from_options(write_kubeconfig(tmp_path / "kc", api.url, "wrong"))
    disc = KubernetesDiscovery(client, NS, pool_name="p", **FAST)
    task = asyncio.create_task(disc.run(EndpointPool()))
    try:
        await wait_until(lambda: "401 Unauthorized" in caplog.text, what="401 logged")
        assert not disc.ready() and not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await api.stop()


def test_credentials_come_from_upstreams_sources_in_order(tmp_path, monkeypatch):
    a = write_kubeconfig(tmp_path / "a", "http://127.0.0.1:1", "ta")
    b = write_kubeconfig(tmp_path / "b", "http://127.0.0.1:2", "tb")
    monkeypatch.setenv("KUBECONFIG", f"{b}:{a}")
    assert load_config(a).cluster.server == "http://127.0.0.1:1"  # --kubeconfig first
    assert load_config(None).cluster.server == "http://127.0.0.1:2"  # then $KUBECONFIG (first file)
    monkeypatch.delenv("KUBECONFIG")
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "namespace").write_text("ml")
    (sa / "ca.crt").write_text("")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    cfg = load_config(None, service_account=str(sa))  # then the in-cluster service account
    assert cfg.cluster.server == "https://10.96.0.1:443" and cfg.user.token == "sa-token"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubeConfigError, match="no Kubernetes credentials found; tried"):
        load_config(None, service_account=str(sa))
    (tmp_path / ".kube").mkdir()
    write_kubeconfig(tmp_path / ".kube" / "config", "http://127.0.0.1:3")
    assert load_config(None, service_account=str(sa)).cluster.server == "http://127.0.0.1:3"  # ~/.kube/config
    with pytest.raises(KubeConfigError, match="not found"):
        load_config(str(tmp_path / "missing"))



async def test_a_config_discovery_plugin_and_discovery_flags_are_refused():
    from epp.config.errors import ConfigError
    from epp.options import ServeOptions
    from epp.server import EppServer

    config = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {name: files, type: static-discovery, parameters: {endpoints: ["127.0.0.1:1"]}}
discovery: {pluginRef: files}
"""
    server = EppServer(ServeOptions(config_text=config, pool_name="p", grpc_port=0, grpc_health_port=0,
                                    metrics_port=0, secure_serving=False, bind_address="127.0.0.1"))
    try:
        with pytest.raises(ConfigError, match="'files' and --pool-name are two discovery sources; use one"):
            await server.start()
    finally:
        await server.stop()

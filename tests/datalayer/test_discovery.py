"""Static discovery: flags, the endpoints file, and hot reload into a live collector."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from dl_helpers import close_all, plugin, wait_until, wiring

from epp.datalayer.collector import Collector
from epp.discovery.static import DiscoveryError, StaticDiscovery, parse_endpoint_flag, parse_endpoints_document
from epp.datalayer.pool import EndpointPool
from epp.framework import registry


def test_endpoint_flags():
    m = parse_endpoint_flag("10.0.0.5:8000")
    assert (m.address, m.port, m.name, m.metrics_port) == ("10.0.0.5", 8000, "10.0.0.5:8000", 8000)
    v6 = parse_endpoint_flag("[fd00::1]:9000")
    assert (v6.address, v6.key) == ("fd00::1", "[fd00::1]:9000")
    for bad in ("10.0.0.5", "10.0.0.5:http", "fd00::1:9000", ":80", "h:0", "h:70000"):
        with pytest.raises(DiscoveryError):
            parse_endpoint_flag(bad)


def test_endpoints_document():
    doc = """
pool: {name: vllm-pool, namespace: prod}
endpoints:
- name: vllm-0
  address: 127.0.0.1
  port: 8001
  metricsPort: 9001
  labels: {llm-d.ai/engine-type: vllm, llm-d.ai/role: decode, version: 2}
- address: 127.0.0.1
  port: 8002
"""
    parsed = parse_endpoints_document(doc)
    a, b = parsed.endpoints
    assert (parsed.pool_name, parsed.pool_namespace) == ("vllm-pool", "prod")
    assert (a.name, a.port, a.metrics_port, a.namespace) == ("vllm-0", 8001, 9001, "prod")
    assert dict(a.labels) == {"llm-d.ai/engine-type": "vllm", "llm-d.ai/role": "decode", "version": "2"}
    assert (b.name, b.metrics_port, dict(b.labels)) == ("127.0.0.1:8002", 8002, {})


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("endpoints: [\n", "invalid YAML at line"),
        ("- 1\n", "expected a mapping with 'endpoints'"),
        ("endpoints: {a: 1}", "endpoints: expected a list"),
        ("endpoints: [{port: 1}]", r"endpoints\[0\]: 'address' is required"),
        ("endpoints: [{address: 1.2.3.4}]", r"endpoints\[0\]: 'port' is required"),
        ("endpoints: [{address: 1.2.3.4, port: abc}]", r"endpoints\[0\].port: port must be an integer"),
        ("endpoints: [{address: 1.2.3.4, port: 1, metricsPort: 0}]", r"metricsPort: port must be"),
        ("endpoints: [{address: 'a b', port: 1}]", "neither an IP address nor a host name"),
        ("endpoints: [{address: 1.2.3.4, port: 1}, {address: 1.2.3.4, port: 1}]", r"already listed as endpoints\[0\]"),
        ("endpoints: [{address: 1.2.3.4, port: 1, labels: [a]}]", "labels: expected a mapping"),
        ("endpoints: [{address: 1.2.3.4, port: 1, labels: {a: [1]}}]", r"labels.a: expected a string"),
    ],
)
def test_bad_endpoints_documents_name_the_problem(doc, message):
    with pytest.raises(DiscoveryError, match=message):
        parse_endpoints_document(doc, "eps.yaml")


def test_unknown_keys_are_warnings():
    parsed = parse_endpoints_document("endpoints: [{address: 1.2.3.4, port: 1, weight: 3}]\nextra: 1\n")
    assert any("unknown key 'weight'" in w for w in parsed.warnings)
    assert any("unknown key 'extra'" in w for w in parsed.warnings)


def _write(path, text: str) -> None:
    # Write-then-rename, as editors and config management do; the stat changes either way.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _eps(*ports: int, labels: str = "{}") -> str:
    return "pool: {name: file-pool}\nendpoints:\n" + "".join(
        f"- {{name: ep-{p}, address: 127.0.0.1, port: {p}, labels: {labels}}}\n" for p in ports)


async def test_file_is_watched_and_broken_edits_keep_the_last_good_list(tmp_path, caplog):
    path = tmp_path / "endpoints.yaml"
    _write(path, _eps(8001, 8002))
    disc = StaticDiscovery.from_options(["127.0.0.1:7000"], str(path), poll_interval=0.05)
    pool = EndpointPool()
    task = asyncio.create_task(disc.run(pool))
    try:
        await wait_until(lambda: pool.synced, what="first load")
        assert pool.name == "file-pool"
        assert {ep.key for ep in pool} == {"127.0.0.1:7000", "127.0.0.1:8001", "127.0.0.1:8002"}
        events = []
        pool.subscribe(lambda ev, ep: events.append((ev, ep.key)))

        _write(path, _eps(8002, 8003))  # add one, remove one
        await wait_until(lambda: {ep.key for ep in pool} == {"127.0.0.1:7000", "127.0.0.1:8002", "127.0.0.1:8003"},
                         timeout=1.0, what="add/remove within a second")
        assert ("removed", "127.0.0.1:8001") in events and ("added", "127.0.0.1:8003") in events

        _write(path, _eps(8002, 8003, labels="{llm-d.ai/role: prefill}"))  # relabel
        await wait_until(lambda: pool.get("127.0.0.1:8003").metadata.labels.get("llm-d.ai/role") == "prefill",
                         timeout=1.0, what="relabel within a second")
        assert ("updated", "127.0.0.1:8003") in events

        _write(path, "endpoints:\n- {address: 127.0.0.1, port: nope}\n")  # broken edit
        await wait_until(lambda: any("not applied" in r.getMessage() for r in caplog.records), what="error logged")
        bad = [r for r in caplog.records if "not applied" in r.getMessage()]
        assert bad[0].levelno == logging.ERROR and "endpoints[0].port" in bad[0].getMessage()
        assert "keeping the last good list of 3 endpoint(s)" in bad[0].getMessage()
        assert len(pool) == 3
        await asyncio.sleep(0.3)
        assert len([r for r in caplog.records if "not applied" in r.getMessage()]) == 1  # once per broken version

        path.unlink()  # gone: also kept
        await asyncio.sleep(0.2)
        assert len(pool) == 3

        _write(path, _eps(8004))
        await wait_until(lambda: {ep.key for ep in pool} == {"127.0.0.1:7000", "127.0.0.1:8004"}, timeout=1.0,
                         what="recovery from the broken edit")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_broken_file_at_startup_is_an_error(tmp_path):
    path = tmp_path / "endpoints.yaml"
    path.write_text("endpoints: [{address: 1.2.3.4}]\n")
    with pytest.raises(DiscoveryError, match="'port' is required"):
        await StaticDiscovery.from_options([], str(path)).run(EndpointPool())
    with pytest.raises(DiscoveryError, match="cannot read endpoints file"):
        await StaticDiscovery.from_options([], str(tmp_path / "missing.yaml")).run(EndpointPool())


async def test_flags_only_sync_once_and_return():
    pool = EndpointPool()
    await StaticDiscovery.from_options(["127.0.0.1:1", "127.0.0.1:2"], None).run(pool)
    assert pool.synced and len(pool) == 2


async def test_hot_reload_reaches_the_collector(tmp_path, servers):
    a, b = await servers(), await servers()
    path = tmp_path / "endpoints.yaml"
    _write(path, _eps(a.port))
    pool = EndpointPool()
    disc = StaticDiscovery.from_options([], str(path), poll_interval=0.05)
    task = asyncio.create_task(disc.run(pool))
    col = Collector(pool, [wiring(plugin("prometheus-data-source"), plugin("core-metrics-extractor"))],
                    interval=0.02)
    await col.start()
    try:
        await wait_until(lambda: pool.synced, what="first load")
        _write(path, _eps(b.port))
        await wait_until(lambda: pool.get(f"127.0.0.1:{b.port}") is not None, what="b discovered")
        ep_b = pool.get(f"127.0.0.1:{b.port}")
        await wait_until(lambda: ep_b.metrics.update_time > 0, what="b scraped")
        assert col.endpoints == [ep_b.key]
        hits = a.hits["/metrics"]
        await asyncio.sleep(0.1)
        assert a.hits["/metrics"] == hits  # a's loop stopped with its removal
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close_all(col)


def test_static_discovery_plugin_params():
    spec = registry.get("static-discovery")
    from epp.framework import decode_params

    params = decode_params(spec.params, {"endpoints": ["127.0.0.1:8000"], "pollInterval": "100ms"})
    plug = spec.cls.create("disc", params, None)
    assert plug.flag_endpoints[0].key == "127.0.0.1:8000" and plug.poll_interval == pytest.approx(0.1)
    with pytest.raises(ValueError, match="endpoints\\[0\\]"):
        decode_params(spec.params, {"endpoints": ["nope"]})

"""docker-compose.replicas.yml (two active-active EPP replicas, precise prefix routing), checked
structurally like docker-compose.yml in test_bench_compose.py: merged over the base file the way
`docker compose -f docker-compose.yml -f docker-compose.replicas.yml` merges it, every command
parses with the real CLIs, the replicas run the precise config against the ports the mocks publish
KV events on, and Envoy's config lists both replicas, matches its template and validates.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp import cli as epp_cli
from epp.config.loader import load_config
from epp.envoyconfig import validate as envoy_validate
from epp.sim import cli as sim_cli

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
OVERRIDE = yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())


def _mount_target(volume: str) -> str:
    return volume.split(":")[1]


def merge_service(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge rules for what these files use: scalars and command replace, volumes
    merge by container path, ports append, mappings (depends_on, networks, healthcheck) merge."""
    out = dict(base)
    for key, value in over.items():
        if key == "volumes":
            merged = {_mount_target(v): v for v in base.get("volumes", [])}
            merged.update({_mount_target(v): v for v in value})
            out[key] = list(merged.values())
        elif key == "ports":
            out[key] = list(dict.fromkeys([*base.get("ports", []), *value]))
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = {**base[key], **value}
        else:
            out[key] = value
    return out


SERVICES = {name: merge_service(BASE["services"].get(name, {}), OVERRIDE["services"].get(name, {}))
            for name in {*BASE["services"], *OVERRIDE["services"]}}
REPLICAS = ("epp", "epp-2")
MOCKS = sorted(n for n in SERVICES if n.startswith("vllm-mock-"))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    return {v.split(":")[1]: ROOT / v.split(":")[0] for v in service.get("volumes", [])}


def ipv4(name: str) -> str:
    return SERVICES[name]["networks"]["epp-net"]["ipv4_address"]


def test_override_only_adds_a_replica_and_touches_known_services() -> None:
    assert set(OVERRIDE["services"]) == {*MOCKS, *REPLICAS, "envoy"}
    assert set(SERVICES) == set(BASE["services"]) | {"epp-2"}
    assert ipaddress.ip_address(ipv4("epp-2")) in ipaddress.ip_network(
        BASE["networks"]["epp-net"]["ipam"]["config"][0]["subnet"])
    assert len({ipv4(n) for n in SERVICES}) == len(SERVICES)


@pytest.mark.parametrize("name", [*MOCKS, *REPLICAS])
def test_commands_parse_with_the_real_cli_and_files_exist(name: str) -> None:
    service = SERVICES[name]
    argv = [str(a) for a in service["command"]]
    for host in mounts(service).values():
        assert host.exists(), f"{name} mounts {host}, which does not exist"
    if argv[0] == "serve":
        options = epp_cli.serve_options(epp_cli.build_parser().parse_args(argv))
        assert options.bind_address == "0.0.0.0" and options.secure_serving is False
    else:
        parser = argparse.ArgumentParser(prog="epp sim", allow_abbrev=False)
        sim_cli.add_arguments(parser)
        fleet = sim_cli.build_fleet(parser.parse_args(argv[1:]))
        events = fleet.servers[0].config.kv_events
        assert events is not None and events.active


def test_replicas_run_the_precise_config_on_the_mocks_event_ports() -> None:
    events = json.loads(flag([str(a) for a in SERVICES[MOCKS[0]]["command"]], "--kv-events-config"))
    port = int(events["endpoint"].rsplit(":", 1)[1])
    replay = int(events["replay_endpoint"].rsplit(":", 1)[1])
    for name in REPLICAS:
        argv = SERVICES[name]["command"]
        loaded = load_config(path=str(mounts(SERVICES[name])[flag(argv, "--config-file")]))
        assert not loaded.warnings
        producer = loaded.plugins["precise-prefix-cache-producer"]
        pd = producer.params.kvEventsConfig.podDiscoveryConfig
        assert (pd.socketPort, pd.replaySocketPort) == (port, replay)
        assert flag(argv, "--grpc-port") == "9002"
    # Both replicas run the same command against the same endpoints file: they share nothing else.
    assert SERVICES["epp"]["command"] == SERVICES["epp-2"]["command"]
    assert mounts(SERVICES["epp"]) == mounts(SERVICES["epp-2"])
    # The upstream config the docs quote differs only by the replay port.
    upstream = yaml.safe_load((ROOT / "config" / "precise-prefix.yaml").read_text())
    ours = yaml.safe_load(mounts(SERVICES["epp"])["/etc/epp/config.yaml"].read_text())
    ours["plugins"][0]["parameters"]["kvEventsConfig"]["podDiscoveryConfig"].pop("replaySocketPort")
    assert ours == upstream


def test_envoy_lists_both_replicas_and_is_in_sync_and_valid() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_envoy", ROOT / "deploy" / "render_envoy.py")
    assert spec and spec.loader
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    envoy = SERVICES["envoy"]
    path = mounts(envoy)["/etc/envoy/envoy.yaml"]
    assert path == ROOT / "deploy" / "envoy" / "envoy-replicas.yaml"
    committed = path.read_text()
    assert committed == render.render("replicas"), "stale: run python deploy/render_envoy.py"
    assert render.EPP_REPLICAS == [f"{ipv4(n)}:9002" for n in REPLICAS]
    doc = yaml.safe_load(committed)
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "ext_proc_epp")
    hosts = [e["endpoint"]["address"]["socket_address"]["address"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert hosts == [ipv4(n) for n in REPLICAS]
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    assert set(envoy["depends_on"]) == set(REPLICAS)
    ok, output = envoy_validate(committed)
    assert ok, output

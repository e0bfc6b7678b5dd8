"""docker-compose.yml and deploy/, checked structurally (there is no Docker engine here).

Every `epp ...` command in the compose file must parse with the real CLI parsers (the ones
`epp serve` and `epp sim` use) and pass their own validation; every mounted file must exist;
the generated Envoy config must match its template and pass `envoy --mode validate`; the
addresses and ports that tie the services together must agree; Prometheus and the Grafana
dashboard must only refer to services and metrics that exist.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from epp import cli as epp_cli
from epp.config.loader import load_config
from epp.discovery.static import parse_endpoints_document
from epp.envoyconfig import validate as envoy_validate
from epp.observability.metrics import REGISTRY
from epp.sim import cli as sim_cli
from epp.sim.config import SimConfig
from epp.sim.fleet import SimFleet

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OUR_IMAGE = "epp:local"


def our_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in SERVICES.items() if s.get("image") == OUR_IMAGE}


def host_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        out.append((ROOT / host, container))
    return out


def ipv4(name: str) -> str:
    return SERVICES[name]["networks"]["epp-net"]["ipv4_address"]


def sim_parser() -> argparse.ArgumentParser:
    """The parser `epp sim` builds (epp/cli.py delegates with allow_abbrev=False)."""
    parser = argparse.ArgumentParser(prog="epp sim", allow_abbrev=False)
    sim_cli.add_arguments(parser)
    return parser


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_expected_services_exist() -> None:
    assert {"envoy", "epp", "vllm-mock-1", "vllm-mock-2", "vllm-mock-3"} <= set(SERVICES)
    assert set(our_services()) == {"epp", "vllm-mock-1", "vllm-mock-2", "vllm-mock-3"}
    assert SERVICES["envoy"]["image"].startswith("envoyproxy/envoy:v1.40")
    for name in ("prometheus", "grafana"):
        assert SERVICES[name]["profiles"] == ["observability"]
    for name in ("envoy", "epp", "vllm-mock-1"):
        assert "profiles" not in SERVICES[name]
    for s in our_services().values():
        assert s["build"]["context"] == "."


@pytest.mark.parametrize("name", sorted(our_services()))
def test_epp_commands_parse_with_the_real_cli(name: str) -> None:
    argv = SERVICES[name]["command"]
    assert isinstance(argv, list) and argv, "commands must be exec-form lists"
    sub = argv[0]
    if sub == "serve":
        args = epp_cli.build_parser().parse_args(argv)
        options = epp_cli.serve_options(args)  # the server's own validation
        assert options.secure_serving is False
        assert options.bind_address == "0.0.0.0"  # reachable from the other containers
    elif sub == "sim":
        parser = sim_parser()
        args = parser.parse_args(argv[1:])
        fleet = sim_cli.build_fleet(args)  # the sim's own validation
        assert [s.host for s in fleet.servers] == ["0.0.0.0"]
    else:
        pytest.fail(f"{name}: unexpected command 'epp {sub}'")


def test_unknown_flags_would_be_caught() -> None:
    # The check above is only worth something if a typo fails it.
    with pytest.raises(SystemExit):
        epp_cli.build_parser().parse_args(["serve", "--grpc-prot", "9002"])
    with pytest.raises(SystemExit):
        sim_parser().parse_args(["--time-scal", "1"])  # abbreviations are off, as in `epp sim`
    with pytest.raises(SystemExit):
        sim_parser().parse_args(["--ports", "8000", "--tmie-scale", "1"])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_mounted_file_exists_and_every_container_path_is_mounted(name: str) -> None:
    service = SERVICES[name]
    mounts = host_mounts(service)
    for host, _ in mounts:
        assert host.exists(), f"{name} mounts {host}, which does not exist"
    mounted = [c for _, c in mounts]
    for arg in service.get("command", []):
        for path in re.findall(r"(/etc/\S+)", str(arg)):
            assert any(path == c or path.startswith(c.rstrip("/") + "/") for c in mounted), \
                f"{name} uses {path} but nothing is mounted there"


def test_epp_config_and_endpoints_file() -> None:
    epp = SERVICES["epp"]
    files = {container: host for host, container in host_mounts(epp)}
    argv = epp["command"]
    loaded = load_config(path=str(files[flag(argv, "--config-file")]))
    assert not loaded.warnings
    endpoints = parse_endpoints_document(files[flag(argv, "--endpoints-file")].read_text())
    mocks = sorted(n for n in SERVICES if n.startswith("vllm-mock-"))
    got = sorted((e.address, e.port) for e in endpoints.endpoints)
    want = sorted((ipv4(n), int(flag(SERVICES[n]["command"], "--ports"))) for n in mocks)
    assert got == want


def test_static_addresses_are_in_the_subnet_and_distinct() -> None:
    subnet = ipaddress.ip_network(COMPOSE["networks"]["epp-net"]["ipam"]["config"][0]["subnet"])
    addresses = [ipv4(n) for n in SERVICES]
    assert len(set(addresses)) == len(addresses)
    assert all(ipaddress.ip_address(a) in subnet for a in addresses)


def _render_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_envoy", ROOT / "deploy" / "render_envoy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_envoy_config_is_in_sync_with_the_template_and_valid() -> None:
    render = _render_module()
    committed = (ROOT / "deploy" / "envoy" / "envoy.yaml").read_text()
    assert committed == render.render(), "deploy/envoy/envoy.yaml is stale: run python deploy/render_envoy.py"
    r = subprocess.run([sys.executable, str(ROOT / "deploy" / "render_envoy.py"), "--check"], capture_output=True)
    assert r.returncode == 0
    ok, output = envoy_validate(committed)
    assert ok, output
    # The rendered values agree with the compose file.
    v = render.VALUES
    assert v["epp_host"] == ipv4("epp")
    assert str(v["epp_port"]) == flag(SERVICES["epp"]["command"], "--grpc-port")
    published = {p.rsplit(":", 1)[-1] for p in SERVICES["envoy"]["ports"]}
    assert {str(v["listen_port"]), str(v["admin_port"])} <= published
    assert ("deploy/envoy/envoy.yaml", "/etc/envoy/envoy.yaml") in [
        (str(h.relative_to(ROOT)), c) for h, c in host_mounts(SERVICES["envoy"])]


def test_prometheus_scrapes_compose_services_on_their_ports() -> None:
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets
    for target in targets:
        host, port = target.split(":")
        assert host in SERVICES, f"prometheus target {target} is not a compose service"
        argv = [str(a) for a in SERVICES[host].get("command", [])]
        if host == "epp":
            assert port == flag(argv, "--metrics-port")
        elif host.startswith("vllm-mock-"):
            assert port == flag(argv, "--ports")
        elif host == "envoy":
            assert int(port) == _render_module().VALUES["admin_port"]


def _epp_metric_names() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in REGISTRY.collect() for s in suffixes.get(f.type, ("",))}


async def _sim_metric_names() -> set[str]:
    async with SimFleet([0], SimConfig(time_scale=0.05)) as fleet:
        async with aiohttp.ClientSession() as http, http.get(fleet.urls[0] + "/metrics") as resp:
            text = await resp.text()
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)", text, re.M)}


METRIC = re.compile(r"\b((?:inference_|llm_d_|epp_)[a-z0-9_]+|vllm:[a-z0-9_:]+)")


async def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "epp.json").read_text())
    known = _epp_metric_names() | await _sim_metric_names()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    used: set[str] = set()
    for panel in panels:
        names = {m for t in panel["targets"] for m in METRIC.findall(t["expr"])}
        assert names, f"panel {panel['title']!r} queries no metric"
        used |= names
        unknown = names - known
        assert not unknown, f"panel {panel['title']!r} uses metrics nobody exports: {sorted(unknown)}"
    assert {"inference_objective_request_total", "inference_extension_scheduler_e2e_duration_seconds_bucket"} <= used
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/epp.yaml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    mounts = dict((c, h) for h, c in host_mounts(SERVICES["grafana"]))
    assert (mounts[dash_dir] / "epp.json").exists()
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["uid"] == panels[0]["datasource"]["uid"]


def test_healthchecks_are_valid_python_using_real_functions() -> None:
    for name, service in SERVICES.items():
        check = service.get("healthcheck")
        if not check:
            continue
        test = check["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        compile(test[3], f"{name} healthcheck", "exec")
        for module, attr in re.findall(r"from (\S+) import (\w+)", test[3]):
            assert hasattr(__import__(module, fromlist=[attr]), attr)


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    flat = [s for group in sources for s in group]
    assert flat
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for src in flat:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert src.split("/")[0] not in ignored, f".dockerignore excludes {src}"
    assert 'ENTRYPOINT ["epp"]' in dockerfile

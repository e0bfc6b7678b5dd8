"""The `epp` command: check-config exit codes and output, help, serve flag parsing, delegation."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from epp import cli
from epp.options import ServeOptions

H = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
BAD = H + """
plugins:
- {type: no-such-scorer}
- {name: q, type: queue-scorer, parameters: {unknownKnob: 1}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: ghost}]
featureGates: [warp]
"""


def epp(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epp", *args], capture_output=True, text=True, timeout=60, env=env)


# ----------------------------------------------------------------------------- subprocess


def test_check_config_valid_prints_effective_config_and_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(H.replace("llm-d.ai", "inference.networking.x-k8s.io") + """
plugins:
- type: queue-scorer
- {name: p, type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer, weight: 3}, {pluginRef: p}]
""")
    r = epp("check-config", "--config-file", str(path))
    assert r.returncode == 0, r.stderr
    config, params = list(yaml.safe_load_all(r.stdout))
    assert config["kind"] == "EndpointPickerConfig"
    assert config["schedulingProfiles"] == [
        {"name": "default", "plugins": [{"pluginRef": "queue-scorer", "weight": 3.0}, {"pluginRef": "p"}]}
    ]
    names = [p["name"] for p in config["plugins"]]
    assert {"single-profile-handler", "openai-parser", "utilization-detector", "metrics-data-source"} <= set(names)
    assert params["effectiveParameters"]["p"]["maxNumOfEndpoints"] == 2
    assert "warning: apiVersion: 'inference.networking.x-k8s.io/v1alpha1' is deprecated" in r.stderr
    # --config-only prints something `epp check-config` accepts again, unchanged
    only = epp("check-config", "--config-file", str(path), "--config-only")
    again = epp("check-config", "--config-text", only.stdout, "--config-only")
    assert again.returncode == 0 and again.stdout == only.stdout


def test_check_config_invalid_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    r = epp("check-config", "--config-file", str(path))
    assert r.returncode == 2
    assert r.stdout == ""
    assert "epp: error: invalid configuration (3 errors):" in r.stderr
    for expected in (
        "  featureGates[0]: feature gate 'warp' is unknown or unregistered",
        "  plugins[0]: plugin type 'no-such-scorer' is not registered; known types: ",
        "  schedulingProfiles[0].plugins[0]: references undefined plugin 'ghost'",
        "warning: plugins[1]: plugin 'q' (type 'queue-scorer'): unknown parameter 'unknownKnob' is ignored",
    ):
        assert expected in r.stderr
    assert "Traceback" not in r.stderr


def test_user_errors_never_show_a_traceback(tmp_path: Path) -> None:
    cases = [
        (["check-config", "--config-file", str(tmp_path / "nope.yaml")], "cannot read config file"),
        (["check-config", "--config-text", "a: [1"], "failed to decode configuration YAML/JSON: line"),
        (["check-config", "--config-file", "a", "--config-text", "b"], "not allowed with argument"),
        (["--refresh-metrics-interval", "soon"], "invalid duration 'soon'"),
        (["--total-queued-requests-metric", "x"], 'flag "total-queued-requests-metric" is deprecated and cannot be used'),
    ]
    for args, message in cases:
        r = epp(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_help_lists_commands_and_serve_flags() -> None:
    r = epp("--help")
    assert r.returncode == 0
    for command in ("serve", "check-config", "sim", "demo", "bench"):
        assert command in r.stdout
    assert "'epp' with no command runs 'epp serve'" in r.stdout
    s = epp("serve", "--help")
    for flag in ("--config-file", "--grpc-port", "--secure-serving", "--refresh-metrics-interval", "--endpoints-file",
                 "--endpoint HOST:PORT", "--response-body-policy", "--request-timeout", "--max-request-body-bytes"):
        assert flag in s.stdout


# ----------------------------------------------------------------------------- in-process


def options(*argv: str) -> ServeOptions:
    args = cli.build_parser().parse_args(["serve", *argv])
    return cli.serve_options(args)


def test_serve_defaults_match_upstream(monkeypatch) -> None:
    monkeypatch.delenv("NAMESPACE", raising=False)
    o = options()
    assert (o.grpc_port, o.grpc_health_port, o.metrics_port) == (9002, 9003, 9090)
    assert o.secure_serving is True and o.cert_path is None
    assert (o.refresh_metrics_interval, o.refresh_prometheus_metrics_interval, o.metrics_staleness_threshold) == (0.05, 5.0, 2.0)
    assert (o.pool_name, o.pool_namespace, o.verbosity, o.bind_address) == ("", "default", 2, "0.0.0.0")
    assert o.max_request_body_bytes == 16 * 1024 * 1024 and o.response_body_policy == "non-streaming"
    assert o == ServeOptions(pool_namespace="default")  # the CLI and the dataclass agree on every default


@pytest.mark.parametrize("argv,expected", [
    (["--secure-serving=false"], False),
    (["--secure-serving", "false"], False),
    (["--secure-serving=0"], False),
    (["--secure-serving"], True),
    (["--secure-serving", "True"], True),
    (["--secure-serving=false", "--secure-serving=true"], True),
])
def test_go_style_booleans(argv: list[str], expected: bool) -> None:
    assert options(*argv).secure_serving is expected


def test_values_are_parsed() -> None:
    o = options(
        "--config-file", "x.yaml", "--config-reload", "--grpc-port=7000", "--bind-address", "127.0.0.1",
        "--refresh-metrics-interval", "1m30s", "--metrics-staleness-threshold=250ms", "--request-timeout", "0",
        "--max-request-body-bytes", "512Ki", "--endpoint", "10.0.0.1:8000", "--endpoint=[::1]:8001",
        "--endpoints-file", "eps.yaml", "--pool-namespace", "ml", "--v=4",
        "--zap-encoder", "json", "--response-body-policy", "always", "--enable-debug-headers",
        "--disable-endpoint-subset-filter=true", "--health-checking", "--cert-path", "/certs", "--enable-cert-reload",
        "--destination-fallbacks", "2",
    )
    assert o.destination_fallbacks == 2 and options().destination_fallbacks == 0
    assert (o.config_file, o.config_reload, o.grpc_port, o.bind_address) == ("x.yaml", True, 7000, "127.0.0.1")
    assert (o.refresh_metrics_interval, o.metrics_staleness_threshold, o.request_timeout) == (90.0, 0.25, 0.0)
    assert o.max_request_body_bytes == 512 * 1024
    assert o.endpoints == ["10.0.0.1:8000", "[::1]:8001"] and o.endpoints_file == "eps.yaml"
    assert (o.pool_namespace, o.verbosity, o.log_format) == ("ml", 4, "json")
    assert (o.response_body_policy, o.enable_debug_headers, o.disable_endpoint_subset_filter) == ("always", True, True)
    assert (o.health_checking, o.cert_path, o.enable_cert_reload) == (True, "/certs", True)
    assert options("-v", "3", "--grpc-host", "::1", "--log-format", "console").verbosity == 3
    assert options("--grpc-host", "::1").bind_address == "::1"
    settings = o.runtime_settings()
    assert (settings.refresh_metrics_interval, settings.pool_namespace) == (90.0, "ml")


def test_kubernetes_flags_are_upstreams() -> None:
    o = options("--pool-name", "vllm", "--pool-namespace", "ml", "--pool-group", "inference.networking.x-k8s.io",
                "--kubeconfig", "/k", "--ha-enable-leader-election", "--drain-timeout", "5s",
                "--leader-election-lease-duration", "3s", "--leader-election-renew-deadline", "2s",
                "--leader-election-retry-period", "500ms")
    assert (o.pool_name, o.pool_namespace, o.pool_group, o.kubeconfig) == (
        "vllm", "ml", "inference.networking.x-k8s.io", "/k")
    assert (o.ha_enable_leader_election, o.drain_timeout) == (True, 5.0)
    assert (o.lease_duration, o.renew_deadline, o.retry_period) == (3.0, 2.0, 0.5)
    assert o.runtime_settings().pool_name == "vllm" and o.kubernetes_discovery
    s = options("--endpoint-selector", "app=vllm,tier in (a,b)", "--endpoint-target-ports", "8000,8001",
                "--endpoint-target-ports=8002")
    assert (s.endpoint_selector, s.endpoint_target_ports, s.pool_name) == ("app=vllm,tier in (a,b)", [8000, 8001, 8002], "")


def test_pool_namespace_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("NAMESPACE", "team-a")
    assert options().pool_namespace == "team-a"
    assert options("--pool-namespace", "b").pool_namespace == "b"


@pytest.mark.parametrize("argv,message", [
    (["--secure-serving=maybe"], "invalid boolean 'maybe'"),
    (["--endpoint", "no-port"], "expected HOST:PORT"),
    (["--max-request-body-bytes", "huge"], "invalid quantity"),
    (["--response-body-policy", "sometimes"], "invalid choice"),
    (["--lora-info-metric=x"], 'flag "lora-info-metric" is deprecated and cannot be used; configure metrics via engineConfigs'),
    (["--endpoint-selector", "app=vllm"], "--endpoint-target-ports must list 1-8"),
    (["--endpoint-selector", "app in x", "--endpoint-target-ports", "8000"], "needs a '(' value list"),
    (["--endpoint-target-ports", "8000"], "only used with --endpoint-selector"),
    (["--pool-name", "p", "--endpoint-selector", "a=b", "--endpoint-target-ports", "1"], "exactly one of --pool-name"),
    (["--pool-name", "p", "--endpoint", "127.0.0.1:8000"], "are two discovery sources; use one"),
    (["--endpoint-selector", "a=b", "--endpoint-target-ports", "1", "--endpoints-file", "f"], "two discovery sources"),
    (["--pool-name", "p", "--pool-group", "example.com"], "--pool-group 'example.com' is not supported"),
    (["--ha-enable-leader-election", "--endpoint", "127.0.0.1:1"], "--ha-enable-leader-election needs Kubernetes"),
    (["--endpoint-target-ports", "80x"], "expected port numbers"),
    (["--config-reload"], "--config-reload needs --config-file"),
    (["--grpc-port", "9090"], "must differ"),
    (["--metrics-staleness-threshold", "0s"], "metrics-staleness-threshold must be positive"),
    (["--destination-fallbacks", "-1"], "--destination-fallbacks must not be negative"),
    (["--decision-log-size", "0"], "--decision-log-size must be positive, got 0"),
    (["--grpc-por", "1"], "unrecognized arguments"),  # no abbreviations, like Go flags
])
def test_bad_flags_exit_2_with_a_message(argv: list[str], message: str, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_upstream_only_flags_are_accepted(monkeypatch) -> None:
    args = cli.build_parser().parse_args(["serve", "--tracing=false", "--enable-pprof",
                                          "--model-server-metrics-port", "8000"])
    assert args.ignored_flags == ["--tracing", "--enable-pprof", "--model-server-metrics-port"]
    cli.serve_options(args)  # and they do not reach ServeOptions


def test_no_command_means_serve(monkeypatch) -> None:
    seen = {}

    def fake_serve(args):
        seen["options"] = cli.serve_options(args)
        return 0

    monkeypatch.setattr(cli, "_cmd_serve", fake_serve)
    assert cli.main(["--grpc-port", "7001", "--secure-serving=false"]) == 0
    assert seen["options"].grpc_port == 7001 and seen["options"].secure_serving is False
    assert cli.main([]) == 0


def test_serve_runs_the_server_with_the_options(monkeypatch) -> None:
    fake = types.ModuleType("epp.server")
    fake.run = lambda options: 7 if options.grpc_port == 7002 else 1
    monkeypatch.setitem(sys.modules, "epp.server", fake)
    assert cli.main(["serve", "--grpc-port", "7002"]) == 7


def test_delegated_commands(monkeypatch, capsys) -> None:
    fake = types.ModuleType("epp.fakecmd.cli")
    fake.add_arguments = lambda parser: parser.add_argument("--n", type=int, required=True)

    async def run(args):
        return args.n

    fake.run = run
    monkeypatch.setitem(sys.modules, "epp.fakecmd.cli", fake)
    monkeypatch.setitem(cli.DELEGATED, "fakecmd", "a fake command")
    monkeypatch.setitem(cli.DELEGATED, "ghostcmd", "not written yet")
    assert cli.main(["fakecmd", "--n", "5"]) == 5  # async run() is awaited
    assert cli.main(["fakecmd"]) == 2  # its own argparse errors
    assert cli.main(["ghostcmd"]) == 2
    assert "epp: error: 'epp ghostcmd' is not available yet (module epp.ghostcmd.cli is missing)" in capsys.readouterr().err

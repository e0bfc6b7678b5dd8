"""Extractor semantics on parsed pages, source options over real HTTP(S), and config wiring."""

from __future__ import annotations

import ssl

import pytest
from aiohttp import web
from dl_helpers import EngineState, meta, plugin, vllm_page
from local_servers import serve_app

from epp.config import load_config
from epp.config.errors import ConfigError
from epp.datalayer.endpoint import Endpoint, EndpointMetadata
from epp.datalayer.errors import DataSourceError, ExtractError
from epp.datalayer.promparse import parse
from epp.datalayer.selector import MetricSelector
from epp.framework.params import ParameterError

TRITON = b"""# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="m",request_type="waiting",version="1"} 4
nv_trt_llm_request_metrics{model="m",request_type="scheduled",version="1"} 9
nv_trt_llm_request_metrics{model="m",request_type="max",version="1"} 64
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="m",version="1"} 0.375
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="m",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="m",version="1"} 2048
"""
TRTLLM = b"""# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting 1
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running 2
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization 0.5
# TYPE trtllm_kv_cache_tokens_per_block gauge
trtllm_kv_cache_tokens_per_block 32
# TYPE trtllm_kv_cache_max_blocks gauge
trtllm_kv_cache_max_blocks 1000
"""


def _ep(**labels: str) -> Endpoint:
    return Endpoint(EndpointMetadata("10.0.0.1", 8000, labels=labels))


def _extract(extractor, page: bytes, ep: Endpoint | None = None) -> Endpoint:
    ep = ep or _ep()
    extractor.extract(parse(page, extractor.wanted_families()), ep)
    return ep


@pytest.mark.parametrize(("engine", "page", "expected"), [
    ("triton-tensorrt-llm", TRITON, (4, 9, 0.375, 64, 2048)),
    ("trtllm-serve", TRTLLM, (1, 2, 0.5, 32, 1000)),
])
def test_core_extractor_engine_tables(engine, page, expected):
    m = _extract(plugin("core-metrics-extractor"), page, _ep(**{"llm-d.ai/engine-type": engine})).metrics
    assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage, m.cache_block_size,
            m.cache_num_blocks) == expected


def test_core_extractor_fallback_label_old_kv_name_and_user_engines():
    old_vllm = b"""# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting 3
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running 1
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc 0.9
"""
    core = plugin("core-metrics-extractor")
    m = _extract(core, old_vllm, _ep(**{"inference.networking.k8s.io/engine-type": "vllm"})).metrics
    assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (3, 1, 0.9)

    custom = plugin("core-metrics-extractor", {
        "engineLabelKey": "engine",
        "defaultEngine": "mine",
        "engineConfigs": [{"name": "mine", "queuedRequestsSpec": "q{shard=\"0\"}", "runningRequestsSpec": "r",
                           "kvUsageSpec": ["kv_new", "kv_old"]}],
    })
    page = b'# TYPE q gauge\nq{shard="0"} 5\nq{shard="1"} 50\n# TYPE r counter\nr 2\nkv_old 0.25\n'
    m = _extract(custom, page).metrics  # no label: defaultEngine; untyped kv_old accepted
    assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (5, 2, 0.25)
    # built-ins stay available next to user engines
    m = _extract(custom, TRTLLM, _ep(engine="trtllm-serve")).metrics
    assert m.kv_cache_usage == 0.5


@pytest.mark.parametrize(("params", "message"), [
    ({"engineConfigs": [{"name": "default"}]}, "'default' is reserved"),
    ({"defaultEngine": "nope"}, "defaultEngine 'nope' is not an engine config"),
    ({"engineConfigs": [{"name": "x", "kvUsageSpec": "kv{a=~\"(\"}"}]}, r"engineConfigs\[0\].kvUsageSpec: invalid regex"),
    ({"engineConfigs": [{"name": "x"}, {"name": "x"}]}, "listed twice"),
])
def test_core_extractor_bad_params(params, message):
    with pytest.raises(ParameterError, match=message):
        plugin("core-metrics-extractor", params)


def test_core_extractor_refreshes_update_time_only_when_core_fields_are_read():
    core = plugin("core-metrics-extractor")
    ep = _extract(core, vllm_page(EngineState(waiting=2)))
    t = ep.metrics.update_time
    assert t > 0
    with pytest.raises(ExtractError, match="waiting_queue_size: metric vllm:num_requests_waiting not found"):
        _extract(core, b"# TYPE something_else gauge\nsomething_else 1\n", ep)
    assert ep.metrics.update_time == t and ep.metrics.waiting_queue_size == 2  # stale, kept
    with pytest.raises(ExtractError, match="negative count"):
        _extract(core, vllm_page(EngineState(waiting=-1)), ep)


def test_lora_info_takes_the_newest_series_and_tolerates_absence():
    page = b"""# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 100
vllm:lora_requests_info{max_lora="2",running_lora_adapters=" a , b ,",waiting_lora_adapters="c"} 200
vllm:lora_requests_info{max_lora="2",running_lora_adapters="older",waiting_lora_adapters=""} 50
"""
    core = plugin("core-metrics-extractor")
    gauges = b"vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n"
    m = _extract(core, gauges + page).metrics
    assert dict(m.active_models) == {"a": 0, "b": 0} and dict(m.waiting_models) == {"c": 0}
    assert m.max_active_models == 2
    ep2 = _extract(core, TRTLLM, _ep(**{"llm-d.ai/engine-type": "trtllm-serve"}))
    assert ep2.metrics.active_models == {} and ep2.metrics.max_active_models == 0


def test_prometheus_metric_aggregates_labels_and_errors():
    page = (b'# TYPE q gauge\nq{s="a"} 1 1000\nq{s="b"} 5 3000\nq{s="c"} 3 2000\n'
            b'# TYPE info gauge\ninfo{blocks="128",bad="x"} 1\n# TYPE h histogram\n'
            b'h_bucket{le="+Inf"} 4\nh_sum 2\nh_count 4\n# TYPE n gauge\nn NaN\n')
    for how, value in (("max", 5), ("min", 1), ("sum", 9), ("last", 5)):
        ep = _extract(plugin("prometheus-metric", {"metricName": "q", "aggregate": how}), page)
        assert ep.metrics.custom["q"] == value
    ep = _extract(plugin("prometheus-metric", {"metricName": 'q{s!="b"}', "key": "qq", "aggregate": "last"}), page)
    assert ep.metrics.custom["qq"] == 3  # latest timestamp among the matches
    ep = _extract(plugin("prometheus-metric", {"metricName": "info", "label": "blocks"}), page)
    assert ep.metrics.custom["info"] == 128
    ep = _extract(plugin("prometheus-metric", {"metricName": "h_count"}), page)
    assert ep.metrics.custom["h_count"] == 4
    for params, message in (
        ({"metricName": "info", "label": "bad"}, "label bad='x' is not a number"),
        ({"metricName": "info", "label": "nope"}, "has no label 'nope'"),
        ({"metricName": "h"}, "is a histogram; select h_sum, h_count"),
        ({"metricName": "n"}, "is nan"),
        ({"metricName": "absent"}, "metric absent not found"),
        ({"metricName": 'q{s="z"}'}, 'no series matching {s="z"}'),
    ):
        ep = _ep()
        with pytest.raises(ExtractError, match=message):
            _extract(plugin("prometheus-metric", params), page, ep)
        assert ep.metrics.custom == {}  # nothing written for that endpoint


def test_selector_syntax():
    s = MetricSelector.parse("x{a=b, c='d', e!=\"f\", g=~\"h.*\", i!~'j'}")
    assert [(m.label, m.op, m.value) for m in s.matchers] == [
        ("a", "=", "b"), ("c", "=", "d"), ("e", "!=", "f"), ("g", "=~", "h.*"), ("i", "!~", "j")]
    assert s.matches({"a": "b", "c": "d", "g": "hello"}) and not s.matches({"a": "b", "c": "d", "g": "xh"})
    for bad in ("", "1x", "x{a}", "x{a=~\"[\"}", "x{a=\"b\"", "x y"):
        with pytest.raises(ValueError):
            MetricSelector.parse(bad)
    with pytest.raises(ParameterError, match="metricName"):
        plugin("prometheus-metric", {"metricName": "x{"})
    with pytest.raises(ParameterError, match="must be one of 'max', 'sum', 'min', 'last'"):
        plugin("prometheus-metric", {"metricName": "x", "aggregate": "avg"})


async def test_bearer_token_https_and_http_errors(tmp_path):
    from epp.extproc.tls import self_signed_certificate

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    seen = []

    async def metrics(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer s3cret":
            return web.Response(status=401, reason="Unauthorized")
        return web.Response(body=vllm_page(EngineState(waiting=9)), content_type="text/plain")

    cert, key = self_signed_certificate()
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    app = web.Application()
    app.router.add_get("/custom/metrics", metrics)
    runner, port = await serve_app(app, ctx)
    target = EndpointMetadata("127.0.0.1", port)
    sources = []
    try:
        good = plugin("prometheus-data-source", {"scheme": "https", "path": "/custom/metrics",
                                                 "bearerTokenFile": str(token)})
        no_token = plugin("prometheus-data-source", {"scheme": "https", "path": "/custom/metrics"})
        verify = plugin("prometheus-data-source", {"scheme": "https", "path": "/custom/metrics",
                                                   "insecureSkipVerify": False, "bearerTokenFile": str(token)})
        sources = [good, no_token, verify]
        families = await good.collect(target)
        assert families["vllm:num_requests_waiting"].samples[0].value == 9
        assert seen[-1] == "Bearer s3cret"
        with pytest.raises(DataSourceError, match="HTTP 401 Unauthorized"):
            await no_token.collect(target)
        with pytest.raises(DataSourceError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await verify.collect(target)
        missing = plugin("prometheus-data-source", {"bearerTokenFile": str(tmp_path / "none")})
        sources.append(missing)
        with pytest.raises(DataSourceError, match="cannot read bearerTokenFile"):
            await missing.collect(target)
    finally:
        for s in sources:
            await s.close()
        await runner.cleanup()


def test_source_params_are_validated():
    with pytest.raises(ParameterError, match="must be one of 'http', 'https'"):
        plugin("prometheus-data-source", {"scheme": "ftp"})
    with pytest.raises(ParameterError, match="'path' must start with '/'"):
        plugin("metrics-data-source", {"path": "metrics"})
    src = plugin("prometheus-data-source", {"timeout": "250ms"})
    assert float(src.params.timeout) == 0.25
    assert src.url(meta(type("S", (), {"port": 81})(), metrics_port=9090)) == "http://127.0.0.1:9090/metrics"


def test_type_mismatch_wiring_is_rejected_at_load():
    text = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prometheus-data-source
- type: models-data-extractor
dataLayer:
  sources:
  - pluginRef: prometheus-data-source
    extractors:
    - pluginRef: models-data-extractor
"""
    with pytest.raises(ConfigError) as err:
        load_config(text)
    message = str(err.value)
    assert "models-data-extractor" in message and "ModelList" in message
    assert "prometheus-data-source" in message and "PrometheusFamilies" in message


def test_default_config_wires_the_selective_parser():
    cfg = load_config()
    (w,) = cfg.sources
    assert w.source.plugin_type == "prometheus-data-source"
    assert w.source.wanted is not None and "vllm:num_requests_waiting" in w.source.wanted

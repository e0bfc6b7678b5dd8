"""The Prometheus text parser against prometheus_client's own exposition and parser."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families

from epp.bench.metric_pages import EngineState, sglang_page, vllm_page
from epp.datalayer.payloads import PrometheusFamilies
from epp.datalayer.promparse import PromParseError, parse

# --- generated pages ---------------------------------------------------------------------

_label_name = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,8}", fullmatch=True).filter(lambda s: s not in ("le", "quantile"))
_label_value = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**9), 10**9).map(float),
    st.sampled_from([0.0, -0.0, 1e-300, 1.5e300]),
)
_timestamp = st.one_of(st.none(), st.integers(0, 2_000_000_000_000).map(lambda ms: ms / 1000))
# prometheus_client's parser strips all Unicode whitespace around HELP text (Go keeps it), so
# the generated docs avoid control and separator characters except escaped ones.
_help = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")) | st.sampled_from(["\\", "\n", " "]),
    max_size=20,
).map(lambda s: s.strip(" "))


@st.composite
def _families(draw):
    """A list of prometheus_client metric families with distinct, non-colliding names."""
    n = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        kind = draw(st.sampled_from(["gauge", "counter", "histogram", "summary", "untyped"]))
        base = draw(st.from_regex(r"[a-zA-Z][a-zA-Z0-9:]{0,10}", fullmatch=True))
        name = f"m{i}_{base}x"  # unique, and never ends in a reserved suffix
        labels = draw(st.lists(_label_name, max_size=3, unique=True))
        doc = draw(_help)
        fam = {
            "gauge": lambda: GaugeMetricFamily(name, doc, labels=labels),
            "counter": lambda: CounterMetricFamily(name, doc, labels=labels),
            "histogram": lambda: HistogramMetricFamily(name, doc, labels=labels),
            "summary": lambda: SummaryMetricFamily(name, doc, labels=labels),
            "untyped": lambda: UnknownMetricFamily(name, doc, labels=labels),
        }[kind]()
        seen = set()
        for _ in range(draw(st.integers(0, 3))):
            lv = tuple(draw(_label_value) for _ in labels)
            if lv in seen:
                continue
            seen.add(lv)
            ts = draw(_timestamp)
            if kind == "histogram":
                counts = sorted(draw(st.lists(st.integers(0, 1000), min_size=1, max_size=4)))
                bounds = sorted(set(draw(st.lists(st.floats(-1e6, 1e6), min_size=len(counts) - 1,
                                                  max_size=len(counts) - 1))))
                les = [repr(b) for b in bounds] + ["+Inf"]
                buckets = list(zip(les, counts[-len(les):]))
                fam.add_metric(list(lv), buckets, draw(_value), timestamp=ts)
            elif kind == "summary":
                fam.add_metric(list(lv), draw(st.integers(0, 10**6)), draw(_value), timestamp=ts)
            else:
                fam.add_metric(list(lv), draw(_value), timestamp=ts)
        out.append(fam)
    return out


class _Static:
    def __init__(self, fams):
        self.fams = fams

    def collect(self):
        return self.fams


def _render(fams) -> str:
    reg = CollectorRegistry()
    reg.register(_Static(fams))
    return generate_latest(reg).decode("utf-8")


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _reference(text: str) -> dict[str, tuple[str, str, list]]:
    """prometheus_client's reading, renamed to exposition family names."""
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        typ = "untyped" if fam.type == "unknown" else fam.type
        out[name] = (typ, fam.documentation, [(s.name, dict(s.labels), float(s.value), s.timestamp)
                                              for s in fam.samples])
    return out


def _assert_matches(ours: PrometheusFamilies, ref: dict, only: set[str] | None = None) -> None:
    """Same families, types, samples; HELP text too, except in selective mode (not read)."""
    expected = {k: v for k, v in ref.items() if only is None or k in only}
    assert set(ours) == set(expected)
    for name, (typ, doc, samples) in expected.items():
        fam = ours[name]
        assert fam.type == typ, name
        assert fam.help == (doc if only is None else ""), name
        assert len(fam.samples) == len(samples), name
        for got, (sname, labels, value, ts) in zip(fam.samples, samples):
            assert got.name == sname
            assert dict(got.labels) == labels
            assert _same(got.value, value), (name, got.value, value)
            if ts is None:
                assert got.timestamp_ms is None
            else:
                assert got.timestamp_ms is not None and abs(got.timestamp_ms / 1000 - ts) < 1e-6


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_families())
def test_full_parse_matches_prometheus_client(fams):
    text = _render(fams)
    _assert_matches(parse(text), _reference(text))
    _assert_matches(parse(text.encode("utf-8")), _reference(text))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_families(), st.data())
def test_selective_parse_is_the_full_parse_restricted(fams, data):
    text = _render(fams)
    ref = _reference(text)
    wanted = set(data.draw(st.lists(st.sampled_from(sorted(ref)), unique=True, max_size=len(ref))))
    ours = parse(text, wanted)
    assert ours.complete is False
    _assert_matches(ours, ref, wanted)


def test_realistic_pages_match_prometheus_client():
    for page in (vllm_page(EngineState(running_adapters=("a", "b"), waiting_adapters=("c",))), sglang_page()):
        text = page.decode()
        _assert_matches(parse(page), _reference(text))


# --- hand-written cases ------------------------------------------------------------------

def test_untyped_series_comments_blank_and_indented_lines():
    text = (
        "# a free comment\n"
        "#no space comment\n"
        "\n\n\n"
        "plain 1\n"
        "  indented{a=\"b\"} 2 1700000000123\n"
        "\t\n"
        "with_ts 3 -5\n"
    )
    fams = parse(text)
    assert {n: f.type for n, f in fams.items()} == {"plain": "untyped", "indented": "untyped", "with_ts": "untyped"}
    assert fams["indented"].samples[0].labels == {"a": "b"}
    assert fams["indented"].samples[0].timestamp_ms == 1700000000123
    assert fams["with_ts"].samples[0].timestamp_ms == -5


def test_escapes_and_tricky_label_values():
    text = 'm{a="x\\\\y",b="q\\"uote",c="new\\nline",d="} 5 {",e="=,"} 7\n'
    labels = parse(text)["m"].samples[0].labels
    assert labels == {"a": "x\\y", "b": 'q"uote', "c": "new\nline", "d": "} 5 {", "e": "=,"}
    assert parse(text, ["m"])["m"].samples[0].value == 7


def test_special_values():
    fams = parse("a NaN\nb +Inf\nc -Inf\nd 1e3\ne -0.5\n")
    assert math.isnan(fams["a"].samples[0].value)
    assert fams["b"].samples[0].value == math.inf and fams["c"].samples[0].value == -math.inf
    assert fams["d"].samples[0].value == 1000.0 and fams["e"].samples[0].value == -0.5


def test_histogram_and_summary_series_belong_to_their_family():
    text = (
        "# TYPE h histogram\n"
        'h_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3\nh_count 2\n'
        "# TYPE s summary\n"
        's{quantile="0.5"} 1\ns_sum 4\ns_count 5\n'
        "# TYPE c counter\nc_total 9\n"
        "h_count_extra 1\n"
    )
    fams = parse(text)
    assert [s.name for s in fams["h"].samples] == ["h_bucket", "h_bucket", "h_sum", "h_count"]
    assert [s.name for s in fams["s"].samples] == ["s", "s_sum", "s_count"]
    assert fams["c"].type == "counter" and fams["c"].samples[0].name == "c_total"
    assert fams["h_count_extra"].type == "untyped"
    # selecting a suffixed series reads the histogram it belongs to
    sel = parse(text, ["h_count"])
    family, samples = sel.series("h_count")
    assert family.name == "h" and [s.value for s in samples] == [2.0]
    assert parse(text).series("c")[1][0].value == 9.0  # counter asked without _total
    assert parse(text).series("c_total")[1][0].value == 9.0


def test_selective_ignores_garbage_elsewhere_but_reports_bad_wanted_lines():
    text = "# TYPE good gauge\ngood{x=\"1\"} 4\nthis is { not prometheus\n"
    assert parse(text, ["good"])["good"].samples[0].value == 4
    with pytest.raises(PromParseError, match="line 3"):
        parse(text)
    with pytest.raises(PromParseError, match=r"line 2: invalid labels"):
        parse('# TYPE good gauge\ngood{x="1} 4\n', ["good"])


def test_prefix_names_do_not_shadow_each_other():
    text = "# TYPE w gauge\nw 1\n# TYPE w_by_reason gauge\nw_by_reason{r=\"a\"} 2\n"
    assert [s.value for s in parse(text, ["w"])["w"].samples] == [1.0]
    assert set(parse(text, ["w"])) == {"w"}
    assert [s.value for s in parse(text, ["w_by_reason"])["w_by_reason"].samples] == [2.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<html><body>502 Bad Gateway</body></html>", "line 1: invalid metric name"),
        ("m{a=\"b\"}\n", "line 1: missing value"),
        ("ok 1\nm 1 2 3\n", "line 2: unexpected text after value"),
        ("m abc\n", "line 1: invalid value 'abc'"),
        ("m 1_000\n", "invalid value"),
        ("m{a=b} 1\n", "invalid labels"),
        ("m{a=\"1\",a=\"2\"} 1\n", "duplicate label 'a'"),
        ("# TYPE m gouge\nm 1\n", "unknown metric type"),
        ("m 1 notatime\n", "invalid timestamp"),
    ],
)
def test_malformed_pages_name_the_problem(text, message):
    with pytest.raises(PromParseError, match=message):
        parse(text)


def test_selective_parse_rejects_a_page_that_is_not_prometheus():
    with pytest.raises(PromParseError, match="not Prometheus text format"):
        parse("<html><body>oops</body></html>\n", ["vllm:num_requests_waiting"])
    # an empty page or a page without the wanted family is not an error: just no data
    assert parse("", ["x"]) == {}
    assert parse("# TYPE other gauge\nother 1\n", ["x"]) == {}


def test_declared_family_without_samples_is_kept():
    fams = parse("# HELP e nothing yet\n# TYPE e gauge\n")
    assert fams["e"].type == "gauge" and fams["e"].samples == [] and fams["e"].help == "nothing yet"


def test_non_utf8_is_an_error():
    with pytest.raises(PromParseError, match="not UTF-8"):
        parse(b"m 1\n\xff\xfe\n")

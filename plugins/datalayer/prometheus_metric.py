"""``prometheus-metric``: copy one selected metric into ``Metrics.custom[key]``.

``metricName`` is a PromQL-style selector (``name{label="v"}``); several matching series
are combined with ``aggregate`` (max | sum | min | last). For info-style gauges, whose
information is in a label (``vllm:cache_config_info{num_gpu_blocks="8192"} 1``), ``label``
names the label whose value is taken instead of the sample value. Each write stamps
``Metrics.custom_time[key]``, which consumers use to judge staleness of that metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from epp.datalayer.endpoint import Endpoint
from epp.datalayer.errors import ExtractError
from epp.datalayer.payloads import PrometheusFamilies
from epp.datalayer.selector import MetricSelector, aggregate
from epp.framework import register
from epp.framework.datalayer import Extractor


@dataclass
class PrometheusMetricParams:
    metricName: str
    key: str = ""
    aggregate: Literal["max", "sum", "min", "last"] = "max"
    label: str = ""

    def validate(self) -> None:
        try:
            MetricSelector.parse(self.metricName)
        except ValueError as e:
            raise ValueError(f"'metricName': {e}") from None


@register("prometheus-metric")
class PrometheusMetricExtractor(Extractor):
    Params = PrometheusMetricParams
    input_type = PrometheusFamilies

    def __init__(self, name: str | None = None, params: PrometheusMetricParams | None = None) -> None:
        super().__init__(name, params)
        self.selector = MetricSelector.parse(self.params.metricName)
        self.key = self.params.key or self.selector.name

    def wanted_families(self) -> frozenset[str]:
        return frozenset({self.selector.name})

    def extract(self, data: PrometheusFamilies, endpoint: Endpoint) -> None:
        samples = self.selector.select(data)
        label = self.params.label
        if label:
            converted = []
            for s in samples:
                raw = s.labels.get(label)
                if raw is None:
                    raise ExtractError(f"{self.selector}: series has no label {label!r}")
                try:
                    converted.append(s._replace(value=float(raw)))
                except ValueError:
                    raise ExtractError(f"{self.selector}: label {label}={raw!r} is not a number") from None
            samples = converted
        value = aggregate(samples, self.params.aggregate, str(self.selector))
        endpoint.set_custom({self.key: value})

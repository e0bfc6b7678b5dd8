"""``models-data-source`` + ``models-data-extractor``: what each endpoint serves.

The source GETs ``/v1/models`` (OpenAI list: ``{"data": [{"id", "parent"?}, ...]}``) and
outputs a ``ModelList``; the extractor stores the entries, as a tuple of
``ModelInfo(id, parent)`` (parent None for a base model, the base for a LoRA adapter), in
the endpoint attribute ``/v1/models`` (upstream's key). It only swaps the attribute when
the list changed.

Upstream polls this on every collector tick like ``/metrics``; ``interval`` can make it
rarer (the list changes only when adapters are loaded or unloaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from epp.datalayer.endpoint import Endpoint, EndpointMetadata, now
from epp.datalayer.errors import DataSourceError
from epp.datalayer.payloads import ModelInfo, ModelList
from epp.framework import Duration, register
from epp.framework.datalayer import Extractor
from plugins.datalayer.http_source import HTTPDataSource, HTTPSourceParams

MODELS_ATTRIBUTE = "/v1/models"


@dataclass
class ModelsSourceParams(HTTPSourceParams):
    path: str = "/v1/models"
    maxBytes: int = 4 * 1024 * 1024
    interval: Duration = Duration(0.0)  # 0: every collector tick (upstream)


@register("models-data-source")
class ModelsDataSource(HTTPDataSource):
    Params = ModelsSourceParams
    output_type = ModelList
    accept = "application/json"

    def __init__(self, name: str | None = None, params: ModelsSourceParams | None = None) -> None:
        super().__init__(name, params)
        self._last: dict[str, float] = {}

    async def collect(self, endpoint: EndpointMetadata) -> ModelList | None:
        interval = float(self.params.interval)
        if interval > 0:
            t = now()
            if t - self._last.get(endpoint.key, float("-inf")) < interval:
                return None  # not due: the collector skips the extractors, no error
            self._last[endpoint.key] = t
        return await super().collect(endpoint)

    def decode(self, body: bytes, endpoint: EndpointMetadata) -> ModelList:
        return parse_models(body, self.url(endpoint))


def parse_models(body: bytes, where: str) -> ModelList:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataSourceError(f"{where}: not JSON: {e}") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise DataSourceError(f"{where}: expected an object with a 'data' list")
    models = []
    for i, item in enumerate(data):
        mid = item.get("id") if isinstance(item, dict) else None
        if not isinstance(mid, str) or not mid:
            raise DataSourceError(f"{where}: data[{i}] has no string 'id'")
        parent = item.get("parent")
        models.append(ModelInfo(mid, parent if isinstance(parent, str) and parent else None))
    return ModelList(doc, tuple(models))


@register("models-data-extractor")
class ModelsDataExtractor(Extractor):
    input_type = ModelList

    def extract(self, data: ModelList, endpoint: Endpoint) -> None:
        models: Any = data.models
        if endpoint.get_attribute(MODELS_ATTRIBUTE) != models:
            endpoint.set_attribute(MODELS_ATTRIBUTE, models)

"""Model-name rewriting: choose the target model, and undo it in the response body."""

from __future__ import annotations

import json
import random
from typing import Mapping

from epp.config.model import ModelRewrite
from epp.framework.headers import MODEL_REWRITE, control_header

# A rewrite whose ``match`` is this applies to every model without an exact rule: an
# InferenceModelRewrite rule with no ``matches`` (the config's ``match`` is never empty).
ANY_MODEL = ""


class ModelRewriter:
    """Header rewrite first, then the configured weighted rewrite of the incoming model."""

    def __init__(self, rewrites: Mapping[str, ModelRewrite], rng: random.Random | None = None) -> None:
        # The config keys rewrites by name; requests are matched by the incoming model.
        self._by_model: dict[str, tuple[str, ModelRewrite]] = {rw.match: (name, rw) for name, rw in rewrites.items()}
        self._rng = rng or random.Random()

    def target(self, incoming: str, headers: Mapping[str, str]) -> tuple[str, str | None]:
        """(target model, name of the config rule used or None)."""
        target = control_header(headers, MODEL_REWRITE) or incoming
        hit = self._by_model.get(incoming) or self._by_model.get(ANY_MODEL)
        if hit is None or not hit[1].targets:
            return target, None
        name, rw = hit
        weights = [max(0, t.weight) for t in rw.targets]
        if sum(weights) <= 0:
            chosen = self._rng.choice(rw.targets)  # all weights 0: uniform, as upstream
        else:
            chosen = self._rng.choices(rw.targets, weights=weights)[0]
        return chosen.model, name


def reserialize(payload: dict, target: str) -> bytes:
    """The body with ``model`` replaced (compact JSON, like upstream's re-marshalling)."""
    out = dict(payload)
    out["model"] = target
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


class ResponseModelReverser:
    """Puts the client's model name back in response bodies (``"model":"<target>"``).

    Works per chunk with a plain bytes replace (an occurrence split across two chunks is
    left as is, as upstream does); cheap enough for the per-token path.
    """

    __slots__ = ("_pairs",)

    def __init__(self, incoming: str, target: str) -> None:
        t = json.dumps(target).encode()
        i = json.dumps(incoming).encode()
        self._pairs = ((b'"model":' + t, b'"model":' + i), (b'"model": ' + t, b'"model": ' + i))

    def __call__(self, chunk: bytes) -> bytes:
        for old, new in self._pairs:
            if old in chunk:
                chunk = chunk.replace(old, new)
        return chunk

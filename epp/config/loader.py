"""Load an EndpointPickerConfig into a LoadedConfig.

Pipeline (upstream §2.2): parse YAML/JSON -> strict decode -> create plugins in list order
-> system defaults -> validate references and wire -> LoadedConfig. Every stage records
its problems and the next stage still runs on what was usable, so one load reports all
the errors it can find; the load fails with one ConfigError listing them.

Nothing but ConfigError escapes ``load_config``, whatever the input.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from epp.config.defaults import DEFAULT_CONFIG_TEXT, Defaults
from epp.config.errors import ConfigError, Problems
from epp.config.instantiate import PluginSet
from epp.config.model import InferenceObjective, LoadedConfig, ModelRewrite, ModelRewriteTarget
from epp.config.render import effective_document, flow_control_settings
from epp.config.schema import ConfigSpec, decode
from epp.config.wiring import Validator
from epp.config.yamlio import parse_document
from epp.framework.plugin import RuntimeSettings
from epp.framework.registry import Registry
from epp.framework.registry import registry as default_registry
from epp.framework.requestcontrol import (
    Admitter,
    PreRequest,
    ResponseComplete,
    ResponseReceived,
    ResponseStreaming,
)

if TYPE_CHECKING:
    from epp.datalayer.pool import EndpointPool

__all__ = ["DEFAULT_CONFIG_TEXT", "ConfigError", "load_config"]

log = logging.getLogger(__name__)


def load_config(
    text: str | None = None,
    *,
    path: str | None = None,
    settings: RuntimeSettings | None = None,
    pool: "EndpointPool | None" = None,
    registry: Registry | None = None,
) -> LoadedConfig:
    """Build the running configuration from ``text`` or the file at ``path``.

    Neither given: the built-in default configuration (upstream §2.5). Both given: error
    (like ``--config-file`` with ``--config-text``). ``pool`` is what plugins see as
    ``handle.pool`` (None for `epp check-config`). Warnings end up in ``.warnings``.
    Raises ConfigError listing every problem found.
    """
    if text is not None and path is not None:
        raise ConfigError(["both a config file and a config text were given; use only one"])
    if path is not None:
        text = _read(path)
    elif text is None:
        log.info("A configuration wasn't specified; the built-in default is used.")
        text = DEFAULT_CONFIG_TEXT
    problems = Problems()
    try:
        return _load(text, settings or RuntimeSettings(), pool, registry or default_registry, problems)
    except ConfigError as e:
        if not e.warnings:
            e.warnings = list(problems.warnings)
        raise
    except RecursionError:
        raise ConfigError(problems.errors + ["configuration is nested too deeply"], problems.warnings) from None
    except Exception as e:  # a loader bug must still not crash the caller with a traceback
        log.exception("internal error while loading the configuration")
        raise ConfigError(
            problems.errors + [f"internal error while loading the configuration: {type(e).__name__}: {e}"],
            problems.warnings,
        ) from e


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"cannot read config file '{path}': {e.strerror or e}"]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError([f"config file '{path}' is not UTF-8 text: {e.reason} at byte {e.start}"]) from None


def _load(
    text: str, settings: RuntimeSettings, pool: "EndpointPool | None", registry: Registry, problems: Problems
) -> LoadedConfig:
    doc = parse_document(text)
    spec = decode(doc, problems)
    if not spec.recognized:
        problems.raise_if_any()  # not an EndpointPickerConfig: checking plugins would only add noise
    try:
        registry.load()
    except Exception as e:  # a broken built-in module: say which, do not crash
        raise ConfigError([f"failed to load the built-in plugins: {type(e).__name__}: {e}"], problems.warnings) from e

    plugins = PluginSet(registry, problems, settings, pool)
    created = []
    for entry in spec.plugins:
        if plugins.create(entry) is None:
            spec.broken_names.add(entry.name)
        else:
            created.append(entry)
    spec.plugins = created
    Defaults(spec, plugins, problems, next_index=_next_index(doc)).apply()
    wiring = Validator(spec, plugins, problems).run()
    problems.raise_if_any()

    for w in wiring.sources:
        try:
            w.source.bind(w.extractors)
        except Exception as e:
            problems.error(_source_path(spec, w.source.name), f"data source '{w.source.name}' rejected its extractors: {e}")
    problems.raise_if_any()

    assert wiring.profile_handler is not None and wiring.parser is not None and wiring.saturation_detector is not None
    # The section as the effective document shows it (also with the gate off: it is checked)
    flow_doc = (
        flow_control_settings(spec.flow_control, gate="flowControl" in spec.feature_gates)
        if spec.flow_control is not None or "flowControl" in spec.feature_gates
        else None
    )
    everything = list(plugins.by_name.values())
    return LoadedConfig(
        document=effective_document(spec, wiring, flow_doc),
        plugins=dict(plugins.by_name),
        profiles=wiring.profiles,
        profile_handler=wiring.profile_handler,
        parser=wiring.parser,
        saturation_detector=wiring.saturation_detector,
        sources=wiring.sources,
        producers=wiring.producers,
        admitters=[p for p in everything if isinstance(p, Admitter)],
        pre_request=[p for p in everything if isinstance(p, PreRequest)],
        response_received=[p for p in everything if isinstance(p, ResponseReceived)],
        response_streaming=[p for p in everything if isinstance(p, ResponseStreaming)],
        response_complete=[p for p in everything if isinstance(p, ResponseComplete)],
        feature_gates=list(spec.feature_gates),
        flow_control=wiring.flow_control,
        objectives={o.name: InferenceObjective(o.name, o.priority) for o in spec.objectives},
        model_rewrites={
            r.match: ModelRewrite(r.match, tuple(ModelRewriteTarget(m, w) for m, w in r.targets)) for r in spec.rewrites
        },
        warnings=list(problems.warnings),
        discovery=wiring.discovery,
    )


def _next_index(doc: Any) -> int:
    items = doc.get("plugins") if isinstance(doc, dict) else None
    return len(items) if isinstance(items, list) else 0


def _source_path(spec: ConfigSpec, name: str) -> str:
    for s in spec.data_layer.sources:
        if s.ref == name:
            return s.path
    return spec.data_layer.key

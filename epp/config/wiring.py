"""Validation of the references between plugins (upstream §2.4 and the data-layer rules),
and wiring the created plugins into profiles, data sources, hooks and producers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epp.config.defaults import DEFAULT_FAIRNESS_POLICY, DEFAULT_ORDERING_POLICY, DEFAULT_USAGE_LIMIT_POLICY, data_keys
from epp.config.errors import Problems
from epp.config.instantiate import PluginSet
from epp.config.kinds import SCHEDULING_KINDS, describe_kinds, kinds_of
from epp.config.model import SourceWiring
from epp.config.schema import ConfigSpec, FlowControlSpec, PriorityBand
from epp.flowcontrol.settings import (
    DEFAULT_BAND_MAX_BYTES,
    DEFAULT_BAND_MAX_REQUESTS,
    DEFAULT_REQUEST_TTL,
    BandSettings,
    FlowControlSettings,
)
from epp.framework.datalayer import DataSource, Discovery, Extractor, type_label
from epp.framework.flowcontrol import FairnessPolicy, OrderingPolicy, UsageLimitPolicy
from epp.framework.plugin import Plugin
from epp.framework.requestcontrol import DataProducer, Parser, SaturationDetector
from epp.framework.scheduling import Filter, Picker, ProfileHandler, Scorer
from epp.scheduling.profile import SchedulingProfile, WeightedScorer


@dataclass
class Wiring:
    """What validation resolved; turned into a LoadedConfig when there were no errors."""

    profiles: dict[str, SchedulingProfile] = field(default_factory=dict)
    # profile name -> [(pluginRef, weight or None)] as the effective document shows them
    profile_refs: dict[str, list[tuple[str, float | None]]] = field(default_factory=dict)
    profile_handler: ProfileHandler | None = None
    parser: Parser | None = None
    saturation_detector: SaturationDetector | None = None
    sources: list[SourceWiring] = field(default_factory=list)
    discovery: Discovery | None = None
    producers: list[DataProducer] = field(default_factory=list)
    flow_control: FlowControlSettings | None = None  # set when the flowControl gate is on


class Validator:
    def __init__(self, spec: ConfigSpec, plugins: PluginSet, problems: Problems) -> None:
        self.spec = spec
        self.plugins = plugins
        self.problems = problems
        self.out = Wiring()

    def run(self) -> Wiring:
        self._profiles()
        self._profile_handler()
        self.out.parser = self._single_ref(self.spec.parser_ref, "parser.pluginRef", Parser, "parser")
        self.out.saturation_detector = self._single_ref(
            self.spec.saturation_ref, self.spec.saturation_path, SaturationDetector, "saturation detector"
        )
        self._data_layer()
        self._flow_control()
        self._producers()
        self._unused()
        return self.out

    # -- helpers

    def _resolve(self, ref: str, path: str) -> Plugin | None:
        plugin = self.plugins.by_name.get(ref)
        if plugin is None and ref not in self.spec.broken_names:
            self.problems.error(path, f"references undefined plugin '{ref}'")
        return plugin

    def _label(self, plugin: Plugin) -> str:
        entry = self.plugins.entries.get(plugin.name)
        return entry.label() if entry else f"plugin '{plugin.name}'"

    def _single_ref(self, ref: str | None, path: str, cls: type, what: str) -> Any:
        if not ref:
            return None
        plugin = self._resolve(ref, path)
        if plugin is None:
            return None
        if not isinstance(plugin, cls):
            self.problems.error(path, f"{self._label(plugin)} is not a {what} plugin (it {describe_kinds(plugin)})")
            return None
        return plugin

    # -- scheduling

    def _profiles(self) -> None:
        for profile in self.spec.profiles:
            built = SchedulingProfile(profile.name)
            refs: list[tuple[str, float | None]] = []
            seen: set[str] = set()
            for r in profile.refs:
                plugin = self._resolve(r.ref, r.path)
                if plugin is None:
                    continue
                if r.ref in seen:
                    self.problems.error(r.path, f"plugin '{r.ref}' is listed more than once in profile '{profile.name}'")
                    continue
                seen.add(r.ref)
                if not isinstance(plugin, SCHEDULING_KINDS):
                    self.problems.error(
                        r.path,
                        f"{self._label(plugin)} cannot be used in a scheduling profile: it {describe_kinds(plugin)}, "
                        "not a filter, scorer or picker",
                    )
                    continue
                if isinstance(plugin, Picker):
                    if built.picker is not None:
                        self.problems.error(
                            r.path,
                            f"cannot set '{r.ref}' as the picker of profile '{profile.name}': "
                            f"it already has picker '{built.picker.name}' (one picker per profile)",
                        )
                        continue
                    built.picker = plugin
                if isinstance(plugin, Filter):
                    built.filters.append(plugin)
                weight: float | None = None
                if isinstance(plugin, Scorer):
                    weight = 1.0 if r.weight is None else r.weight
                    if weight < 0:
                        self.problems.warn(r.path, f"negative weight {weight:g} for scorer '{r.ref}' turns high scores into penalties")
                    built.scorers.append(WeightedScorer(plugin, weight))
                elif r.weight is not None:
                    self.problems.warn(f"{r.path}.weight", f"ignored: '{r.ref}' is not a scorer")
                refs.append((r.ref, weight))
            self.out.profiles[profile.name] = built
            self.out.profile_refs[profile.name] = refs

    def _profile_handler(self) -> None:
        handlers = [p for p in self.plugins.by_name.values() if isinstance(p, ProfileHandler)]
        n_profiles = len(self.spec.profiles)
        if len(handlers) > 1:
            names = ", ".join(f"'{h.name}'" for h in handlers)
            path = self.plugins.entries[handlers[1].name].path
            self.problems.error(path, f"multiple profile handlers found ({names}); only one is allowed")
            return
        if not handlers:
            if n_profiles > 1:
                self.problems.error(
                    "schedulingProfiles",
                    f"no profile handler configured: {n_profiles} profiles need a profile handler plugin to choose between them",
                )
            return
        handler = handlers[0]
        limit = getattr(handler, "max_profiles", None)
        if isinstance(limit, int) and n_profiles > limit:
            self.problems.error(
                self.plugins.entries[handler.name].path,
                f"profile handler {self._label(handler)} supports at most {limit} scheduling "
                f"profile{'s' if limit != 1 else ''}, but {n_profiles} are configured",
            )
            return
        self.out.profile_handler = handler

    # -- data layer

    def _data_layer(self) -> None:
        dl = self.spec.data_layer
        seen_sources: set[str] = set()
        for s in dl.sources:
            path = f"{s.path}.pluginRef"
            source = self._resolve(s.ref, path)
            if source is None:
                continue
            if not isinstance(source, DataSource):
                self.problems.error(path, f"{self._label(source)} is not a data source (it {describe_kinds(source)})")
                continue
            if s.ref in seen_sources:
                self.problems.error(path, f"data source '{s.ref}' is listed more than once")
                continue
            seen_sources.add(s.ref)
            extractors: list[Extractor] = []
            for epath, eref in s.extractors:
                epath = f"{epath}.pluginRef"
                ex = self._resolve(eref, epath)
                if ex is None:
                    continue
                if not isinstance(ex, Extractor):
                    self.problems.error(epath, f"{self._label(ex)} is not an extractor (it {describe_kinds(ex)})")
                    continue
                if ex in extractors:
                    self.problems.error(epath, f"extractor '{eref}' is listed more than once for data source '{s.ref}'")
                    continue
                if not _compatible(source.output_type, ex.input_type):
                    self.problems.error(
                        epath,
                        f"extractor {self._label(ex)} expects input of type {type_label(ex.input_type)}, "
                        f"but data source {self._label(source)} produces {type_label(source.output_type)}",
                    )
                    continue
                extractors.append(ex)
            self.out.sources.append(SourceWiring(source, tuple(extractors)))
        # With injectDefaults on, an empty list means the defaults could not be added (reported already).
        if not dl.sources and not dl.inject_defaults:
            self.problems.error(
                dl.key,
                "data layer enabled but no data sources configured "
                "(injectDefaults is false and 'sources' is empty; endpoints would never get metrics)",
            )
        if dl.discovery_ref:
            self.out.discovery = self._single_ref(dl.discovery_ref, f"{dl.discovery_path}.pluginRef", Discovery, "discovery")

    # -- flow control

    def _flow_control(self) -> None:
        fc = self.spec.flow_control
        if "flowControl" not in self.spec.feature_gates:
            if fc is not None:  # still checked, so that turning the gate on later cannot fail
                self._resolve_flow_control(fc, build=False)
            return
        self.out.flow_control = self._resolve_flow_control(fc or FlowControlSpec(), build=True)

    def _resolve_flow_control(self, fc: FlowControlSpec, *, build: bool) -> FlowControlSettings | None:
        """Check every policy reference; with ``build``, also the defaults, and return the settings."""

        def policy(ref: str | None, default: str, path: str, cls: type, role: str) -> Any:
            if not ref and not build:
                return None  # the gate is off: the defaults were not added, nothing to check
            return self._policy(ref or default, path, cls, role)

        usage = policy(fc.usage_limit_ref, DEFAULT_USAGE_LIMIT_POLICY, "flowControl.usageLimitPolicyPluginRef",
                       UsageLimitPolicy, "usage limit")

        def band(b: PriorityBand | None, path: str, priority: int | None) -> BandSettings | None:
            b = b or PriorityBand(path)
            fairness = policy(b.fairness_ref, DEFAULT_FAIRNESS_POLICY, f"{path}.fairnessPolicyRef",
                              FairnessPolicy, "fairness")
            ordering = policy(b.ordering_ref, DEFAULT_ORDERING_POLICY, f"{path}.orderingPolicyRef",
                              OrderingPolicy, "ordering")
            if fairness is None or ordering is None:
                return None
            return BandSettings(priority, fairness, ordering, b.max_bytes or DEFAULT_BAND_MAX_BYTES,
                                b.max_requests or DEFAULT_BAND_MAX_REQUESTS)

        template = band(fc.default_band, "flowControl.defaultPriorityBand", None)
        negative = band(fc.negative_band, "flowControl.defaultNegativePriorityBand", None) if fc.negative_band else None
        bands = [band(b, b.path, b.priority) for b in fc.bands]
        detector = self.out.saturation_detector
        if not build or usage is None or template is None or detector is None or None in bands:
            return None
        ttl = DEFAULT_REQUEST_TTL if fc.default_request_ttl is None else fc.default_request_ttl
        return FlowControlSettings(
            detector=detector, usage_limit=usage, default_band=template, negative_band=negative,
            bands=tuple(b for b in bands if b is not None), max_bytes=fc.max_bytes or 0,
            max_requests=fc.max_requests or 0, default_ttl=ttl,
            no_endpoint_ttl=ttl if fc.no_endpoint_ttl is None else fc.no_endpoint_ttl,
            enable_eviction=fc.enable_eviction,
        )

    def _policy(self, ref: str, path: str, cls: type, role: str) -> Any:
        plugin = self._resolve(ref, path)
        if plugin is None:
            return None
        if not isinstance(plugin, cls):
            self.problems.error(path, f"{self._label(plugin)} is not a flow-control {role} policy "
                                      f"(it {describe_kinds(plugin)})")
            return None
        return plugin

    # -- producers

    def _producers(self) -> None:
        producers = [p for p in self.plugins.by_name.values() if isinstance(p, DataProducer)]
        makers: dict[str, list[DataProducer]] = {}
        for p in producers:
            for key in data_keys(p, "produces"):
                makers.setdefault(key, []).append(p)
        deps = {p.name: {m.name for k in data_keys(p, "consumes") for m in makers.get(k, ())} for p in producers}
        order: list[DataProducer] = []
        done: set[str] = set()
        pending = list(producers)
        while pending:
            ready = [p for p in pending if deps[p.name] <= done]
            if not ready:
                names = ", ".join(f"'{p.name}'" for p in pending)
                path = self.plugins.entries[pending[0].name].path
                self.problems.error(path, f"data producers form a dependency cycle (produces/consumes) among {names}")
                return
            for p in ready:
                order.append(p)
                done.add(p.name)
            pending = [p for p in pending if p.name not in done]
        self.out.producers = order

    # -- advice

    def _unused(self) -> None:
        in_profiles = {ref for refs in self.out.profile_refs.values() for ref, _ in refs}
        wired = {w.source.name for w in self.out.sources} | {e.name for w in self.out.sources for e in w.extractors}
        for name, plugin in self.plugins.by_name.items():
            kinds = kinds_of(plugin)
            entry = self.plugins.entries[name]
            if kinds and all(k in ("filter", "scorer", "picker") for k in kinds) and name not in in_profiles:
                self.problems.warn(entry.path, f"{entry.label()} is not used by any scheduling profile")
            elif kinds and all(k in ("data source", "extractor") for k in kinds) and name not in wired:
                self.problems.warn(entry.path, f"{entry.label()} is not wired in {self.spec.data_layer.key}.sources and will not run")




def _compatible(output_type: Any, input_type: Any) -> bool:
    try:
        return issubclass(output_type, input_type)
    except TypeError:  # not classes (e.g. typing constructs): only identity is meaningful
        return output_type is input_type or input_type is object

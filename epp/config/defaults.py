"""The built-in default configuration and the system defaults every config gets (upstream §2.3).

A default plugin is created with no parameters and ``name = type``, and appended to the
plugin list, so the effective config (``epp check-config``) shows it like any other.
"""

from __future__ import annotations

from epp.config.errors import Problems
from epp.config.instantiate import PluginSet
from epp.config.schema import (
    DEFAULT_FAIRNESS_POLICY,
    DEFAULT_ORDERING_POLICY,
    DEFAULT_USAGE_LIMIT_POLICY,
    ConfigSpec,
    PluginEntry,
    Profile,
    ProfileRef,
    SourceEntry,
)
from epp.framework.datalayer import DataSource
from epp.framework.plugin import Plugin
from epp.framework.requestcontrol import DataProducer
from epp.framework.scheduling import Filter, Picker, ProfileHandler, Scorer

DEFAULT_PROFILE = "default"
DEFAULT_PROFILE_HANDLER = "single-profile-handler"
DEFAULT_PICKER = "max-score-picker"
DEFAULT_PARSER = "openai-parser"
DEFAULT_SATURATION_DETECTOR = "utilization-detector"
DEFAULT_METRICS_SOURCE = "metrics-data-source"
DEFAULT_METRICS_EXTRACTOR = "core-metrics-extractor"
# Added when the flowControl gate is on and a band or the section does not name its own.
FLOW_CONTROL_DEFAULTS = (DEFAULT_ORDERING_POLICY, DEFAULT_FAIRNESS_POLICY, DEFAULT_USAGE_LIMIT_POLICY)
# Ours, not upstream's: takes an endpoint the proxy could not reach out of scheduling at once.
DEFAULT_UNREACHABLE_DETECTOR = "unreachable-endpoint-detector"

# Upstream's built-in configuration (§2.5), used when neither --config-file nor --config-text is given.
DEFAULT_CONFIG_TEXT = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors:
    - pluginRef: core-metrics-extractor
"""


class Defaults:
    """Applies the system defaults to a decoded spec whose plugins were created."""

    def __init__(self, spec: ConfigSpec, plugins: PluginSet, problems: Problems, next_index: int) -> None:
        self.spec = spec
        self.plugins = plugins
        self.problems = problems
        self.next_index = next_index

    def add(self, type_name: str, reason: str) -> Plugin | None:
        """Append a default plugin named after its type, unless a plugin has that name."""
        existing = self.plugins.by_name.get(type_name)
        if existing is not None or type_name in self.spec.broken_names:
            return existing
        entry = PluginEntry(index=self.next_index, name=type_name, type=type_name, added_because=reason)
        self.next_index += 1
        plugin = self.plugins.create(entry)
        if plugin is None:
            self.spec.broken_names.add(type_name)  # reported once; references to it stay quiet
            return None
        self.spec.plugins.append(entry)
        return plugin

    def apply(self) -> None:
        self._scheduling()
        self._flow_control()
        self._parser()
        self._saturation_detector()
        self._data_layer()
        self._producers()
        self._passive_health()

    def _of(self, cls: type) -> list[Plugin]:
        return [p for p in self.plugins.by_name.values() if isinstance(p, cls)]

    def _scheduling(self) -> None:
        spec = self.spec
        if not spec.profiles:
            profile = Profile(path="schedulingProfiles", name=DEFAULT_PROFILE, added_by_default=True)
            for p in self.plugins.by_name.values():
                if isinstance(p, (Filter, Scorer, Picker)):
                    profile.refs.append(ProfileRef(f"schedulingProfiles[0].plugins[{len(profile.refs)}]", p.name))
            spec.profiles.append(profile)
        if len(spec.profiles) == 1 and not self._of(ProfileHandler):
            self.add(DEFAULT_PROFILE_HANDLER, "one scheduling profile and no profile handler")
        pickers = self._of(Picker)
        if not pickers:
            picker = self.add(DEFAULT_PICKER, "no picker is configured")
            pickers = [picker] if picker is not None else []
        if not pickers:
            return
        for profile in spec.profiles:
            has_picker = any(isinstance(self.plugins.by_name.get(r.ref), Picker) for r in profile.refs)
            if not has_picker:
                profile.refs.append(ProfileRef(f"{profile.path}.plugins[{len(profile.refs)}]", pickers[0].name))

    def _flow_control(self) -> None:
        fc = self.spec.flow_control
        bands = [] if fc is None else [b for b in (*fc.bands, fc.default_band, fc.negative_band) if b is not None]
        # Beyond upstream: a reference to a policy *type* nobody declared gets an instance with
        # default parameters (upstream requires a plugins entry for it).
        refs = [b.fairness_ref for b in bands] + [b.ordering_ref for b in bands] + [fc.usage_limit_ref if fc else None]
        for ref in refs:
            if ref and ref not in self.plugins.by_name and ref in self.plugins.registry:
                self.add(ref, "referenced by flowControl")
        if "flowControl" not in self.spec.feature_gates:
            return
        template_given = fc is not None and fc.default_band is not None
        needed = {
            DEFAULT_FAIRNESS_POLICY: not template_given or any(not b.fairness_ref for b in bands),
            DEFAULT_ORDERING_POLICY: not template_given or any(not b.ordering_ref for b in bands),
            DEFAULT_USAGE_LIMIT_POLICY: fc is None or not fc.usage_limit_ref,
        }
        for policy in FLOW_CONTROL_DEFAULTS:
            if needed[policy]:
                self.add(policy, "flow-control default")

    def _parser(self) -> None:
        if self.spec.parser_ref is None:
            self.spec.parser_ref = DEFAULT_PARSER
        if self.spec.parser_ref == DEFAULT_PARSER:
            self.add(DEFAULT_PARSER, "no parser is configured")

    def _saturation_detector(self) -> None:
        if self.spec.saturation_ref is None:
            self.spec.saturation_ref = DEFAULT_SATURATION_DETECTOR
        if self.spec.saturation_ref == DEFAULT_SATURATION_DETECTOR:
            self.add(DEFAULT_SATURATION_DETECTOR, "no saturation detector is configured")

    def _data_layer(self) -> None:
        """Make sure the standard metrics get scraped, unless ``injectDefaults: false``.

        Deviation from upstream, which keys on the source *name*: a source of the default
        metrics type under any name or alias gets the core extractor added to it instead
        of a second source scraping the same /metrics page every tick.
        """
        dl = self.spec.data_layer
        if not dl.inject_defaults:
            return
        default_cls = self._registered_class(DEFAULT_METRICS_SOURCE)
        target: SourceEntry | None = None
        for s in dl.sources:
            plugin = self.plugins.by_name.get(s.ref)
            if s.ref == DEFAULT_METRICS_SOURCE or (
                default_cls is not None and isinstance(plugin, DataSource) and type(plugin) is default_cls
            ):
                target = s
                break
        if target is not None:
            wired = {self.plugins.by_name.get(ref) for _, ref in target.extractors}
            extractor_cls = self._registered_class(DEFAULT_METRICS_EXTRACTOR)
            if any(ref == DEFAULT_METRICS_EXTRACTOR for _, ref in target.extractors) or (
                extractor_cls is not None and any(type(p) is extractor_cls for p in wired if p is not None)
            ):
                return
            if self.add(DEFAULT_METRICS_EXTRACTOR, "dataLayer.injectDefaults is true"):
                target.extractors.append((f"{target.path}.extractors[{len(target.extractors)}]", DEFAULT_METRICS_EXTRACTOR))
            return
        reason = "dataLayer.injectDefaults is true"
        source = self.add(DEFAULT_METRICS_SOURCE, reason)
        extractor = self.add(DEFAULT_METRICS_EXTRACTOR, reason)
        if source is not None and extractor is not None:
            path = f"{dl.key}.sources[{len(dl.sources)}]"
            dl.sources.append(SourceEntry(path, DEFAULT_METRICS_SOURCE, [(f"{path}.extractors[0]", DEFAULT_METRICS_EXTRACTOR)]))

    def _passive_health(self) -> None:
        """Every config gets the unreachable-endpoint detector (configure it with ``enabled:
        false`` to opt out); one declared under any name counts."""
        cls = self._registered_class(DEFAULT_UNREACHABLE_DETECTOR)
        if cls is None or any(type(p) is cls for p in self.plugins.by_name.values()):
            return
        self.add(DEFAULT_UNREACHABLE_DETECTOR, "passive health checking (not in upstream)")

    def _registered_class(self, type_name: str) -> type | None:
        if type_name not in self.plugins.registry:
            return None
        return self.plugins.registry.get(type_name).cls

    def _producers(self) -> None:
        """Create the registered default producer of every data key a plugin consumes."""
        for _ in range(64):  # producers may consume too; a fixed point is reached quickly
            produced: set[str] = set()
            for p in self._of(DataProducer):
                produced |= data_keys(p, "produces")
            added = False
            for name, p in list(self.plugins.by_name.items()):
                for key in sorted(data_keys(p, "consumes") - produced):
                    producer_type = self.plugins.registry.default_producer(key)
                    entry = self.plugins.entries[name]
                    if producer_type is None:
                        self.problems.error(
                            entry.path,
                            f"{entry.label()} consumes data '{key}', but no configured plugin produces it "
                            "and no default producer is registered for it",
                        )
                        produced.add(key)
                        continue
                    existing = self.plugins.by_name.get(producer_type)
                    if existing is not None:
                        if key not in data_keys(existing, "produces"):
                            self.problems.error(
                                entry.path,
                                f"{entry.label()} consumes data '{key}', whose default producer "
                                f"'{producer_type}' is configured but does not produce it",
                            )
                        produced.add(key)
                        continue
                    producer = self.add(producer_type, f"'{name}' consumes '{key}'")
                    produced.add(key)
                    if producer is not None:
                        produced |= data_keys(producer, "produces")
                        added = True
            if not added:
                return


def data_keys(plugin: object, attr: str) -> set[str]:
    value = getattr(plugin, attr, None)
    if not value or isinstance(value, (str, bytes)):
        return {value} if isinstance(value, str) and value else set()
    try:
        return {k for k in value if isinstance(k, str)}
    except TypeError:
        return set()

"""Filters: label selectors, the llm-d role filters, and the conformance header filter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from epp.framework import Filter, register
from epp.framework.scheduling import CycleState
from epp.framework.types import Candidate, InferenceRequest

# --- Kubernetes label selector --------------------------------------------------------------


@dataclass
class LabelSelectorRequirement:
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.key:
            raise ValueError("'key' must not be empty")
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator '{self.operator}' needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator '{self.operator}' takes no values")

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == "Exists":
            return self.key in labels
        if op == "DoesNotExist":
            return self.key not in labels
        value = labels.get(self.key)
        if op == "In":
            return value is not None and value in self.values
        return value is None or value not in self.values  # NotIn also matches an absent label (Kubernetes)


@dataclass
class LabelSelectorParams:
    matchLabels: dict[str, str] = field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = field(default_factory=list)

    def validate(self) -> None:
        for i, req in enumerate(self.matchExpressions):
            try:
                req.validate()
            except ValueError as e:
                raise ValueError(f"matchExpressions[{i}]: {e}") from None


@register("label-selector-filter", aliases=("by-label-selector",))
class LabelSelectorFilter(Filter):
    """Keeps endpoints whose labels match a Kubernetes label selector (empty selector: all)."""

    Params = LabelSelectorParams

    def matches(self, labels: Mapping[str, str]) -> bool:
        p: LabelSelectorParams = self.params
        for k, v in p.matchLabels.items():
            if labels.get(k) != v:
                return False
        return all(req.matches(labels) for req in p.matchExpressions)

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> list[Candidate]:
        p: LabelSelectorParams = self.params
        if not p.matchLabels and not p.matchExpressions:
            return candidates
        return [c for c in candidates if self.matches(c.metadata.labels)]


@dataclass
class ByLabelParams:
    label: str
    validValues: list[str] = field(default_factory=list)
    allowsNoLabel: bool = False

    def validate(self) -> None:
        if not self.label:
            raise ValueError("'label' must not be empty")
        if not self.validValues and not self.allowsNoLabel:
            raise ValueError("'validValues' must not be empty unless 'allowsNoLabel' is true")


@register("by-label")
class ByLabelFilter(Filter):
    """Keeps endpoints whose ``label`` has one of ``validValues`` (or no such label, if allowed)."""

    Params = ByLabelParams

    def __init__(self, name: str | None = None, params: ByLabelParams | None = None) -> None:
        super().__init__(name, params)
        self._valid = frozenset(self.params.validValues)

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> list[Candidate]:
        label, valid, allow_none = self.params.label, self._valid, self.params.allowsNoLabel
        out = []
        for c in candidates:
            value = c.metadata.labels.get(label)
            if value is None:
                if allow_none:
                    out.append(c)
            elif value in valid:
                out.append(c)
        return out


# --- llm-d roles --------------------------------------------------------------------------

ROLE_LABEL = "llm-d.ai/role"


class _RoleFilter(Filter):
    roles: frozenset[str] = frozenset()
    keep_unlabelled = False

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> list[Candidate]:
        roles, keep_none = self.roles, self.keep_unlabelled
        out = []
        for c in candidates:
            role = c.metadata.labels.get(ROLE_LABEL)
            if (role is None and keep_none) or role in roles:
                out.append(c)
        return out


@register("decode-filter")
class DecodeFilter(_RoleFilter):
    """Decode-capable endpoints; an endpoint without a role label counts as decode."""

    roles = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
    keep_unlabelled = True


@register("prefill-filter")
class PrefillFilter(_RoleFilter):
    roles = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})


@register("encode-filter")
class EncodeFilter(_RoleFilter):
    roles = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


# --- conformance ---------------------------------------------------------------------------

TEST_SELECTION_HEADER = "test-epp-endpoint-selection"


def split_host_port(item: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort: ``host:port`` or ``[v6]:port``; None when there is no port part."""
    if item.startswith("["):
        end = item.find("]")
        if end < 0 or not item[end + 1:].startswith(":"):
            return None
        return item[1:end], item[end + 2:]
    if item.count(":") != 1:
        return None  # no port, or a bare IPv6 address
    host, port = item.split(":")
    return host, port


def _bare_ip(addr: str) -> str:
    return addr.strip().strip("[]")


@register("header-based-testing-filter")
class HeaderBasedTestingFilter(Filter):
    """Keeps the endpoints named in ``test-epp-endpoint-selection`` (conformance tests).

    The header is a comma list of ``ip`` or ``ip:port``. ``ip:port`` must match exactly; a
    bare ip (IPv6 brackets optional) selects one endpoint with that ip. Results are
    de-duplicated by ip and kept in header order. No header, or a blank one, selects
    nothing (the profile then fails), as upstream.
    """

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Candidate]) -> list[Candidate]:
        value = request.headers.get(TEST_SELECTION_HEADER)
        if value is None or not value.strip():
            return []
        by_ip: dict[str, Candidate] = {}
        by_host_port: dict[str, Candidate] = {}
        for c in candidates:
            ip = _bare_ip(c.metadata.address)
            if not ip:
                continue
            by_ip[ip] = c
            by_host_port[f"{ip}:{c.metadata.port}"] = c
        out: list[Candidate] = []
        seen: set[str] = set()
        for raw in value.split(","):
            item = raw.strip()
            if not item:
                continue
            hp = split_host_port(item)
            if hp is not None and hp[1]:
                chosen = by_host_port.get(f"{_bare_ip(hp[0])}:{hp[1]}")
            else:
                chosen = by_ip.get(_bare_ip(hp[0] if hp is not None else item))
            if chosen is not None:
                ip = _bare_ip(chosen.metadata.address)
                if ip not in seen:
                    seen.add(ip)
                    out.append(chosen)
        return out

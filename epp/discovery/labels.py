"""Kubernetes label selectors: the text syntax (``--endpoint-selector``) and matching.

Grammar (as ``k8s.io/apimachinery/pkg/labels.Parse``), requirements joined by commas, all
must hold::

    key            key exists              !key           key does not exist
    key=v, key==v  equal                   key!=v         not equal (or absent)
    key in (a,b)   one of                  key notin (a,b)  none of (or absent)
    key>3, key<3   integer comparison (the value must parse as an integer)

``selector_from_match_labels`` turns a pool's ``matchLabels`` map into the same form, and
``str(selector)`` renders the canonical text sent to the API server as ``labelSelector``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

# A qualified name with an optional DNS-subdomain prefix (``llm-d.ai/role``), as Kubernetes
# accepts for label keys; values are 0-63 characters of the same alphabet.
_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY_RE = re.compile(rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}")
_VALUE_RE = re.compile(rf"(?:{_NAME})?")
_TOKEN_RE = re.compile(r"\s*(\(|\)|,|==|!=|=|!|>|<|[^\s(),=!<>]+)")


class SelectorError(ValueError):
    """The selector text is not valid; the message says where."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "exists" "!exists" "=" "!=" "in" "notin" ">" "<"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op, present = self.op, self.key in labels
        if op == "exists":
            return present
        if op == "!exists":
            return not present
        if op in ("=", "in"):
            return present and labels[self.key] in self.values
        if op in ("!=", "notin"):
            return not present or labels[self.key] not in self.values
        if not present:
            return False
        try:
            have = int(labels[self.key])
        except ValueError:
            return False
        want = int(self.values[0])
        return have > want if op == ">" else have < want

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "!exists":
            return f"!{self.key}"
        if self.op in ("in", "notin"):
            return f"{self.key} {self.op} ({','.join(sorted(self.values))})"
        return f"{self.key}{self.op}{self.values[0]}"


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def selector_from_match_labels(match_labels: Mapping[str, str]) -> LabelSelector:
    return LabelSelector(tuple(Requirement(k, "=", (str(v),)) for k, v in sorted(match_labels.items())))


def parse_selector(text: str) -> LabelSelector:
    """Parse the text form; raises SelectorError naming the offending part."""
    tokens = [m.group(1) for m in _TOKEN_RE.finditer(text)]
    reqs: list[Requirement] = []
    i = 0

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise SelectorError(f"label selector {text!r}: {what}")

    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            need(i + 1 < len(tokens), "'!' must be followed by a key")
            key = _key(tokens[i + 1], text)
            reqs.append(Requirement(key, "!exists"))
            i += 2
        else:
            key = _key(tok, text)
            i += 1
            nxt = tokens[i] if i < len(tokens) else ","
            if nxt == ",":
                reqs.append(Requirement(key, "exists"))
            elif nxt in ("=", "==", "!="):
                value = tokens[i + 1] if i + 1 < len(tokens) and tokens[i + 1] not in ",()" else ""
                i += 2 if value else 1
                reqs.append(Requirement(key, "!=" if nxt == "!=" else "=", (_value(value, text),)))
            elif nxt in (">", "<"):
                need(i + 1 < len(tokens) and re.fullmatch(r"-?\d+", tokens[i + 1]) is not None,
                     f"'{key}{nxt}' needs an integer")
                reqs.append(Requirement(key, nxt, (tokens[i + 1],)))
                i += 2
            elif nxt in ("in", "notin"):
                need(i + 1 < len(tokens) and tokens[i + 1] == "(", f"'{key} {nxt}' needs a '(' value list")
                i += 2
                values: list[str] = []
                while True:
                    need(i < len(tokens), f"unclosed '(' after '{key} {nxt}'")
                    if tokens[i] == ")":
                        i += 1
                        break
                    if tokens[i] == ",":
                        i += 1
                        continue
                    values.append(_value(tokens[i], text))
                    i += 1
                need(bool(values), f"'{key} {nxt}' needs at least one value")
                reqs.append(Requirement(key, nxt, tuple(values)))
            else:
                raise SelectorError(f"label selector {text!r}: unexpected {nxt!r} after key {key!r}")
        if i < len(tokens):
            need(tokens[i] == ",", f"expected ',' before {tokens[i]!r}")
            i += 1
            need(i < len(tokens), "trailing ','")
    return LabelSelector(tuple(reqs))


def _key(tok: str, text: str) -> str:
    if not _KEY_RE.fullmatch(tok):
        raise SelectorError(f"label selector {text!r}: {tok!r} is not a valid label key")
    return tok


def _value(tok: str, text: str) -> str:
    if not _VALUE_RE.fullmatch(tok):
        raise SelectorError(f"label selector {text!r}: {tok!r} is not a valid label value")
    return tok

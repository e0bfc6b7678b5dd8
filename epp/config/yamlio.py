"""Text <-> data for config documents: strict YAML/JSON reading, readable YAML writing.

Reading is stricter than ``yaml.safe_load`` in one way that matters for configs: a key
given twice in one mapping is an error (upstream's strict decoder rejects duplicate
fields; PyYAML would silently keep the last one).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from epp.config.errors import ConfigError

_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BaseDumper: type = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _StrictLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable: the base constructor reports it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first.line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _describe_yaml_error(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        parts = [p for p in (e.context, e.problem) if p]
        return where + ("; ".join(parts) or "invalid YAML")
    return str(e) or type(e).__name__


def parse_document(text: str) -> Any:
    """Parse one YAML or JSON document; ConfigError naming line and column on failure."""
    if not isinstance(text, str):
        raise ConfigError([f"configuration must be text, got {type(text).__name__}"])
    if not text.strip():
        raise ConfigError(["configuration is empty"])
    stripped = text.lstrip()
    if stripped[:1] in "{[":
        # JSON is (almost) YAML, but a JSON parser gives better errors for JSON and accepts tabs.
        try:
            return _checked(json.loads(text, object_pairs_hook=_json_pairs))
        except (ValueError, RecursionError):
            pass  # maybe YAML flow style: let the YAML parser have it and report
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader)]
    except yaml.YAMLError as e:
        raise ConfigError([f"failed to decode configuration YAML/JSON: {_describe_yaml_error(e)}"]) from None
    except RecursionError:
        raise ConfigError(["failed to decode configuration YAML/JSON: nesting is too deep"]) from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a timestamp out of range
        raise ConfigError([f"failed to decode configuration YAML/JSON: {e}"]) from None
    docs = [d for d in docs if d is not None]
    if not docs:
        raise ConfigError(["configuration is empty"])
    if len(docs) > 1:
        raise ConfigError([f"configuration holds {len(docs)} YAML documents; expected exactly one"])
    return _checked(docs[0])


def _checked(doc: Any) -> Any:
    problem = _shape_problem(doc)
    if problem:
        raise ConfigError([f"failed to decode configuration YAML/JSON: {problem}"])
    return doc


MAX_DEPTH = 100


def _shape_problem(doc: Any) -> str | None:
    """Reject what YAML allows but no config needs: self-containing values and absurd nesting.

    Shared (aliased) values are fine and checked once, so this is linear in the document.
    """
    done: set[int] = set()
    active: set[int] = set()

    def walk(node: Any, depth: int) -> str | None:
        if not isinstance(node, (dict, list)) or id(node) in done:
            return None
        if id(node) in active:
            return "a YAML alias refers to a value that contains it (recursive value)"
        if depth > MAX_DEPTH:
            return f"values are nested more than {MAX_DEPTH} levels deep"
        active.add(id(node))
        for child in node.values() if isinstance(node, dict) else node:
            problem = walk(child, depth + 1)
            if problem:
                return problem
        active.discard(id(node))
        done.add(id(node))
        return None

    return walk(doc, 0)


def dump_yaml(data: Any) -> str:
    """Block-style YAML with keys in the given order (the order a human wrote them).

    Aliases are kept (a value the user anchored and reused prints as an anchor), so even a
    "billion laughs" parameter block renders in linear size.
    """
    try:
        return yaml.dump(data, Dumper=_BaseDumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    except (yaml.YAMLError, RecursionError, TypeError, ValueError):
        # Only user-given free-form values (odd tags, absurd nesting) can get here.
        return yaml.dump(_printable(data, [0]), Dumper=_BaseDumper, sort_keys=False, default_flow_style=False, width=100)


def _printable(data: Any, budget: list[int], depth: int = 0) -> Any:
    budget[0] += 1
    if depth > 40 or budget[0] > 5000:
        return "..."
    if isinstance(data, dict):
        return {str(k): _printable(v, budget, depth + 1) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_printable(v, budget, depth + 1) for v in data]
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    return repr(data)[:200]

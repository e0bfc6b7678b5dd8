"""A fast parser for the Prometheus text exposition format (0.0.4).

A vLLM page is ~60 KB / ~600 lines and we read it 20 times a second per endpoint, so the
parser is one C-speed regex scan rather than Python string handling per line:

* **selective** (``wanted`` = family names): the scan only stops on lines of the wanted
  families and their ``# TYPE`` lines (``help`` stays empty). Everything else is skipped
  unread, including garbage in families nobody asked for.
* **full** (``wanted=None``): the scan matches every well-formed line; a line count proves
  nothing was skipped, otherwise a line-by-line pass reads the odd lines (indentation,
  blank runs) and names a bad one.

Label blocks repeat from scrape to scrape (same series, new values), so parsed label sets
are cached by their text: a steady-state scrape does one dict lookup per series.
Label mappings in the result are shared and read-only.

Semantics follow the Go ``expfmt`` text parser (what upstream uses): the family is the
``# TYPE`` name; ``x_bucket``/``x_sum``/``x_count`` belong to histogram ``x`` (likewise
summaries, and ``x_total``/``x_created`` to a counter declared as ``x``); a series without a
``# TYPE`` is an ``untyped`` family of its own; label values unescape ``\\\\``, ``\\"`` and
``\\n``; values may be ``NaN``/``+Inf``/``-Inf``; the optional timestamp is integer
milliseconds.
"""

from __future__ import annotations

import re
from functools import lru_cache
from types import MappingProxyType
from typing import Collection, Iterable, Mapping

from epp.datalayer.payloads import ALL_SUFFIXES, FAMILY_SUFFIXES, MetricFamily, PrometheusFamilies, Sample

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"[^"\\\n]*(?:\\.[^"\\\n]*)*"'
_LABEL_PAIR_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"([^"\\\n]*(?:\\.[^"\\\n]*)*)"')
_LABELS_RE = re.compile(rf"[ \t]*(?:{_LABEL}[ \t]*(?:,[ \t]*{_LABEL}[ \t]*)*,?[ \t]*)?")
_ESCAPE_RE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_HELP_ESCAPE_RE = re.compile(r"\\([\\n])")
_SAMPLE_START_RE = re.compile(rf"({_NAME})(?=[ \t{{])")

TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped", "info", "stateset", "gaugehistogram"})
_EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})

# Groups of the line regex.
_G_KIND, _G_CNAME, _G_CTEXT, _G_NAME, _G_LABELS, _G_VALUE, _G_TS, _G_BAD = 1, 2, 3, 4, 5, 6, 7, 8


class PromParseError(ValueError):
    """The page is not valid Prometheus text; the message names the line."""


def _line_regex(names: str, comments: str) -> re.Pattern[str]:
    # Anchored on the preceding newline: sre jumps from line to line with a fast literal
    # search and only tries the alternatives at line starts. The name is matched once; a
    # line of a selected name that is not a well-formed sample falls into the last group,
    # so it is reported, not silently lost.
    return re.compile(
        rf"\n(?:#[ \t]+({comments})[ \t]+({names})(?:[ \t]+([^\n]*?))?[ \t]*"
        rf"|({names})(?=[ \t{{])(?:[ \t]*(?:\{{([^\n]*)\}})?[ \t]*(?<=[ \t}}])"
        rf"([^ \t\n]+)(?:[ \t]+([^ \t\n]+))?[ \t]*|([^\n]*)))(?=\n)"
    )


_FULL_RE = _line_regex(_NAME, "TYPE|HELP")


@lru_cache(maxsize=64)
def _selective_regex(wanted: frozenset[str]) -> re.Pattern[str]:
    # HELP lines are not read: extractors need types and values, and skipping them keeps
    # the scan cheap.
    suffixes = "|".join(re.escape(s) for s in ALL_SUFFIXES)
    return _line_regex(f"{_trie(wanted)}(?:{suffixes})?", "TYPE")


def _trie(words: Iterable[str]) -> str:
    """An alternation factored by common prefixes, so sre compares each prefix once."""
    root: dict = {}
    for w in words:
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        optional = "" in node
        if len(branches) == 1 and not optional:
            return branches[0]
        return "(?:" + "|".join(branches) + ")" + ("?" if optional else "")

    return "(?:" + build(root) + ")"


def expand_wanted(names: Iterable[str]) -> frozenset[str]:
    """Wanted family names plus the stems of suffixed names (``x_count`` -> ``x``).

    The stem's ``# TYPE`` decides whether ``x_count`` is a series of histogram ``x`` or a
    family of its own, so both must be read.
    """
    return _expand(names if isinstance(names, frozenset) else frozenset(names))


@lru_cache(maxsize=64)
def _expand(names: frozenset[str]) -> frozenset[str]:
    out = set()
    for n in names:
        out.add(n)
        for suffix in ALL_SUFFIXES:
            if n.endswith(suffix) and len(n) > len(suffix):
                out.add(n[: -len(suffix)])
    return frozenset(out)


def parse(text: str | bytes, wanted: Collection[str] | None = None) -> PrometheusFamilies:
    """Parse exposition ``text``; keep only ``wanted`` families (all if None).

    Raises PromParseError for a malformed line that had to be read, and for a page that does
    not look like Prometheus text at all (e.g. an HTML error page).
    """
    if not isinstance(text, str):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromParseError(f"not UTF-8 text at byte {e.start}") from None
    framed = "\n" + text + "\n"
    if wanted is None:
        builder = _Builder(None, framed)
        matched = builder.feed(_FULL_RE.finditer(framed))
        lines = framed.count("\n") - 1
        other_comments = framed.count("\n#") - builder.comment_lines
        if matched + other_comments + framed.count("\n\n") != lines:
            # Something was not matched: a bad line, or unusual spacing (indented lines,
            # runs of blank lines). Re-read line by line, which is exact and names bad lines.
            return _parse_lines(framed)
        return builder.result(complete=True)
    want = expand_wanted(wanted)
    builder = _Builder(want, framed)
    if want:
        builder.feed(_selective_regex(want).finditer(framed))
    if not builder.families and text.strip():
        _check_looks_like_exposition(text)
    return builder.result(complete=False)


def _parse_lines(framed: str) -> PrometheusFamilies:
    builder = _Builder(None, framed)
    for lineno, line in enumerate(framed[1:-1].split("\n"), 1):
        stripped = line.strip()
        if not stripped:
            continue
        m = _FULL_RE.match(f"\n{stripped}\n")
        if m is not None and m.end() == len(stripped) + 1:
            builder.feed((m,), lineno)
        elif not stripped.startswith("#"):
            raise PromParseError(f"line {lineno}: {_diagnose(stripped)}")
    return builder.result(complete=True)


def _diagnose(line: str) -> str:
    """Why a sample line is malformed (best effort, for the error message)."""
    m = _SAMPLE_START_RE.match(line)
    if m is None:
        return f"invalid metric name in {_clip(line)}"
    rest = line[m.end():].strip()
    if rest.startswith("{"):
        end = rest.rfind("}")
        if end < 0:
            return f"unterminated label set in {_clip(line)}"
        if _LABELS_RE.fullmatch(rest[1:end]) is None:
            return f"invalid labels in {_clip(line)}"
        rest = rest[end + 1:]
    parts = rest.split()
    if not parts:
        return f"missing value in {_clip(line)}"
    if len(parts) > 2:
        return f"unexpected text after value in {_clip(line)}"
    return f"cannot parse sample {_clip(line)}"


def _check_looks_like_exposition(text: str) -> None:
    for lineno, line in enumerate(text.split("\n", 50)[:50], 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            return
        m = _FULL_RE.match(f"\n{stripped}\n")
        if m is None or m.end() != len(stripped) + 1 or m.group(_G_BAD) is not None:
            raise PromParseError(f"not Prometheus text format (line {lineno}: {_clip(line)})")
        return


# Parsed label sets by their exposition text. Bounded: cleared when it grows past the limit
# (series churn), which only costs a re-parse.
_LABEL_CACHE: dict[str, Mapping[str, str]] = {}
_LABEL_CACHE_LIMIT = 200_000


class _Builder:
    """Accumulates families from matched lines; resolves which family a series belongs to."""

    __slots__ = ("wanted", "framed", "families", "types", "_owner", "comment_lines")

    def __init__(self, wanted: frozenset[str] | None, framed: str) -> None:
        self.wanted = wanted
        self.framed = framed
        self.families: dict[str, MetricFamily] = {}
        self.types: dict[str, str] = {}
        self._owner: dict[str, MetricFamily | None] = {}  # series name -> its family (None = not wanted)
        self.comment_lines = 0

    def feed(self, matches: Iterable[re.Match[str]], lineno: int = 0) -> int:
        """Consume line matches; returns how many there were."""
        owner = self._owner
        cache = _LABEL_CACHE
        n = 0
        m = None
        try:
            for m in matches:
                n += 1
                name = m.group(_G_NAME)
                if name is None:
                    self.comment_lines += 1
                    self._comment(m.group(_G_KIND), m.group(_G_CNAME), m.group(_G_CTEXT) or "")
                    continue
                fam = owner.get(name, False)
                if fam is False:
                    fam = owner[name] = self._resolve(name)
                if fam is None:
                    continue
                if m.group(_G_BAD) is not None:
                    raise PromParseError(_diagnose(m.group(0).strip()))
                label_text = m.group(_G_LABELS)
                if label_text:
                    labels = cache.get(label_text)
                    if labels is None:
                        labels = _parse_labels(label_text)
                else:
                    labels = _EMPTY_LABELS
                value_text = m.group(_G_VALUE)
                try:
                    if "_" in value_text:
                        raise ValueError
                    value = float(value_text)
                except ValueError:
                    raise PromParseError(f"invalid value {value_text!r} for {name}") from None
                ts_text = m.group(_G_TS)
                fam.samples.append(Sample(name, labels, value, _timestamp(ts_text, name) if ts_text else None))
        except PromParseError as e:
            at = lineno or (self.framed.count("\n", 0, m.start() + 1) if m is not None else 0)
            raise PromParseError(f"line {at}: {e}") from None
        return n

    def _comment(self, kind: str, name: str, rest: str) -> None:
        if self.wanted is not None and name not in self.wanted:
            return  # a suffixed name matched the selective pattern; not a family we read
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = MetricFamily(name, self.types.get(name, "untyped"))
        if kind == "HELP":
            fam.help = _HELP_ESCAPE_RE.sub(_unescape_help, rest) if "\\" in rest else rest
            return
        typ = rest.strip().lower()
        if typ == "unknown":
            typ = "untyped"
        if typ not in TYPES:
            raise PromParseError(f"unknown metric type {rest!r} for {name}")
        if name in self.types:
            return  # upstream rejects a second TYPE line; keeping the first is the lenient reading
        self.types[name] = fam.type = typ
        self._owner.clear()  # a new TYPE can change which family later series belong to

    def _resolve(self, name: str) -> MetricFamily | None:
        if name not in self.types:
            for suffix in ALL_SUFFIXES:
                if name.endswith(suffix):
                    stem = name[: -len(suffix)]
                    if suffix in FAMILY_SUFFIXES.get(self.types.get(stem, ""), ()):
                        name = stem
                        break
        if self.wanted is not None and name not in self.wanted:
            return None
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = MetricFamily(name, self.types.get(name, "untyped"))
        return fam

    def result(self, complete: bool) -> PrometheusFamilies:
        # A HELP/TYPE without samples is still a family (Go keeps it too), so extractors can
        # tell "declared but empty" from "absent".
        return PrometheusFamilies(self.families, complete=complete)


def _parse_labels(text: str) -> Mapping[str, str]:
    if _LABELS_RE.fullmatch(text) is None:
        raise PromParseError(f"invalid labels {{{_clip(text)[1:-1]}}}")
    labels: dict[str, str] = {}
    for k, v in _LABEL_PAIR_RE.findall(text):
        if k in labels:
            raise PromParseError(f"duplicate label {k!r}")
        labels[k] = _ESCAPE_RE.sub(_unescape, v) if "\\" in v else v
    frozen = MappingProxyType(labels)
    if len(_LABEL_CACHE) >= _LABEL_CACHE_LIMIT:
        _LABEL_CACHE.clear()
    _LABEL_CACHE[text] = frozen
    return frozen


def _timestamp(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        raise PromParseError(f"invalid timestamp {text!r} for {name}") from None


def _unescape(m: re.Match[str]) -> str:
    c = m.group(1)
    return _ESCAPES.get(c, "\\" + c)


def _unescape_help(m: re.Match[str]) -> str:
    return "\n" if m.group(1) == "n" else "\\"


def _clip(s: str, n: int = 80) -> str:
    s = s.strip()
    return repr(s if len(s) <= n else s[:n] + "...")


def families_wanted_by(extractors: Iterable[object]) -> frozenset[str] | None:
    """The union of the families the extractors read, or None if any wants them all.

    An extractor declares ``wanted_families() -> frozenset[str] | None``; one without that
    method is assumed to read everything (safe, but costs a full parse per scrape).
    """
    names: set[str] = set()
    for ex in extractors:
        declare = getattr(ex, "wanted_families", None)
        wanted = declare() if callable(declare) else None
        if wanted is None:
            return None
        names.update(wanted)
    return frozenset(names)

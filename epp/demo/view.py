"""What the demo prints: a live view on a terminal, plain lines otherwise, and the final tables.

``LiveView`` (a terminal) redraws a progress bar, the last few requests with the reason for each
pick, and a per-endpoint tally. ``PlainView`` (CI, a pipe, ``--plain``) prints one line per
finished request instead, so logs stay readable and nothing depends on cursor movement.
Both take the same calls: ``with view: view.done(outcome, why)``.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from epp.demo.explain import Why
from epp.demo.summary import Summary
from epp.demo.traffic import PREFIX_HIT_TOKENS, Outcome

_RECENT = 10
_WIDE = 150  # columns needed to show every scorer's contribution next to the reason
_NARROW = 110  # below this, only who and why
_PLAIN_WIDTH = 160


def make_console(plain: bool = False) -> Console:
    """A console for stdout; without a terminal, a wide one with no colours or cursor tricks."""
    if not plain and sys.stdout.isatty():
        return Console(highlight=False)
    width = int(os.environ.get("COLUMNS", "0") or 0) or _PLAIN_WIDTH
    return Console(highlight=False, force_terminal=False, no_color=True, width=width, soft_wrap=False)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def describe(o: Outcome) -> str:
    return f"{o.request.label} {o.request.group}"


def served(o: Outcome) -> str:
    if not o.ok:
        return "FAILED"
    ttft = f"ttft {ms(o.ttft)}" if o.ttft is not None else f"latency {ms(o.latency)}"
    return f"{o.server or '?'}  cached {o.cached_tokens}/{o.prompt_tokens}  {ttft}"


class View(Protocol):
    def __enter__(self) -> "View": ...
    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None: ...
    def done(self, o: Outcome, why: Why | None) -> None: ...


class PlainView:
    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.finished = 0

    def __enter__(self) -> "PlainView":
        self.console.print(f"sending {self.total} requests through Envoy ...")
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def done(self, o: Outcome, why: Why | None) -> None:
        self.finished += 1
        width = len(str(self.total))
        head = f"[{self.finished:>{width}}/{self.total}] {o.request.request_id} {describe(o):<32}"
        if not o.ok:
            line = f"{head} FAILED: {o.error}"
        elif why is None:
            line = f"{head} -> {served(o)}  (no decision record)"
        else:
            line = f"{head} -> {served(o)}  why: {why.reason()}  [{why.scores()}]"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


class LiveView:
    def __init__(self, console: Console, total: int, servers: Sequence[tuple[str, str, float]]) -> None:
        self.console = console
        self.progress = Progress(TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console)
        self.task = self.progress.add_task("requests", total=total, status="")
        self.recent: deque[tuple[Outcome, Why | None]] = deque(maxlen=_RECENT)
        self.tally = {name: [0, 0, speed] for name, _addr, speed in servers}  # routed, prefix hits, speed
        self.ok = self.failed = 0
        self.live = Live(console=console, refresh_per_second=8, get_renderable=self._render)

    def __enter__(self) -> "LiveView":
        self.live.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.live.__exit__(et, ev, tb)

    def done(self, o: Outcome, why: Why | None) -> None:
        self.recent.append((o, why))
        if o.ok:
            self.ok += 1
            row = self.tally.get(o.server)
            if row is not None:
                row[0] += 1
                row[1] += o.prefix_hit
        else:
            self.failed += 1
        status = f"ok {self.ok}" + (f"  [red]failed {self.failed}[/]" if self.failed else "")
        self.progress.update(self.task, advance=1, status=status)

    def _render(self) -> Group:
        # One line per request, as many as the terminal has room for; scores only when wide.
        width, height = self.console.size
        rows = max(3, min(_RECENT, height - 12 - len(self.tally)))
        recent = Table(title="where requests went, and why (newest last)", title_justify="left", expand=True,
                       box=box.SIMPLE_HEAD)
        wide, narrow = width >= _WIDE, width < _NARROW
        cols: list[tuple[str, dict[str, object]]] = [("#", {"justify": "right"}),
                                                     ("request", {"max_width": None if wide else 24}), ("server", {})]
        if not narrow:  # below this, the reason needs the room more
            cols += [("cached", {"justify": "right"}), ("TTFT/total", {"justify": "right"})]
        cols.append(("why (from the EPP's /debug/decisions)", {"ratio": 1}))
        for col, kw in cols:
            recent.add_column(col, no_wrap=True, overflow="ellipsis", **kw)  # type: ignore[arg-type]
        for o, why in list(self.recent)[-rows:]:
            reason: Text | str
            if not o.ok:
                reason = Text(o.error, style="red")
            elif why is None:
                reason = Text("no decision record", style="dim")
            else:
                reason = Text(why.reason(short=not wide))
                if wide:
                    reason.append(f"  {why.scores()}", style="dim")
            cells: list[Text | str] = [str(o.request.index), describe(o),
                                       o.server if o.ok else Text("failed", style="red")]
            if not narrow:
                cells.append(f"{o.cached_tokens / o.prompt_tokens:.0%}" if o.ok and o.prompt_tokens else "")
                cells.append(ms(o.ttft) if o.ttft is not None else Text(ms(o.latency), style="dim"))
            recent.add_row(*cells, reason)
        tally = Table(title="endpoints so far", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("server", "speed", "requests", "prefix hits"):
            tally.add_column(col, justify="left" if col == "server" else "right")
        for name, (routed, hits, speed) in self.tally.items():
            tally.add_row(name, f"{speed:g}x", str(routed), str(hits))
        return Group(self.progress.get_renderable(), recent, tally)


def make_view(console: Console, total: int, servers: Sequence[tuple[str, str, float]]) -> View:
    return LiveView(console, total, servers) if console.is_terminal else PlainView(console, total)


def _ms_value(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def print_summary(console: Console, s: Summary) -> None:
    narrow = console.width < _NARROW  # addresses were printed at start; keep the numbers readable
    table = Table(title=f"per endpoint ({s.total} requests in {s.wall_s:.1f} s)", title_justify="left",
                  box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD)
    cols = ["server", *([] if narrow else ["address"]), "speed", "requests", "share", "prefix hits", "cached tokens",
            "mean TTFT ms", "streamed TTFT ms", "mean latency ms"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("server", "address") else "right")
    for e in s.endpoints:
        share = f"{e.requests / s.ok:.0%}" if s.ok else "-"
        table.add_row(e.name, *([] if narrow else [e.address]), f"{e.speed:g}x", str(e.requests), share,
                      f"{e.prefix_hits}/{e.requests}", f"{e.cached_share:.0%}", _ms_value(e.server_ttft_mean),
                      _ms_value(e.mean_client_ttft), _ms_value(e.mean_latency))
    console.print(table)
    for note in (f"prefix hit: at least {PREFIX_HIT_TOKENS} prompt tokens came from the server's prefix cache",
                 "mean TTFT: the server's own histogram, all requests; streamed TTFT: first token seen by the client "
                 "through Envoy; latency: request to last byte at the client"):
        console.print(note, markup=False, style="dim", soft_wrap=True)
    hits = f"{s.prefix_hits}/{s.ok}" if s.ok else "0/0"
    console.print(f"requests: {s.total}, succeeded: {s.ok}, failed: {len(s.failed)}, prefix-cache hits: {hits}",
                  markup=False)
    if s.decided_by:
        tally = ", ".join(f"{k} {v}" for k, v in s.decided_by.most_common())
        console.print(f"picks decided by (largest gain over the runner-up): {tally}", markup=False)
    if s.unknown_server:
        console.print(f"{s.unknown_server} answers carried no known x-sim-server header", markup=False)
    for o in s.failed[:5]:
        console.print(f"failed {o.request.request_id} ({describe(o)}): {o.error}", markup=False, soft_wrap=True)

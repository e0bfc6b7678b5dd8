"""CPU instructions per request and per streamed chunk on the fast core, counted by callgrind.

Why: the machine is shared, so timing before/after a change of the request path moves by more
than the change. Instruction counts of a fixed in-process workload (``EnvoyWorkload``: the
frames Envoy sends for a full-duplex request with a JSON answer, or one streamed chunk) are
exact to a few hundred instructions per run. Each figure is the difference of two runs of
different lengths divided by the difference in operations, so start-up (imports, compiling,
the configuration) cancels out.

    python -m epp.bench.instructions            # both kinds, the checkout's code
    PYTHONPATH=/path/to/other/checkout python -m epp.bench.instructions   # the same for another version

Needs valgrind. Python's hash randomisation is fixed (PYTHONHASHSEED=0) so runs repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from typing import Any

KINDS = ("request", "chunk")


def run_workload(kind: str, n: int) -> None:
    """``n`` operations of ``kind`` after 200 for warm-up; frames are built before."""
    from epp.bench.idlecost import EnvoyWorkload
    from epp.observability import deferred

    async def main() -> None:
        work = EnvoyWorkload()
        feed = work.conn.data_received
        if kind == "request":
            batches = [work.request_frames() for _ in range(n + 200)]
        else:
            batches = [(work.open_chunk_stream(),)] * (n + 200)
        for i, frames in enumerate(batches):
            for f in frames:
                feed(f)
            if i % 50 == 0:  # as in the server: the loop's housekeeping and the histogram flusher
                await asyncio.sleep(0)
                deferred.flush()
        assert work.transport.written and work.director.in_flight <= 1

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    else:
        uvloop.run(main())


def count(kind: str, n: int) -> int:
    """Instructions of a whole run of ``n`` operations under callgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind is not installed (Debian package valgrind)")
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run([valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
                          "epp.bench.instructions", "--run", kind, str(n)], env=env, capture_output=True, text=True)
    m = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode or m is None:
        raise RuntimeError(f"callgrind run failed: {out.stderr[-2000:]}")
    return int(m.group(1))


def per_operation(kind: str, small: int, large: int) -> float:
    return (count(kind, large) - count(kind, small)) / (large - small)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help="request,chunk")
    ap.add_argument("--run", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)  # the measured child
    args = ap.parse_args(argv)
    if args.run:
        run_workload(args.run[0], int(args.run[1]))
        return 0
    sizes: dict[str, Any] = {"request": (300, 1300), "chunk": (1000, 5000)}
    for kind in args.kinds.split(","):
        print(f"{kind}: {per_operation(kind, *sizes[kind]):,.0f} instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main())

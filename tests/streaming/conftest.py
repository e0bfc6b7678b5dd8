"""Streamed responses (issue 8): the per-token hot path, and every Envoy mode end to end.

The in-process helpers of the ext_proc tests (test plugins, ``EppThread``, message builders)
are shared rather than copied: their directory is put on the import path.
"""

from __future__ import annotations

import sys
from pathlib import Path

_EXTPROC_TESTS = str(Path(__file__).resolve().parent.parent / "extproc")
if _EXTPROC_TESTS not in sys.path:
    sys.path.insert(0, _EXTPROC_TESTS)

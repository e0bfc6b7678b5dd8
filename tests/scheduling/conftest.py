"""Fixtures for the scheduling tests (builders live in sched_helpers.py)."""

from __future__ import annotations

import pytest

from epp.framework.handle import PluginHandle


@pytest.fixture
def handle() -> PluginHandle:
    return PluginHandle()

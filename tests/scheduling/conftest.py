"""Fixtures for the scheduling tests (builders live in sched_helpers.py)."""

from __future__ import annotations

import pytest

from epp.scheduling.handle import SimpleHandle


@pytest.fixture
def handle() -> SimpleHandle:
    return SimpleHandle()

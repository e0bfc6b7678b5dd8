from __future__ import annotations

import pytest
from kv_helpers import random_loopback_block


@pytest.fixture
def loopback() -> str:
    """A random loopback block ``127.a.b.`` for pod-like addresses (``loopback + "2"``, ...)."""
    return random_loopback_block()

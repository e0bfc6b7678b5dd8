"""Fixtures of the config tests: an isolated registry of test plugin types (see cfg_testkit)."""

from __future__ import annotations

import functools

import pytest

from cfg_testkit import IsolatedRegistry, make_registry
from epp.config import load_config


@pytest.fixture
def registry() -> IsolatedRegistry:
    return make_registry()


@pytest.fixture
def load(registry):
    """load(text) with the isolated test registry."""
    return functools.partial(load_config, registry=registry)

"""Every ext_proc test runs against both server cores (our HTTP/2 core and grpcio's)."""

import pytest


@pytest.fixture(autouse=True, params=["fast", "grpcio"])
def extproc_core(request, monkeypatch):
    monkeypatch.setenv("EPP_EXTPROC_CORE", request.param)
    return request.param

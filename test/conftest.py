"""Fixtures of the plugin's tests (the shared set-up is the root conftest's)."""

from __future__ import annotations

import pytest

from sglang_hip_decode import gates, patching

from patch_fixtures import RMSNORM, STAND_IN_PATCHES, install_test_catalog


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in catalog of test-only patches, no switch set; every one unapplied afterwards."""
    install_test_catalog(monkeypatch.setattr)
    for var in (gates.ENV_ENABLE, gates.ENV_PATCHES, gates.ENV_ANY_PLATFORM, gates.ENV_STATUS_FILE):
        monkeypatch.delenv(var, raising=False)
    original = patching.resolve_target(RMSNORM)[2]
    yield
    for patch in reversed(STAND_IN_PATCHES):
        patching.unapply(patch)
    assert patching.resolve_target(RMSNORM)[2] is original

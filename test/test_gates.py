"""Every implemented patch of the real catalogue, one test each: HIP-gated (off the platform nothing is
touched), applied when forced, installed as the original's patched copy, and unapplied back to the
very original objects. Derived from ``patches.PLANNED``, so a new patch is covered when it lands."""

from __future__ import annotations

import pytest

from sglang_hip_decode import evaluate, patching
from sglang_hip_decode.patches import PLANNED, catalog

IMPLEMENTED = [entry for entry in catalog() if entry.patch is not None]


@pytest.fixture
def unapply_every_patch():
    """Whatever a test applied (evaluate() applies the whole selected set), unapplied afterwards."""
    yield
    for entry in reversed(catalog()):
        if entry.patch is not None:
            patching.unapply(entry.patch)


def test_the_catalogue_is_the_plan():
    assert [(e.name, e.default) for e in catalog()] == [(name, default) for name, _, default in PLANNED]
    assert len(IMPLEMENTED) >= 3


@pytest.mark.parametrize("entry", IMPLEMENTED, ids=[e.name for e in IMPLEMENTED])
def test_hip_gated_applied_when_forced_and_unapplied_to_the_originals(entry, unapply_every_patch):
    from sglang_hip_decode.testing.sglang_import import import_modules

    patch = entry.patch
    assert patch.gate == "hip" and patch.default == entry.default
    import_modules(*{t.split(":")[0] for t in patch.targets})  # CUDA hidden, as every test imports sglang
    originals = {t: patching.resolve_target(t)[2] for t in patch.targets}
    report = evaluate({"SGLANG_HIP_DECODE_PATCHES": entry.name})
    assert report.status_of(entry.name) == "off (not HIP; set SGLANG_HIP_DECODE_ANY_PLATFORM=1 to force)"
    assert {t: patching.resolve_target(t)[2] for t in patch.targets} == originals
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": entry.name})
    assert report.status_of(entry.name) == "applied" and report.applied == (entry.name,)
    for target, original in originals.items():
        installed = patching.resolve_target(target)[2]
        assert installed is not original and type(installed) is type(original)
        assert patching._function_of(installed).__wrapped__ is patching._function_of(original)
        assert patching.active_patches(target) == (entry.name,)
    patching.unapply(patch)
    assert all(patching.resolve_target(t)[2] is original for t, original in originals.items())

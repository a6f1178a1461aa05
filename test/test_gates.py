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


def test_the_default_set_applies_in_planned_order(unapply_every_patch):
    # evaluate() with the default selection applies every default-on patch; a target that several
    # edit carries them in PLANNED's order (nsa-cat-skip before mxfp4-vbmm-layout on forward_absorb_core).
    assert len(IMPLEMENTED) >= 3
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    release = patching.installed_release()
    defaults = [e.name for e in IMPLEMENTED if e.default and e.patch.candidates(release)]  # edits on this release
    assert list(report.applied) == defaults
    order = [name for name, _, _ in PLANNED]
    views = {e.name: patching.for_release(e.patch) for e in IMPLEMENTED if e.name in defaults}
    targets = {t for v in views.values() for t in v.targets}
    shared = 0
    for target in targets:
        active = patching.active_patches(target)
        expected = [n for n in order if n in views and target in views[n].targets]
        assert list(active) == expected, target
        shared += len(active) > 1
    if release == patching.parse_release("0.5.11"):
        assert shared >= 1  # at least one target carries two patches (cat-skip and mxfp4 share one there)


def test_every_patch_applies_together_in_planned_order(unapply_every_patch):
    # The opt-in ones too (three edit forward_absorb_core on 0.5.11): all of them at once, in PLANNED order.
    release = patching.installed_release()
    with_edits = [e.name for e in IMPLEMENTED if e.patch.candidates(release)]
    assert len(IMPLEMENTED) == 8 and with_edits
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "all"})
    assert list(report.applied) == with_edits and report.exit_code == 0
    for entry in IMPLEMENTED:
        if entry.name in with_edits:
            for target in patching.for_release(entry.patch).targets:
                active = patching.active_patches(target)
                assert entry.name in active and list(active) == [n for n in with_edits if n in active]


@pytest.mark.parametrize("entry", IMPLEMENTED, ids=[e.name for e in IMPLEMENTED])
def test_hip_gated_applied_when_forced_and_unapplied_to_the_originals(entry, unapply_every_patch):
    from sglang_hip_decode.testing.sglang_import import import_modules

    patch = entry.patch
    assert patch.gate == "hip" and patch.default == entry.default
    declared = patch.for_release(patching.installed_release())
    if not declared.edits:  # upstream has it on this release, or it does not apply: said, nothing installed
        report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": entry.name})
        said = "upstream: sglang " if declared.upstream else f"not applicable: {declared.not_applicable}"
        assert report.status_of(entry.name).startswith(said) and report.applied == ()
        assert not patching.is_applied(patch)
        return
    view = patching.for_release(patch)  # what it declares for the installed release
    import_modules(*{t.split(":")[0] for t in view.targets})  # CUDA hidden, as every test imports sglang
    originals = {t: patching.resolve_target(t)[2] for t in view.targets}
    report = evaluate({"SGLANG_HIP_DECODE_PATCHES": entry.name})
    assert report.status_of(entry.name) == "off (not HIP; set SGLANG_HIP_DECODE_ANY_PLATFORM=1 to force)"
    assert {t: patching.resolve_target(t)[2] for t in view.targets} == originals
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": entry.name})
    assert report.status_of(entry.name) == "applied" and report.applied == (entry.name,)
    for target, original in originals.items():
        installed = patching.resolve_target(target)[2]
        assert installed is not original and type(installed) is type(original)
        assert patching._function_of(installed).__wrapped__ is patching._function_of(original)
        assert patching.active_patches(target) == (entry.name,)
    patching.unapply(patch)
    assert all(patching.resolve_target(t)[2] is original for t, original in originals.items())

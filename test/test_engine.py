"""The patch engine on the real sglang 0.5.11 methods, with harmless test-only hunks.

Targets:
* ``RMSNorm.__init__`` (layernorm): zero-argument ``super().__init__()``, defaults, ``Optional``
  annotations; the hunk doubles ``variance_epsilon`` so the effect is observable.
* ``Indexer._update_rope_guarded`` (nsa_indexer): a ``staticmethod``.
* ``DeepseekMLAForwardMixin.forward_absorb_core`` (forward_mla): annotated with a name imported only
  under ``TYPE_CHECKING`` (``self: DeepseekV2AttentionMLA``).
"""

from __future__ import annotations

import inspect
import linecache
import traceback

import pytest
import torch

from sglang_hip_decode import patching
from sglang_hip_decode.patching import Edit, Hunk, Patch

from patch_fixtures import CORE, DOUBLE_EPS, GUARD, GUARD_RAISES, MISSING, RMSNORM, make  # noqa: E402


@pytest.fixture
def cleanup():
    """Unapply every patch a test applied, even when it fails."""
    applied = []
    yield applied
    for patch in reversed(applied):
        patching.unapply(patch)


def raw(target):
    owner, attr, obj = patching.resolve_target(target)
    return obj


def rmsnorm_cls():
    from sglang.srt.layers.layernorm import RMSNorm

    return RMSNorm


def test_apply_edits_the_body_and_keeps_super_defaults_and_metadata(cleanup):
    RMSNorm = rmsnorm_cls()
    before = RMSNorm.__dict__["__init__"]
    assert RMSNorm(8, eps=1e-6).variance_epsilon == 1e-6
    patch = make("t-double-eps", DOUBLE_EPS)
    assert patching.apply(patch) == "applied"
    cleanup.append(patch)
    new = RMSNorm.__dict__["__init__"]
    assert new is not before
    norm = RMSNorm(8)  # the patched __init__ calls zero-argument super().__init__()
    assert norm.variance_epsilon == 2e-6  # the default eps=1e-6 was kept, and the hunk ran
    assert isinstance(norm.weight, torch.nn.Parameter) and norm.weight.shape == (8,)
    assert new.__defaults__ is before.__defaults__
    assert new.__kwdefaults__ == before.__kwdefaults__
    assert new.__qualname__ == before.__qualname__ == "RMSNorm.__init__"
    assert new.__module__ == before.__module__
    assert new.__doc__ == before.__doc__
    assert new.__annotations__ == before.__annotations__
    assert new.__wrapped__ is before
    assert new.__globals__ is before.__globals__
    assert inspect.signature(new) == inspect.signature(before)
    assert patching.active_patches(RMSNORM) == ("t-double-eps",)


def test_apply_twice_is_one_patch(cleanup):
    patch = make("t-double-eps", DOUBLE_EPS)
    patching.apply(patch)
    cleanup.append(patch)
    first = raw(RMSNORM)
    assert patching.apply(patch) == "applied"
    assert raw(RMSNORM) is first
    assert patching.active_patches(RMSNORM) == ("t-double-eps",)
    assert rmsnorm_cls()(4).variance_epsilon == 2e-6  # doubled once, not twice


def test_unapply_restores_the_original_object():
    original = raw(RMSNORM)
    patch = make("t-double-eps", DOUBLE_EPS)
    patching.apply(patch)
    assert raw(RMSNORM) is not original
    patching.unapply(patch)
    assert raw(RMSNORM) is original
    assert patching.active_patches(RMSNORM) == ()
    assert rmsnorm_cls()(4).variance_epsilon == 1e-6
    patching.unapply(patch)  # unapplying what is not applied is a no-op
    assert raw(RMSNORM) is original


def test_missing_anchor_fails_and_leaves_the_function_object_unchanged():
    original = raw(GUARD)
    with pytest.raises(patching.PatchError, match=r"hunk 1 of .*Indexer\._update_rope_guarded did not match \(upstream changed\)"):
        patching.apply(make("t-missing", MISSING))
    assert raw(GUARD) is original
    assert patching.active_patches(GUARD) == ()


def test_anchor_matching_twice_fails_and_fragments_never_match():
    target = "sglang.srt.layers.attention.nsa.nsa_indexer:Indexer._get_q_k_bf16"
    original = raw(target)
    twice = Edit(target, (Hunk("query = rotate_activation(query)", "pass"),))  # 3 times in 0.5.11
    with pytest.raises(patching.PatchError, match=r"hunk 1 of .* matched 3 times \(anchor not unique\)"):
        patching.apply(make("t-twice", twice))
    fragment = Edit(RMSNORM, (Hunk("self.variance_epsilon", "x"),))  # anchors are whole lines
    with pytest.raises(patching.PatchError, match="did not match"):
        patching.apply(make("t-fragment", fragment))
    assert raw(target) is original


def test_second_target_failing_leaves_the_first_unpatched():
    first_before = raw(RMSNORM)
    second_before = raw(GUARD)
    with pytest.raises(patching.PatchError, match="did not match"):
        patching.apply(make("t-two-targets", DOUBLE_EPS, MISSING))
    assert raw(RMSNORM) is first_before
    assert raw(GUARD) is second_before
    assert rmsnorm_cls()(4).variance_epsilon == 1e-6


def test_staticmethod_traceback_shows_the_patched_line(cleanup):
    from sglang.srt.layers.attention.nsa.nsa_indexer import Indexer

    patch = make("t-raise", GUARD_RAISES)
    patching.apply(patch)
    cleanup.append(patch)
    assert isinstance(Indexer.__dict__["_update_rope_guarded"], staticmethod)
    a, b = torch.zeros(4), torch.ones(4)
    Indexer._update_rope_guarded(a, a)  # the alias path returns before the hunk
    with pytest.raises(RuntimeError, match="test-only hunk raised here") as info:
        Indexer._update_rope_guarded(a, b)
    text = "".join(traceback.format_exception(info.value))
    assert 'raise RuntimeError("test-only hunk raised here")' in text
    assert "nsa_indexer.py (patched by sglang-hip-decode: t-raise)" in text
    # The code object's source is the patched text (inspect.getsource(function) follows
    # __wrapped__ to the original, by Python's design).
    func = Indexer.__dict__["_update_rope_guarded"].__func__
    assert 'raise RuntimeError("test-only hunk raised here")' in inspect.getsource(func.__code__)
    assert "dst.copy_(src)" in inspect.getsource(func.__wrapped__)
    linecache.checkcache()  # the patched text survives linecache's own pruning
    assert 'raise RuntimeError("test-only hunk raised here")' in inspect.getsource(func.__code__)


def test_line_numbers_follow_the_file(cleanup):
    from sglang.srt.layers.attention.nsa.nsa_indexer import Indexer

    original = Indexer.__dict__["_update_rope_guarded"].__func__
    patch = make("t-raise", GUARD_RAISES)
    patching.apply(patch)
    cleanup.append(patch)
    func = Indexer.__dict__["_update_rope_guarded"].__func__
    assert func.__code__.co_firstlineno == original.__code__.co_firstlineno
    shown = linecache.getlines(func.__code__.co_filename)
    real = linecache.getlines(original.__code__.co_filename)
    assert len(shown) == len(real)  # a one-line hunk: same length, same numbering
    changed = [i for i, (x, y) in enumerate(zip(shown, real)) if x != y]
    assert len(changed) == 1 and "test-only hunk raised here" in shown[changed[0]]


def test_type_checking_only_annotation_does_not_break_compilation(cleanup):
    from sglang.srt.models.deepseek_common.attention_forward_methods import forward_mla

    assert "DeepseekV2AttentionMLA" not in vars(forward_mla)  # imported under TYPE_CHECKING only
    original = raw(CORE)
    patch = make("t-core", Edit(CORE, (Hunk("save_kv_cache = True", "save_kv_cache = True  # test-only hunk"),)))
    patching.apply(patch)
    cleanup.append(patch)
    new = raw(CORE)
    assert new is not original
    assert new.__annotations__ == original.__annotations__
    assert "test-only hunk" in inspect.getsource(new.__code__)


def test_two_patches_stack_on_one_method_and_unapply_in_any_order():
    original = raw(RMSNORM)
    a = make("t-a", DOUBLE_EPS)
    b = make("t-b", Edit(RMSNORM, (Hunk("self.hidden_size = hidden_size", "self.hidden_size = hidden_size + 1"),)))
    patching.apply(a)
    patching.apply(b)
    try:
        assert patching.active_patches(RMSNORM) == ("t-a", "t-b")
        norm = rmsnorm_cls()(8)
        assert (norm.variance_epsilon, norm.hidden_size) == (2e-6, 9)
        patching.unapply(a)
        norm = rmsnorm_cls()(8)
        assert (norm.variance_epsilon, norm.hidden_size) == (1e-6, 9)
        assert raw(RMSNORM).__wrapped__ is original
    finally:
        patching.unapply(a)
        patching.unapply(b)
    assert raw(RMSNORM) is original


def test_someone_else_replacing_the_method_is_detected(cleanup):
    RMSNorm = rmsnorm_cls()
    patch = make("t-double-eps", DOUBLE_EPS)
    patching.apply(patch)
    ours = RMSNorm.__dict__["__init__"]
    foreign = lambda self, *a, **k: ours(self, *a, **k)  # noqa: E731 - e.g. a HookRegistry wrapper
    RMSNorm.__init__ = foreign
    try:
        with pytest.raises(patching.PatchError, match="replaced by someone else"):
            patching.unapply(patch)
        assert RMSNorm.__dict__["__init__"] is foreign
    finally:
        RMSNorm.__init__ = ours
        patching.unapply(patch)


def test_bad_declarations_are_refused_at_definition():
    with pytest.raises(ValueError, match="not of the form"):
        Edit("sglang.srt.layers.layernorm.RMSNorm.__init__", (Hunk("a", "b"),))
    with pytest.raises(ValueError, match="no hunks"):
        Edit(RMSNORM, ())
    with pytest.raises(ValueError, match="gate"):
        Patch("x", "x", (DOUBLE_EPS,), gate="rocm")
    with pytest.raises(ValueError, match="appears twice"):
        Patch("x", "x", (DOUBLE_EPS, DOUBLE_EPS))


def test_unknown_target_is_a_patch_error():
    with pytest.raises(patching.PatchError, match="not defined on RMSNorm itself"):
        patching.apply(make("t-nope", Edit("sglang.srt.layers.layernorm:RMSNorm.no_such_method", (Hunk("a", "b"),))))
    with pytest.raises(patching.PatchError, match="cannot import"):
        patching.apply(make("t-nope", Edit("sglang.no_such_module:X.y", (Hunk("a", "b"),))))

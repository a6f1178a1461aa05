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

from patch_fixtures import CORE, DOUBLE_EPS, GROW_HIDDEN, GUARD, GUARD_RAISES, MISSING, RMSNORM, make  # noqa: E402


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
    message = r"hunk 1 of .*Indexer\._update_rope_guarded did not match \(upstream changed\)"
    with pytest.raises(patching.PatchError, match=message):
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


# --------------------------------------------------------------------------------------------
# Hostile conditions: wrapped targets, anchors inside strings, linecache, private attributes.

FIXTURE_MODULE = '''
import functools


def passthrough(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Doc:
    def documented(self):
        """Quotes its own code:
        value = 1
        return value
        """
        value = 1
        return value

    def only_in_docstring(self):
        """Quotes code that is not there:
        value = 7
        """
        return 0

    def string_then_code(self):
        text = """
        value = 3
        """
        value = 3
        return value, text

    def starts_in_string(self):
        text = """
        value = 4
        """
        return text

    def tagged(self):
        value = 5
        return value

    def in_fstring(self):
        text = f"""
        value = 8 {self!r}
        """
        return text


class Decorated:
    @passthrough
    def method(self):
        value = 6
        return value


def _impl(self):
    value = 9
    return value


scale = 100  # a module global with the closure's free variable's name


def _factory(scale):
    def scaled(self, x):
        return x * scale

    return scaled


class Odd:
    forward = _impl  # defined under another name
    scaled = _factory(2)  # a closure
    cached = staticmethod(functools.lru_cache(maxsize=None)(lambda x: x))

    def __private(self):
        value = 11
        return value

    def call_private(self):
        return self.__private()
'''


@pytest.fixture(scope="module")
def fixture_module(tmp_path_factory):
    """A small module of our own, so each hostile case has exactly the source it needs."""
    import importlib
    import sys

    root = tmp_path_factory.mktemp("engine_fixture")
    (root / "hd_engine_fixture.py").write_text(FIXTURE_MODULE)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("hd_engine_fixture")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("hd_engine_fixture", None)


FIX = "hd_engine_fixture"


def test_anchor_inside_a_docstring_does_not_count(cleanup, fixture_module):
    # The docstring quotes "value = 1 / return value" too: only the code match counts (before: 2
    # matches, "anchor not unique").
    patch = make("t-doc", Edit(f"{FIX}:Doc.documented", (Hunk("value = 1\nreturn value", "value = 10\nreturn value"),)))
    assert patching.apply(patch) == "applied"
    cleanup.append(patch)
    assert fixture_module.Doc().documented() == 10
    assert "value = 1\n" in fixture_module.Doc.documented.__doc__  # the docstring is not rewritten


def test_anchor_only_in_a_docstring_or_string_fails(fixture_module):
    original = fixture_module.Doc.__dict__["only_in_docstring"]
    patch = make("t-doc-only", Edit(f"{FIX}:Doc.only_in_docstring", (Hunk("value = 7", "value = 70"),)))
    with pytest.raises(patching.PatchError, match=r"did not match in code \(only inside a string literal or comment\)"):
        patching.apply(patch)
    assert fixture_module.Doc.__dict__["only_in_docstring"] is original
    # A match that starts inside a string literal and runs out of it is not code either.
    patch = make("t-straddle", Edit(f"{FIX}:Doc.starts_in_string", (Hunk('value = 4\n"""', 'value = 40\n"""'),)))
    with pytest.raises(patching.PatchError, match="did not match in code"):
        patching.apply(patch)
    # Inside an f-string (one STRING token up to Python 3.11, FSTRING_START..FSTRING_END from 3.12).
    patch = make("t-fstring", Edit(f"{FIX}:Doc.in_fstring", (Hunk("value = 8 {self!r}", "value = 80"),)))
    with pytest.raises(patching.PatchError, match="did not match in code"):
        patching.apply(patch)


def test_anchor_next_to_a_string_literal_matches_the_code(cleanup, fixture_module):
    patch = make("t-str", Edit(f"{FIX}:Doc.string_then_code", (Hunk("value = 3", "value = 30"),)))
    assert patching.apply(patch) == "applied"
    cleanup.append(patch)
    value, text = fixture_module.Doc().string_then_code()
    assert value == 30 and "value = 3\n" in text  # the literal is untouched
    # An anchor may hold a whole literal (it is then part of the code).
    whole = make("t-whole", Edit(f"{FIX}:Doc.starts_in_string", (Hunk('text = """\nvalue = 4\n"""', 'text = "x"'),)))
    assert patching.apply(whole) == "applied"
    cleanup.append(whole)
    assert fixture_module.Doc().starts_in_string() == "x"


def test_a_functools_wraps_decorator_is_refused_and_left_in_place(fixture_module):
    wrapper = fixture_module.Decorated.__dict__["method"]
    patch = make("t-deco", Edit(f"{FIX}:Decorated.method", (Hunk("value = 6", "value = 60"),)))
    with pytest.raises(patching.PatchError) as info:
        patching.apply(patch)
    message = str(info.value)
    assert message.startswith(f"{FIX}:Decorated.method is wrapped by passthrough.<locals>.wrapper (")
    assert "around Decorated.method (" in message and "the wrapper is left in place" in message
    assert fixture_module.Decorated.__dict__["method"] is wrapper
    assert fixture_module.Decorated().method() == 6


def _foreign(self):  # no __wrapped__: a hand-rolled replacement defined in this test file
    value = 5
    return value


@pytest.mark.parametrize("replacement, message", [
    (lambda original: _foreign, r"Doc\.tagged is wrapped by _foreign \(.*test_engine\.py:"),
    (lambda original: torch.compile(original), r"Doc\.tagged is wrapped by .*around Doc\.tagged"),  # lazy: compiles on call
], ids=["function-from-another-file", "torch-compile"])
def test_a_replacement_that_is_not_the_plain_function_is_refused(fixture_module, replacement, message):
    original = fixture_module.Doc.__dict__["tagged"]
    replaced = replacement(original)
    fixture_module.Doc.tagged = replaced
    try:
        with pytest.raises(patching.PatchError, match=message):
            patching.apply(make("t-replaced", Edit(f"{FIX}:Doc.tagged", (Hunk("value = 5", "value = 50"),))))
        assert fixture_module.Doc.__dict__["tagged"] is replaced
    finally:
        fixture_module.Doc.tagged = original


@pytest.mark.parametrize("target, hunk, message", [
    ("Odd.forward", ("value = 9", "value = 90"), r"Odd\.forward is the function _impl \(defined under another name\)"),
    ("Odd.scaled", ("return x * scale", "return x * scale  # a comment"), r"Odd\.scaled is a closure over scale"),
    ("Odd.cached", ("x", "y"), r"Odd\.cached is wrapped by functools\._lru_cache_wrapper inside a staticmethod"),
], ids=["alias", "closure", "staticmethod-of-lru-cache"])
def test_functions_the_engine_cannot_recompile_faithfully_are_refused(fixture_module, target, hunk, message):
    # Recompiling an alias would define the other name and install nothing new ("applied", with
    # the original made to wrap itself); a closure's free variable would become a module global
    # (here: x * 100 instead of x * 2).
    owner, attr = fixture_module.Odd, target.split(".")[1]
    before = owner.__dict__[attr]
    with pytest.raises(patching.PatchError, match=message):
        patching.apply(make("t-odd", Edit(f"{FIX}:{target}", (Hunk(*hunk),))))
    assert owner.__dict__[attr] is before
    inner = _impl_of(before)
    assert not hasattr(inner, patching.PATCHED_MARKER)
    assert callable(getattr(inner, "cache_info", None)) or not hasattr(inner, "__wrapped__")  # only lru_cache's own
    assert fixture_module.Odd().scaled(3) == 6


def _impl_of(raw):
    return getattr(raw, "__func__", raw)


def test_a_private_method_is_still_editable(cleanup, fixture_module):
    patch = make("t-private", Edit(f"{FIX}:Odd._Odd__private", (Hunk("value = 11", "value = 110"),)))
    assert patching.apply(patch) == "applied"
    cleanup.append(patch)
    assert fixture_module.Odd().call_private() == 110


def test_clearcache_wrapped_by_someone_else_after_us_does_not_recurse(cleanup, fixture_module):
    import linecache as lc

    first = make("t-lc1", Edit(f"{FIX}:Doc.tagged", (Hunk("value = 5", "value = 51"),)))
    patching.apply(first)
    cleanup.append(first)
    ours = lc.clearcache
    calls = []

    def theirs():  # another library wrapping clearcache after the engine did
        calls.append(1)
        ours()

    lc.clearcache = theirs
    try:
        second = make("t-lc2", Edit(f"{FIX}:Decorated.method", (Hunk("x", "y"),)))  # refused, but nothing rebinds
        with pytest.raises(patching.PatchError):
            patching.apply(second)
        third = make("t-lc3", Edit(f"{FIX}:Doc.documented", (Hunk("value = 1\nreturn value", "value = 12\nreturn value"),)))
        patching.apply(third)
        cleanup.append(third)
        assert lc.clearcache is theirs
        lc.clearcache()
        assert calls == [1]
        assert "value = 12" in inspect.getsource(fixture_module.Doc.__dict__["documented"].__code__)
    finally:
        lc.clearcache = ours


def test_private_attributes_of_the_original_are_not_copied(cleanup, fixture_module):
    func = fixture_module.Doc.__dict__["tagged"]
    func.release_note = "public: copied"
    func._torchscript_modifier = "a decorator's marker on the function itself: copied"
    func._torchdynamo_orig_callable = func  # what a compiled wrapper carries: not ours to claim
    try:
        patch = make("t-attrs", Edit(f"{FIX}:Doc.tagged", (Hunk("value = 5", "value = 50"),)))
        patching.apply(patch)
        cleanup.append(patch)
        new = fixture_module.Doc.__dict__["tagged"]
        assert new.release_note == "public: copied"
        assert new._torchscript_modifier.endswith("copied")
        assert not hasattr(new, "_torchdynamo_orig_callable")
        assert fixture_module.Doc().tagged() == 50
    finally:
        del func.release_note, func._torchdynamo_orig_callable, func._torchscript_modifier


def test_patched_source_survives_linecache_clearcache(cleanup):
    from sglang.srt.layers.attention.nsa.nsa_indexer import Indexer

    patch = make("t-raise", GUARD_RAISES)
    patching.apply(patch)
    cleanup.append(patch)
    linecache.clearcache()
    func = Indexer.__dict__["_update_rope_guarded"].__func__
    assert 'raise RuntimeError("test-only hunk raised here")' in inspect.getsource(func.__code__)
    with pytest.raises(RuntimeError) as info:
        Indexer._update_rope_guarded(torch.zeros(2), torch.ones(2))
    linecache.clearcache()
    text = "".join(traceback.format_exception(info.value))
    assert 'raise RuntimeError("test-only hunk raised here")' in text


HOOKED = "sglang.srt.layers.attention.nsa_backend.NativeSparseAttnBackend.forward_decode"


@pytest.fixture
def hook_registry():
    """SGLang's own HookRegistry; hooks reset and the hooked attributes restored afterwards."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    saved = []

    def around(target):
        module, cls_name, attr = target.rsplit(".", 2)
        import importlib

        owner = getattr(importlib.import_module(module), cls_name)
        saved.append((owner, attr, owner.__dict__[attr]))
        calls = []

        def hook(original_fn, *args, **kwargs):
            calls.append(original_fn)
            return original_fn(*args, **kwargs)

        HookRegistry.register(target, hook, HookType.AROUND)
        HookRegistry.apply_hooks()
        return owner, calls

    HookRegistry.reset()
    yield around
    HookRegistry.reset()
    for owner, attr, value in reversed(saved):
        setattr(owner, attr, value)


def test_hook_registry_hook_applied_first_is_kept_and_the_patch_refused(hook_registry):
    from sglang_hip_decode.patches.nsa_cat_skip import PATCH

    owner, _ = hook_registry(HOOKED)
    hooked = owner.__dict__["forward_decode"]
    core_owner, core_attr, core_before = patching.resolve_target(PATCH.targets[0])
    with pytest.raises(patching.PatchError) as info:
        patching.apply(PATCH)
    assert str(info.value).startswith(
        "sglang.srt.layers.attention.nsa_backend:NativeSparseAttnBackend.forward_decode is wrapped by "
        "_wrap_fn.<locals>.wrapper (")
    assert "hook_registry.py" in str(info.value)
    assert owner.__dict__["forward_decode"] is hooked  # the other plugin's hook stays
    assert core_owner.__dict__[core_attr] is core_before  # all or nothing: forward_absorb_core untouched too
    assert not patching.is_applied(PATCH)
    report = evaluate_nsa_cat_skip()
    assert report.startswith("failed: sglang.srt.layers.attention.nsa_backend:NativeSparseAttnBackend.forward_decode "
                             "is wrapped by _wrap_fn.<locals>.wrapper")


def evaluate_nsa_cat_skip():
    from sglang_hip_decode import evaluate

    return evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "nsa-cat-skip"}).status_of(
        "nsa-cat-skip")


def test_hook_registry_after_the_patch_wraps_it_and_both_run(cleanup, hook_registry):
    # SGLang's normal order: load_plugins() (the patch applies) then apply_hooks() (hooks wrap).
    patch = make("t-double-eps", DOUBLE_EPS)
    patching.apply(patch)
    cleanup.append(patch)
    patched = rmsnorm_cls().__dict__["__init__"]
    owner, calls = hook_registry("sglang.srt.layers.layernorm.RMSNorm.__init__")
    assert owner.__dict__["__init__"] is not patched
    assert owner(8).variance_epsilon == 2e-6  # the hook ran the patched body
    assert calls == [patched]
    with pytest.raises(patching.PatchError, match=r"RMSNorm\.__init__ is wrapped by _wrap_fn\.<locals>\.wrapper .*"
                                                  r"installed after sglang-hip-decode patched it"):
        patching.unapply(patch)
    assert owner(8).variance_epsilon == 2e-6 and len(calls) == 2  # refused, nothing changed


def test_applied_context_unapplies_what_it_applied_when_a_later_patch_fails():
    original = raw(RMSNORM)
    good, bad = make("t-good", DOUBLE_EPS), make("t-bad", MISSING)
    with pytest.raises(patching.PatchError, match="did not match"):
        with patching.applied(good, bad):
            pass  # never reached: the second patch fails on entry
    assert raw(RMSNORM) is original and patching.active_patches(RMSNORM) == ()
    with patching.applied(good):
        assert rmsnorm_cls()(4).variance_epsilon == 2e-6
        with pytest.raises(RuntimeError, match="inside"):
            with patching.applied(make("t-grow", GROW_HIDDEN)):
                raise RuntimeError("inside")
        assert patching.active_patches(RMSNORM) == ("t-good",)  # the inner one unapplied on the error
    assert raw(RMSNORM) is original

"""indexer-rope-guard: the NSA/DSA indexer's RoPE write-back guard, upstream vs patched, on the
installed release (0.5.11 here; test_releases runs this file on 0.5.12.post1, 0.5.13.post1 and 0.5.23).

* The real ``_get_q_k_bf16`` / ``_get_k_bf16`` (``sglang_hip_decode.testing.nsa_indexer``) with in-place and
  out-of-place RoPE: bit-identical q and k, and the copy audit shows the write-back skipped only
  when RoPE returned the very views (in place), never otherwise.
* Constructed cases where upstream's ``data_ptr`` guard is wrong (DEFECT, asserted as such, not
  hidden) and the patched guard right: same start with another stride; overlapping views.
* Under torch.compile: 0.5.11's guard cannot be traced (graph break; fullgraph refuses it), 0.5.13's
  bypasses itself while compiling; the patched one compiles whole (inductor on the CPU) and gives
  eager's result.
"""

from __future__ import annotations

import pytest
import torch

from sgl_hip_kernels.testing.checks import assert_bits_equal
from sglang_hip_decode import patching
from sglang_hip_decode.testing.audit import CopyAudit
from sglang_hip_decode.testing.nsa_indexer import IndexerCase, IndexerPath, import_indexer
from sglang_hip_decode.patches.indexer_rope_guard import PATCH


@pytest.fixture(scope="module")
def ni():
    return import_indexer()


# From 0.5.13 upstream's guard skips its data_ptr() test while compiling (``not
# torch.compiler.is_compiling() and ...``): it compiles, and copies unconditionally there.
UPSTREAM_COMPILE_BYPASS = patching.installed_release() >= patching.parse_release("0.5.13")


def upstream_guard(ni):
    (target,) = patching.for_release(PATCH).targets  # this release's file
    assert target.startswith(ni.__name__ + ":")
    return patching.original(target).__func__


def patched_guard(ni):
    with patching.applied(PATCH):
        guard = ni.Indexer.__dict__["_update_rope_guarded"].__func__
    assert guard.__code__.co_filename.endswith("(patched by sglang-hip-decode: indexer-rope-guard)")
    return guard


@pytest.mark.parametrize("in_place", [True, False], ids=["rope-in-place", "rope-out-of-place"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_real_indexer_path_bit_identical_and_copies(rng, ni, in_place, tokens):
    case = IndexerCase(tokens=tokens, in_place_rope=in_place, heads=4, q_lora_rank=64, hidden=96)
    path = IndexerPath(case, rng, ni)
    q_lora, x, positions = path.inputs(rng)
    results = {}
    with path.rotate_stand_in():
        for arm, patches in (("upstream", ()), ("patched", (PATCH,))):
            with patching.applied(*patches):
                assert patching.is_applied(PATCH) == bool(patches)
                with CopyAudit() as audit_qk:
                    q, k = path.q_k(q_lora, x, positions)
                with CopyAudit() as audit_k:
                    k_only = path.k(x, positions)
                results[arm] = (q, k, k_only, audit_qk, audit_k)
    (q0, k0, ko0, a0, b0), (q1, k1, ko1, a1, b1) = results["upstream"], results["patched"]
    for a, b in ((q0, q1), (k0, k1), (ko0, ko1)):
        assert_bits_equal(a, b)
    assert a0.counts == a1.counts and a0.bytes == a1.bytes and b0.counts == b1.counts
    rope_bytes = tokens * case.rope_dim * 2
    if in_place:  # RoPE returned the very views: no write-back at all
        assert a1.counts["copy_"] == 0 and b1.counts["copy_"] == 0
    else:  # fresh tensors: q and k written back (q: every head), and k in _get_k_bf16
        assert a1.counts["copy_"] == 2 and a1.bytes["copy_"] == rope_bytes * (case.heads + 1)
        assert b1.counts["copy_"] == 1 and b1.bytes["copy_"] == rope_bytes


def test_true_alias_is_skipped_by_both(ni):
    buf = torch.randn(6, 128)
    for guard in (upstream_guard(ni), patched_guard(ni)):
        dst = buf[:, :64]
        with CopyAudit() as audit:
            guard(dst, buf[:, :64])  # the same view, as an in-place kernel returns it
        assert audit.total_count == 0


def test_defect_same_start_other_stride(ni):
    # src starts where dst starts but is laid out differently (a rotated result written densely at
    # the front of the buffer): the values of src must land in dst.
    def case():
        buf = torch.arange(8 * 128, dtype=torch.float32).reshape(8, 128)
        dst = buf[:, :64]  # strides (128, 1)
        src = buf.view(-1)[: 8 * 64].view(8, 64)  # strides (64, 1), same data_ptr
        return buf, dst, src, src.clone()

    buf, dst, src, want = case()
    assert src.data_ptr() == dst.data_ptr() and src.stride() != dst.stride()
    upstream_guard(ni)(dst, src)
    # DEFECT (0.5.11 ... 0.5.23): the data_ptr guard skips a copy it needed; dst keeps its old values.
    assert not torch.equal(dst, want), "upstream's guard was expected to skip this copy (documented defect)"
    buf, dst, src, want = case()
    patched_guard(ni)(dst, src)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("view", ["neg", "conj"])
def test_defect_negated_or_conjugated_view_of_dst(ni, view):
    # x._neg_view() / x.conj() share x's storage, offset, sizes and strides but read -x / conj(x):
    # not an alias whose values are already in place.
    def case():
        dtype = torch.complex64 if view == "conj" else torch.float32
        buf = torch.randn(4, 128, dtype=dtype, generator=torch.Generator().manual_seed(3))
        dst = buf[:, :64]
        src = dst._neg_view() if view == "neg" else dst.conj()
        assert src.data_ptr() == dst.data_ptr() and src.stride() == dst.stride() and (src.is_neg() or src.is_conj())
        return dst, src, src.resolve_neg().resolve_conj().clone()

    dst, src, want = case()
    upstream_guard(ni)(dst, src)
    # DEFECT (0.5.11 ... 0.5.23): the data_ptr guard takes the view for an alias and skips the copy.
    assert not torch.equal(dst, want), "upstream's guard was expected to skip this copy (documented defect)"
    dst, src, want = case()
    with CopyAudit() as audit:
        patched_guard(ni)(dst, src)
    assert torch.equal(dst, want)
    # the same memory: through a temporary (one clone), after torch's neg/conj fallback materialised
    # src once for ``is_set_to`` (an op without a Negative/Conjugate kernel: the other clone)
    assert audit.counts == {"clone": 2, "copy_": 1}


def test_defect_same_memory_read_as_another_dtype(ni):
    # src is dst's memory read as bfloat16 (same storage, offset, sizes, strides: is_set_to holds):
    # other values, so the copy converts them; the data_ptr guard skips it.
    def case():
        buf = torch.randn(4, 128, dtype=torch.float16, generator=torch.Generator().manual_seed(5))
        dst = buf[:, :64]
        src = dst.view(torch.bfloat16)
        assert dst.is_set_to(src) and src.data_ptr() == dst.data_ptr()
        return dst, src, src.to(torch.float16)

    dst, src, want = case()
    upstream_guard(ni)(dst, src)
    # DEFECT (0.5.11 ... 0.5.23): skipped, dst keeps the float16 values.
    assert not torch.equal(dst, want), "upstream's guard was expected to skip this copy (documented defect)"
    dst, src, want = case()
    patched_guard(ni)(dst, src)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("form", ["flat view", "extra dim", "empty, other width"])
def test_same_start_that_cannot_be_copied_is_skipped_as_upstream_does(ni, form):
    # src starts where dst starts but its shape does not broadcast to dst's (copy_ would raise):
    # upstream returns without a copy, and so must the patched guard (never raise where it does not).
    def case():
        buf = torch.arange(32, dtype=torch.float32).reshape(4, 8)
        if form == "flat view":
            return buf, buf.view(32)
        if form == "extra dim":
            return buf, buf.unsqueeze(0)
        return torch.empty(0, 3), torch.empty(0, 4)  # both data_ptr() 0

    results = []
    for guard in (upstream_guard(ni), patched_guard(ni)):
        dst, src = case()
        assert dst.data_ptr() == src.data_ptr()
        with pytest.raises(RuntimeError):
            dst.clone().copy_(src)  # no copy of src into dst exists
        with CopyAudit() as audit:
            guard(dst, src)
        assert audit.total_count == 0
        results.append(dst)
    assert_bits_equal(*results)


def test_defect_overlapping_views(ni):
    # dst = columns 32..95, src = columns 0..63 of one buffer: overlapping, different starts.
    def case():
        buf = torch.arange(4 * 128, dtype=torch.float32).reshape(4, 128)
        return buf, buf[:, 32:96], buf[:, 0:64], buf[:, 0:64].clone()

    buf, dst, src, want = case()
    upstream_guard(ni)(dst, src)
    # DEFECT (0.5.11 ... 0.5.23): copy_ between overlapping views reads elements it already overwrote.
    assert not torch.equal(dst, want), "upstream's copy_ over overlapping views was expected to be wrong (documented defect)"
    buf, dst, src, want = case()
    with CopyAudit() as audit:
        patched_guard(ni)(dst, src)
    assert torch.equal(dst, want)
    assert audit.counts == {"clone": 1, "copy_": 1}  # through a temporary


def test_views_of_one_buffer_that_do_not_overlap(ni):
    # Disjoint byte ranges: a direct copy, as upstream does.
    buf = torch.randn(8, 64)
    dst, src = buf[:4], buf[4:]
    want = src.clone()
    with CopyAudit() as audit:
        patched_guard(ni)(dst, src)
    assert torch.equal(dst, want) and audit.counts == {"copy_": 1}
    # Interleaved columns share no element, but their byte ranges meet: the guard is conservative
    # and copies through a temporary (still correct; one extra copy in a case no RoPE kernel makes).
    buf = torch.randn(4, 256)
    dst, src = buf[:, :64], buf[:, 128:192]
    want = src.clone()
    with CopyAudit() as audit:
        patched_guard(ni)(dst, src)
    assert torch.equal(dst, want) and audit.counts == {"clone": 1, "copy_": 1}


def _compiled_caller(guard):
    def caller(buf, src):
        guard(buf[:, :64], src)
        return buf * 2

    return caller


@pytest.mark.parametrize("alias", [True, False])
def test_torch_compile(ni, alias):
    up, pat = upstream_guard(ni), patched_guard(ni)

    def inputs():
        torch.manual_seed(1)
        buf = torch.randn(8, 128)
        return buf, (buf[:, :64] if alias else torch.randn(8, 64))

    buf, src = inputs()
    want = _compiled_caller(pat)(buf, src)
    torch._dynamo.reset()
    if UPSTREAM_COMPILE_BYPASS:  # compiles whole, and copies even a true alias: still the eager values
        assert torch.equal(torch.compile(_compiled_caller(up), fullgraph=True, backend="aot_eager")(*inputs()), want)
    else:  # 0.5.11's guard compares data_ptr()s, which dynamo cannot trace: fullgraph refuses it.
        with pytest.raises(Exception, match="DataPtrVariable|data_ptr"):
            torch.compile(_compiled_caller(up), fullgraph=True, backend="aot_eager")(*inputs())
    # Patched: one graph, inductor (C++ on the CPU), the eager result.
    torch._dynamo.reset()
    buf, src = inputs()
    got = torch.compile(_compiled_caller(pat), fullgraph=True, backend="inductor")(buf, src)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("in_place", [True, False], ids=["rope-in-place", "rope-out-of-place"])
def test_gpu_indexer_path_bit_identical(rng, ni, in_place):
    case = IndexerCase(tokens=256, in_place_rope=in_place, device="cuda")
    path = IndexerPath(case, rng, ni)
    q_lora, x, positions = path.inputs(rng)
    outs = []
    with path.rotate_stand_in():
        for patches in ((), (PATCH,)):
            with patching.applied(*patches):
                outs.append(path.q_k(q_lora, x, positions) + (path.k(x, positions),))
    assert len(outs) == 2 and len(outs[0]) == len(outs[1]) == 3
    for a, b in zip(*outs):
        assert_bits_equal(a, b)

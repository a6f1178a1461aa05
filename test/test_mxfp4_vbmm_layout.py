"""mxfp4-vbmm-layout parity: the real 0.5.11 forward_absorb_core with MXFP4 w_vc, unpatched vs patched.

* Kimi-K2 path (aiter MLA backend, non-core branch), o_proj bf16 / FP8 / MXFP4, batch 1, 7, 64 and
  idle: output bit-identical; the MXFP4 GEMM's output is a (H, B, V) view whose base is a contiguous
  (B, H, V) buffer; bf16 o_proj: the flatten copy is gone; FP8 / MXFP4 o_proj: no copy added and the
  quant kernel reads the contiguous buffer itself.
* Composition with nsa-cat-skip on the NSA path: all four on/off combinations bit-identical, each
  patch removing exactly its own copy.
* A bf16 w_vc (the branch the patch does not touch): identical, same copies.
"""

from __future__ import annotations


import pytest
import torch

from sglang_hip_decode import evaluate, patching
from sglang_hip_decode.testing.audit import CopyAudit
from sglang_hip_decode.testing.mla_decode import MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs
from sglang_hip_decode.patches.mxfp4_vbmm_layout import PATCH
from sglang_hip_decode.patches.nsa_cat_skip import PATCH as CAT_SKIP

SMALL = dict(heads=4, topk=32, context=64, hidden=64)


@pytest.fixture(scope="module")
def sg():
    return import_sglang()


def run_arms(case, rng, sg, arms):
    """Run the path once per arm (a tuple of patches to apply), from identical inputs."""
    path = MlaDecodePath(case, rng, sg)
    x = make_inputs(case, rng)
    results = {}
    with path.hip():
        for name, patches in arms.items():
            for p in patches:
                patching.apply(p)
            try:
                n_gemm, n_quant = len(path.record.gemm_out), len(path.record.quant_in)
                xi = x.clone()
                with CopyAudit() as audit:
                    out = path.step(xi)
                results[name] = dict(out=out, caches=xi.kv_caches, audit=audit,
                                     gemm_out=path.record.gemm_out[n_gemm:], quant_in=path.record.quant_in[n_quant:])
            finally:
                for p in reversed(patches):
                    patching.unapply(p)
    return results


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("o_proj", ["bf16", "fp8", "mxfp4"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_kimi_path_bit_identical_and_layout(rng, sg, o_proj, batch):
    case = MlaDecodeCase(batch=batch, attention="aiter", w_vc="mxfp4", o_proj=o_proj, layers=2, **SMALL)
    runs = run_arms(case, rng, sg, {"unpatched": (), "patched": (PATCH,)})
    before, after = runs["unpatched"], runs["patched"]
    for a, b in zip(before["out"], after["out"]):
        assert same_bits(a, b)
    h, v = case.heads, case.v_head_dim
    for y in before["gemm_out"]:
        assert y.shape == (h, batch, v) and y.is_contiguous()
    for y in after["gemm_out"]:
        base = y._base
        assert y.shape == (h, batch, v) and y.stride() == (v, h * v, 1)
        assert base is not None and base.shape == (batch, h, v) and base.is_contiguous() and base.data_ptr() == y.data_ptr()
    flatten_bytes = batch * h * v * 2
    if o_proj == "bf16":  # the flatten of the transposed view was a real copy; now a view
        if batch == 1:  # (H, 1, V) transposed is already contiguous: 0.5.11 copies nothing either
            assert before["audit"].total_count == 0
        else:
            assert before["audit"].counts == {"clone": case.layers}
            assert before["audit"].bytes["clone"] == case.layers * flatten_bytes
        assert after["audit"].total_count == 0
    else:  # the fused quant kernels read strides: no copy either way, and none added
        assert before["audit"].counts == after["audit"].counts
        assert before["audit"].total_count == 0
        for (_, x_before), (_, x_after), y in zip(before["quant_in"], after["quant_in"], after["gemm_out"]):
            assert x_before.is_contiguous() == (batch == 1) and x_after.is_contiguous()
            assert x_after.data_ptr() == y.data_ptr() and x_after.shape == (batch, h, v)
    assert before["audit"].kernels == after["audit"].kernels


@pytest.mark.parametrize("o_proj", ["bf16", "fp8", "mxfp4"])
def test_idle(rng, sg, o_proj):
    case = MlaDecodeCase(batch=0, mode="IDLE", attention="aiter", w_vc="mxfp4", o_proj=o_proj, **SMALL)
    runs = run_arms(case, rng, sg, {"unpatched": (), "patched": (PATCH,)})
    for a, b in zip(runs["unpatched"]["out"], runs["patched"]["out"]):
        assert a.shape == b.shape == (0, case.hidden) and a.dtype == b.dtype


@pytest.mark.parametrize("o_proj", ["bf16", "fp8", "mxfp4"])
def test_composes_with_nsa_cat_skip(rng, sg, o_proj):
    case = MlaDecodeCase(batch=5, attention="nsa", w_vc="mxfp4", o_proj=o_proj, **SMALL)
    arms = {"none": (), "vbmm": (PATCH,), "cat-skip": (CAT_SKIP,), "both": (PATCH, CAT_SKIP)}
    runs = run_arms(case, rng, sg, arms)
    for name in ("vbmm", "cat-skip", "both"):
        for a, b in zip(runs["none"]["out"], runs[name]["out"]):
            assert same_bits(a, b), name
        for a, b in zip(runs["none"]["caches"], runs[name]["caches"]):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name
    counts = {name: runs[name]["audit"].counts for name in arms}
    flatten = {"clone": 1} if o_proj == "bf16" else {}
    assert counts["none"] == {"cat": 1, **flatten}
    assert counts["vbmm"] == {"cat": 1}
    assert counts["cat-skip"] == {**flatten}
    assert counts["both"] == {}


def test_patches_in_either_order(rng, sg):
    case = MlaDecodeCase(batch=3, attention="nsa", w_vc="mxfp4", o_proj="bf16", **SMALL)
    runs = run_arms(case, rng, sg, {"ab": (PATCH, CAT_SKIP), "ba": (CAT_SKIP, PATCH), "none": ()})
    for a, b, c in zip(runs["ab"]["out"], runs["ba"]["out"], runs["none"]["out"]):
        assert same_bits(a, b) and same_bits(a, c)
    assert runs["ab"]["audit"].counts == runs["ba"]["audit"].counts == {}


def test_bf16_w_vc_branch_untouched(rng, sg):
    case = MlaDecodeCase(batch=4, attention="aiter", w_vc="bf16", o_proj="bf16", **SMALL)
    runs = run_arms(case, rng, sg, {"unpatched": (), "patched": (PATCH,)})
    for a, b in zip(runs["unpatched"]["out"], runs["patched"]["out"]):
        assert same_bits(a, b)
    assert runs["unpatched"]["audit"].counts == runs["patched"]["audit"].counts == {"clone": 1}


def test_not_applied_off_hip_unless_forced(sg):
    core = sg.fm.DeepseekMLAForwardMixin.__dict__["forward_absorb_core"]
    assert evaluate({}).status_of("mxfp4-vbmm-layout").startswith("off (not HIP")
    assert sg.fm.DeepseekMLAForwardMixin.__dict__["forward_absorb_core"] is core
    try:
        report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
        assert report.status_of("mxfp4-vbmm-layout") == report.status_of("nsa-cat-skip") == "applied"
        from sglang_hip_decode.patching import active_patches

        assert active_patches(PATCH.targets[0]) == ("nsa-cat-skip", "mxfp4-vbmm-layout")
    finally:
        patching.unapply(PATCH)
        patching.unapply(CAT_SKIP)
        from sglang_hip_decode.patches.indexer_rope_guard import PATCH as GUARD

        patching.unapply(GUARD)
    assert sg.fm.DeepseekMLAForwardMixin.__dict__["forward_absorb_core"] is core


@pytest.mark.gpu
@pytest.mark.parametrize("o_proj", ["bf16", "fp8", "mxfp4"])
def test_gpu_kimi_path_bit_identical(rng, sg, o_proj):
    case = MlaDecodeCase(batch=64, heads=8, topk=2048, context=4096, attention="aiter", w_vc="mxfp4", o_proj=o_proj,
                         layers=2, hidden=1024, device="cuda")
    runs = run_arms(case, rng, sg, {"unpatched": (), "patched": (PATCH,)})
    for a, b in zip(runs["unpatched"]["out"], runs["patched"]["out"]):
        assert same_bits(a, b)

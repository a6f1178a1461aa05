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

from sgl_hip_kernels.testing.checks import assert_bits_equal
from sglang_hip_decode import patching
from sglang_hip_decode.testing.audit import CopyAudit
from sglang_hip_decode.testing.mla_decode import MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs
from sglang_hip_decode.patches.mxfp4_vbmm_layout import PATCH
from sglang_hip_decode.patches.nsa_cat_skip import PATCH as CAT_SKIP

from patch_fixtures import edits_here

if not edits_here(PATCH)[0]:  # the per-release runs (test_releases) count this skip
    pytest.skip(edits_here(PATCH)[1], allow_module_level=True)

SMALL = dict(heads=4, topk=32, context=64, hidden=64)
CORE = PATCH.targets[0]  # forward_absorb_core, which both patches edit


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
            with patching.applied(*patches):
                n_gemm, n_quant = len(path.record.gemm_out), len(path.record.quant_in)
                xi = x.clone()
                with CopyAudit() as audit:
                    out = path.step(xi)
                results[name] = dict(out=out, caches=xi.kv_caches, audit=audit, active=patching.active_patches(CORE),
                                     gemm_out=path.record.gemm_out[n_gemm:], quant_in=path.record.quant_in[n_quant:])
            assert len(results[name]["out"]) == case.layers
    return results


def assert_same_outputs(a_run, b_run, what=""):
    assert len(a_run["out"]) == len(b_run["out"]) > 0
    for a, b in zip(a_run["out"], b_run["out"]):
        assert_bits_equal(a, b, what)


@pytest.mark.parametrize("o_proj", ["bf16", "fp8", "mxfp4"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_kimi_path_bit_identical_and_layout(rng, sg, o_proj, batch):
    case = MlaDecodeCase(batch=batch, attention="aiter", w_vc="mxfp4", o_proj=o_proj, layers=2, **SMALL)
    runs = run_arms(case, rng, sg, {"unpatched": (), "patched": (PATCH,)})
    before, after = runs["unpatched"], runs["patched"]
    assert after["active"] == ("mxfp4-vbmm-layout",) and before["active"] == ()
    assert_same_outputs(before, after)
    h, v = case.heads, case.v_head_dim
    assert len(before["gemm_out"]) == len(after["gemm_out"]) == case.layers
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
        assert len(before["quant_in"]) == len(after["quant_in"]) == case.layers
        for (_, x_before), (_, x_after), y in zip(before["quant_in"], after["quant_in"], after["gemm_out"]):
            assert x_before.is_contiguous() == (batch == 1) and x_after.is_contiguous()
            assert x_after.data_ptr() == y.data_ptr() and x_after.shape == (batch, h, v)
    assert before["audit"].kernels == after["audit"].kernels


@pytest.mark.parametrize("o_proj", ["bf16", "fp8", "mxfp4"])
def test_idle(rng, sg, o_proj):
    case = MlaDecodeCase(batch=0, mode="IDLE", attention="aiter", w_vc="mxfp4", o_proj=o_proj, **SMALL)
    runs = run_arms(case, rng, sg, {"unpatched": (), "patched": (PATCH,)})
    assert runs["patched"]["active"] == ("mxfp4-vbmm-layout",)  # the patched body ran
    assert_same_outputs(runs["unpatched"], runs["patched"])
    h, v = case.heads, case.v_head_dim
    for arm in runs.values():  # 0 tokens still go through the v-bmm and the o_proj quant
        assert arm["out"][0].shape == (0, case.hidden)
        assert [tuple(y.shape) for y in arm["gemm_out"]] == [(h, 0, v)] * case.layers
        assert len(arm["quant_in"]) == (0 if o_proj == "bf16" else case.layers)
        assert arm["audit"].total_count == 0
    # What shows the patched body ran with 0 tokens: the GEMM writes the transposed view of a
    # (0, H, V) buffer, and a quantised o_proj reads that buffer (contiguous (B, H, V) strides).
    for y in runs["patched"]["gemm_out"]:
        assert y.stride() == (v, h * v, 1) and y._base is not None and y._base.shape == (0, h, v)
    for y in runs["unpatched"]["gemm_out"]:
        assert y.is_contiguous() and y._base is None
    for _, x in runs["patched"]["quant_in"]:
        assert x.shape == (0, h, v) and x.stride() == (h * v, v, 1)


@pytest.mark.parametrize("o_proj", ["bf16", "fp8", "mxfp4"])
def test_composes_with_nsa_cat_skip(rng, sg, o_proj):
    case = MlaDecodeCase(batch=5, attention="nsa", w_vc="mxfp4", o_proj=o_proj, **SMALL)
    arms = {"none": (), "vbmm": (PATCH,), "cat-skip": (CAT_SKIP,), "both": (PATCH, CAT_SKIP)}
    if not edits_here(CAT_SKIP)[0]:  # upstream's own cat skip is in the unpatched code: compose with that
        arms = {"none": (), "vbmm": (PATCH,)}
    runs = run_arms(case, rng, sg, arms)
    for name in list(arms)[1:]:
        assert_same_outputs(runs["none"], runs[name], name)
        assert len(runs["none"]["caches"]) == len(runs[name]["caches"]) == case.layers
        for a, b in zip(runs["none"]["caches"], runs[name]["caches"]):
            assert_bits_equal(a, b, name)
    counts = {name: runs[name]["audit"].counts for name in arms}
    flatten = {"clone": 1} if o_proj == "bf16" else {}
    cat = {"cat": 1} if "cat-skip" in arms else {}  # upstream's own skip (0.5.12+) has no cat left
    assert counts["none"] == {**cat, **flatten}
    assert counts["vbmm"] == cat
    if "cat-skip" in arms:
        assert counts["cat-skip"] == {**flatten}
        assert counts["both"] == {}


@pytest.mark.skipif(not edits_here(CAT_SKIP)[0], reason="nsa-cat-skip has no edits on this release: no order to test")
def test_patches_in_either_order(rng, sg):
    case = MlaDecodeCase(batch=3, attention="nsa", w_vc="mxfp4", o_proj="bf16", **SMALL)
    runs = run_arms(case, rng, sg, {"ab": (PATCH, CAT_SKIP), "ba": (CAT_SKIP, PATCH), "none": ()})
    assert_same_outputs(runs["ab"], runs["ba"])
    assert_same_outputs(runs["ab"], runs["none"])
    assert runs["ab"]["active"] == ("mxfp4-vbmm-layout", "nsa-cat-skip")
    assert runs["ba"]["active"] == ("nsa-cat-skip", "mxfp4-vbmm-layout")
    assert runs["ab"]["audit"].counts == runs["ba"]["audit"].counts == {}


def test_bf16_w_vc_branch_untouched(rng, sg):
    case = MlaDecodeCase(batch=4, attention="aiter", w_vc="bf16", o_proj="bf16", **SMALL)
    runs = run_arms(case, rng, sg, {"unpatched": (), "patched": (PATCH,)})
    assert_same_outputs(runs["unpatched"], runs["patched"])
    assert runs["patched"]["active"] == ("mxfp4-vbmm-layout",)
    assert runs["unpatched"]["audit"].counts == runs["patched"]["audit"].counts == {"clone": 1}


@pytest.mark.gpu
@pytest.mark.parametrize("o_proj", ["bf16", "fp8", "mxfp4"])
def test_gpu_kimi_path_bit_identical(rng, sg, o_proj):
    case = MlaDecodeCase(batch=64, heads=8, topk=2048, context=4096, attention="aiter", w_vc="mxfp4", o_proj=o_proj,
                         layers=2, hidden=1024, device="cuda")
    runs = run_arms(case, rng, sg, {"unpatched": (), "patched": (PATCH,)})
    assert_same_outputs(runs["unpatched"], runs["patched"])
    assert runs["patched"]["active"] == ("mxfp4-vbmm-layout",)

"""Portable fused_qk_rope_cat_and_cache_mla vs the torch reference (aiter's contract).

CPU: the Triton interpreter in fp32 (bit-exact with the reference: same fp32 operations).
GPU: bf16 and fp8 outputs, tolerance from torch's own same-precision error; CUDA-graph replay.
The reference's RoPE is itself checked against complex multiplication.
"""

from __future__ import annotations

import pytest
import torch

from sgl_hip_kernels.testing.checks import assert_bits_equal, assert_within_torch_error, graph_replay_equals_eager
from sgl_hip_kernels.standins.mla_rope_cat import fused_qk_rope_cat_and_cache_mla
from sgl_hip_kernels.rotations_ref import rope_ref
from sgl_hip_kernels.standins.mla_rope_cat_ref import fused_qk_rope_cat_and_cache_mla_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(rng, b, qh, kh=1, bk=None, slots=16, half=True, dtype=torch.float32, strided_q=True, max_pos=64):
    bk = b if bk is None else bk
    r = lambda *s: torch.randn(*s, generator=rng).to(dtype)  # noqa: E731
    q_nope = r(qh, b, 512).transpose(0, 1) if strided_q else r(b, qh, 512)  # a bmm output is (H,B,D)^T
    q_pe = r(b, qh, 64)
    k_nope, k_pe = r(bk, kh, 512), r(bk, kh, 64)
    d = 32 if half else 64
    angle = torch.rand(max_pos, 1, 1, d, generator=rng) * 6.28
    cos, sin = angle.cos(), angle.sin()  # fp32 tables, as sglang's rotary_emb holds them
    pos = torch.randint(0, max_pos, (b,), generator=rng)
    perm = torch.randperm(slots, generator=rng)[:bk]
    return dict(q_nope=q_nope, q_pe=q_pe, k_nope=k_nope, k_pe=k_pe, slots=perm, pos=pos, cos=cos, sin=sin)


def to(device, d):
    return {k: v.to(device) for k, v in d.items()}


def run_both(x, kh, slots_total, is_neox, k_scale, cache_dtype, q_out_dtype=None, n_zero=0, b_slot=None, device=DEV):
    x = to(device, x)
    b_slot = x["k_nope"].shape[0] if b_slot is None else b_slot
    slot_mapping = x["slots"][:b_slot].clone()
    results = []
    for impl in (fused_qk_rope_cat_and_cache_mla, fused_qk_rope_cat_and_cache_mla_ref):
        cache = torch.full((slots_total, kh, 576), float("nan"), device=device).to(cache_dtype)
        k_pe_out = torch.full_like(x["k_pe"], float("nan"))
        out = impl(
            x["q_nope"], x["q_pe"], x["k_nope"], x["k_pe"], cache, slot_mapping, x["pos"], x["cos"], x["sin"],
            k_scale, is_neox, num_decode_toks_for_zeros=n_zero, k_pe_out=k_pe_out, q_out_dtype=q_out_dtype,
        )
        assert out[3] is cache and out[2] is k_pe_out  # outputs in place, as aiter
        results.append(out)
    return results, slot_mapping


@pytest.mark.parametrize("is_neox", [False, True], ids=["gptj", "neox"])
@pytest.mark.parametrize("half", [True, False], ids=["freq32", "freq64"])
@pytest.mark.parametrize("scale", ["tensor", "none"])
def test_interpreter_fp32_bit_exact(rng, is_neox, half, scale):
    b, qh = 3, 5  # heads not a multiple of 16
    x = make_inputs(rng, b, qh, half=half, slots=12)
    x["slots"][1] = -1  # a padded token: nothing written for it
    k_scale = torch.tensor([0.625], device=DEV) if scale == "tensor" else None
    (tri, ref), slot_mapping = run_both(x, 1, 12, is_neox, k_scale, torch.float32, n_zero=2)
    for got, want in zip(tri, ref):
        assert_bits_equal(got, want)
    # Poison checks: every q element written; only the valid slots' cache rows written, fully.
    assert not tri[0].isnan().any()
    written = slot_mapping[slot_mapping >= 0].cpu()
    cache = tri[3].cpu()
    assert not cache[written].isnan().any()
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[written] = False
    assert cache[untouched].isnan().all()
    assert tri[2][1].isnan().all() and not tri[2][[0, 2]].isnan().any()  # k_pe_out of the skipped row untouched
    assert tri[4].shape == (2, qh, 512) and (tri[4] == 0).all()


def test_apply_scale_false_ignores_k_scale(rng):
    x = make_inputs(rng, 2, 2)
    dev = to(DEV, x)
    cache = torch.zeros(16, 1, 576, device=DEV)
    fused_qk_rope_cat_and_cache_mla(dev["q_nope"], dev["q_pe"], dev["k_nope"], dev["k_pe"], cache, dev["slots"], dev["pos"],
                                    dev["cos"], dev["sin"], torch.tensor([4.0], device=DEV), False, apply_scale=False)
    assert torch.equal(cache[dev["slots"], 0, :512], dev["k_nope"][:, 0])


def test_mixed_batch_k_only_rows_and_gqa(rng):
    # 2 decode tokens with 4 q heads over 2 k heads, plus 3 K-only (prefill) rows; one more k row
    # beyond slot_mapping that must not be written.
    x = make_inputs(rng, 2, 4, kh=2, bk=6, slots=20)
    (tri, ref), _ = run_both(x, 2, 20, False, torch.tensor([1.5], device=DEV), torch.float32, b_slot=5)
    for got, want in zip(tri, ref):
        assert_bits_equal(got, want)
    assert tri[2][5].isnan().all()  # row 5 is past slot_mapping: k_pe_out untouched
    # K-only rows store k_pe as given (no RoPE), the decode rows rotate it.
    assert torch.equal(tri[2][2:5], x["k_pe"][2:5].to(DEV))
    assert not torch.equal(tri[2][:2], x["k_pe"][:2].to(DEV))


@pytest.mark.parametrize("b", [0, 1])
def test_zero_and_one_token(rng, b):
    x = make_inputs(rng, b, 2)
    (tri, ref), _ = run_both(x, 1, 16, False, None, torch.float32)
    assert tri[0].shape == (b, 2, 576)
    for got, want in zip(tri, ref):
        assert_bits_equal(got, want)


def test_reference_rope_is_complex_rotation(rng):
    x = torch.randn(4, 3, 64, generator=rng, dtype=torch.float64)
    angle = torch.rand(4, 1, 32, generator=rng, dtype=torch.float64)
    got = rope_ref(x.float(), angle.cos().float(), angle.sin().float(), is_neox=False).double()
    rotated = torch.view_as_complex(x.unflatten(-1, (32, 2))) * torch.polar(torch.ones_like(angle), angle)
    want = torch.view_as_real(rotated).flatten(-2)
    assert (got - want).abs().max() < 1e-5
    neox = rope_ref(x.float(), angle.cos().float(), angle.sin().float(), is_neox=True).double()
    halves = torch.complex(x[..., :32], x[..., 32:]) * torch.polar(torch.ones_like(angle), angle)
    assert (neox - torch.cat([halves.real, halves.imag], -1)).abs().max() < 1e-5


def test_bad_inputs_are_refused(rng):
    x = to(DEV, make_inputs(rng, 2, 2))
    cache = torch.zeros(16, 1, 576, device=DEV)
    args = [x["q_nope"], x["q_pe"], x["k_nope"], x["k_pe"], cache, x["slots"], x["pos"], x["cos"], x["sin"], None, False]
    bad_cache = torch.zeros(16, 1, 512, device=DEV)
    with pytest.raises(ValueError, match="kv_cache"):
        fused_qk_rope_cat_and_cache_mla(*args[:4], bad_cache, *args[5:])
    with pytest.raises(ValueError, match="cos/sin last dim"):
        fused_qk_rope_cat_and_cache_mla(*args[:7], x["cos"][..., :16], x["sin"][..., :16], None, False)
    with pytest.raises(ValueError, match="multiple of k heads"):
        fused_qk_rope_cat_and_cache_mla(x["q_nope"], x["q_pe"], x["k_nope"].expand(-1, 3, -1), x["k_pe"].expand(-1, 3, -1),
                                        torch.zeros(16, 3, 576, device=DEV), *args[5:])


FP8 = torch.float8_e4m3fn


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype, q_dtype", [(torch.bfloat16, torch.bfloat16), (FP8, FP8)], ids=["bf16", "fp8"])
@pytest.mark.parametrize("is_neox", [False, True], ids=["gptj", "neox"])
def test_gpu_bf16_fp8_against_reference(rng, cache_dtype, q_dtype, is_neox):
    b, qh = 37, 8
    x = make_inputs(rng, b, qh, dtype=torch.bfloat16, slots=64, max_pos=4096)
    x["slots"][5] = -1
    scale = torch.tensor([0.5], device="cuda")
    (tri, ref), slot_mapping = run_both(x, 1, 64, is_neox, scale, cache_dtype, q_out_dtype=q_dtype, device="cuda")
    # q's nope half is a cast: exact. The rope half and the cache: within torch's own error.
    assert_bits_equal(tri[0][..., :512].contiguous(), ref[0][..., :512].contiguous())
    xd = to("cuda", x)
    table = lambda t: t.reshape(t.shape[0], -1)[xd["pos"]][:, None, :].double()  # noqa: E731
    q_rope64 = rope_ref(xd["q_pe"].double(), table(xd["cos"]), table(xd["sin"]), is_neox)
    # torch's own same-precision result is the reference rounded once to the output dtype.
    assert_within_torch_error(tri[0][..., 512:], q_rope64, ref[0][..., 512:], "q rope")
    valid = slot_mapping >= 0
    rows, slots = valid.nonzero()[:, 0], slot_mapping[valid]
    k_rope64 = rope_ref(xd["k_pe"][rows].double(), table(xd["cos"])[rows], table(xd["sin"])[rows], is_neox)
    cache64 = torch.cat([xd["k_nope"][rows].double(), k_rope64], -1) * (1 / scale.double())
    assert_within_torch_error(tri[3][slots], cache64, ref[3][slots], "kv cache")
    graph_replay_equals_eager(
        lambda: fused_qk_rope_cat_and_cache_mla(xd["q_nope"], xd["q_pe"], xd["k_nope"], xd["k_pe"], tri[3], slot_mapping,
                                                xd["pos"], xd["cos"], xd["sin"], scale, is_neox, q_out=tri[0], k_pe_out=tri[2]),
        [tri[0], tri[2], tri[3]],
    )

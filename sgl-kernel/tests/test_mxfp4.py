"""Portable MXFP4 / FP8 kernels vs the references (aiter's rounding), and the references vs the
format's definition.

CPU (interpreter, fp32): MXFP4 flatten-quant bit-exact; FP8 flatten-quant scales bit-exact (the
interpreter's fp32->fp8 cast is not trustworthy, so the fp8 bytes are checked on the GPU); the GEMM
within 2x torch's own fp32 error. Odd strides and the transposed output view throughout.
GPU: bf16 inputs, fp8 bytes bit-exact, GEMM in bf16 output within torch's error, graph replay.
"""

from __future__ import annotations

import pytest
import torch

from sgl_hip_kernels.testing.checks import assert_within_torch_error, graph_replay_equals_eager
from sgl_hip_kernels.standins import mxfp4_ref as ref
from sgl_hip_kernels.standins.mxfp4 import (batched_gemm_afp4wfp4_pre_quant, fused_flatten_fp8_group_quant,
                                             fused_flatten_mxfp4_quant)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def spread(rng, *shape):
    """Random values over 12 orders of magnitude, with exact zeros and power-of-two edges mixed in."""
    x = torch.randn(*shape, generator=rng) * torch.exp2(torch.randint(-20, 20, shape, generator=rng).float())
    flat = x.view(-1)
    flat[::97] = 0.0
    flat[5::89] = 6.0 * torch.exp2(torch.randint(-5, 5, flat[5::89].shape, generator=rng).float())
    return x


def test_reference_e2m1_rounding_is_nearest_ties_away(rng):
    # Independent check of the bit rule: nearest e2m1 value, ties away from zero, saturating at 6.
    grid = torch.tensor(ref.E2M1_VALUES)
    q = torch.cat([torch.rand(4000, generator=rng) * 7, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5])])
    q = torch.cat([q, -q])
    x = torch.zeros(q.numel(), 32)
    x[:, 0], x[:, 1] = q, 4.0  # amax 4 -> scale exponent 0: the value is quantised as is
    packed, scales = ref.mxfp4_quant_ref(x)
    assert (scales == 127).all()
    got = ref.mxfp4_dequant_ref(packed, scales)[:, 0]
    dist = (q.abs()[:, None] - grid[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    ties_away = torch.where(dist <= best + 1e-7, grid[None, :], torch.tensor(-1.0)).max(1).values
    assert torch.equal(got, torch.sign(q) * ties_away)


def test_reference_scale_rule(rng):
    # amax = f * 2^k with f in [1, 2): f < 1.75 keeps 2^k, f >= 1.75 rounds up to 2^(k+1); then
    # exponent = log2 - 2 (so 6.0 = 1.5 * 4 stays at exponent 0 and is representable).
    for amax, byte in ((4.0, 127), (6.0, 127), (6.99, 127), (7.0, 128), (7.9, 128), (0.75, 124), (1e-45, 0)):
        x = torch.zeros(1, 32)
        x[0, 3] = amax
        assert ref.mxfp4_quant_ref(x)[1].item() == byte, amax


@pytest.mark.parametrize("m, n1, n2", [(5, 4, 128), (1, 8, 32), (0, 4, 64)])
def test_flatten_mxfp4_bit_exact(rng, m, n1, n2):
    x = spread(rng, n1, m, n2).transpose(0, 1).to(DEV)  # strided (M, N1, N2)
    out, scales = fused_flatten_mxfp4_quant(x)
    want_out, want_scales = ref.fused_flatten_mxfp4_quant_ref(x)
    assert torch.equal(out, want_out) and torch.equal(scales, want_scales)
    if m:
        assert scales.stride() == want_scales.stride() == (1, m)


@pytest.mark.parametrize("group", [128, 64])
def test_flatten_fp8_scales_exact(rng, group):
    x = spread(rng, 6, 3, 128).to(DEV)[:, :, :].transpose(0, 1).contiguous().transpose(0, 1)
    q, s = fused_flatten_fp8_group_quant(x, group)
    q_ref, s_ref = ref.fused_flatten_fp8_group_quant_ref(x, group)
    assert torch.equal(s, s_ref) and q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape
    if DEV == "cuda":
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_gemm_fp32_with_transposed_output(rng):
    b, m, n, k = 3, 7, 96, 512
    x = (torch.randn(m, b, k, generator=rng) * 0.3).transpose(0, 1).to(DEV)  # (B, M, K) strided
    wq, ws = ref.mxfp4_quant_ref(torch.randn(b, n, k, generator=rng) * 0.05)
    wq, ws = wq.to(DEV), ws.to(DEV)
    buf = torch.full((m, b, n), float("nan"), device=DEV)
    y = buf.transpose(0, 1)
    got = batched_gemm_afp4wfp4_pre_quant(x, wq, ws, torch.float32, y)
    assert got is y and not buf.isnan().any()
    exact = ref.batched_gemm_afp4wfp4_pre_quant_ref(x.double(), wq, ws, torch.float64)  # fp64 sum of exact products
    torch_fp32 = torch.bmm(ref.mxfp4_dequant_ref(*ref.mxfp4_quant_ref(x)), ref.mxfp4_dequant_ref(wq, ws).transpose(1, 2))
    assert_within_torch_error(y, exact, torch_fp32, "mxfp4 gemm fp32")


def test_bad_inputs(rng):
    with pytest.raises(ValueError, match="power of two"):
        fused_flatten_mxfp4_quant(torch.zeros(2, 3, 48, device=DEV))
    with pytest.raises(ValueError, match="do not agree"):
        batched_gemm_afp4wfp4_pre_quant(torch.zeros(1, 2, 512, device=DEV), torch.zeros(1, 4, 128, dtype=torch.uint8, device=DEV),
                                        torch.zeros(1, 4, 16, dtype=torch.uint8, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 256])
def test_gpu_gemm_bf16_and_graph(rng, m):
    b, n, k = 8, 128, 512  # Kimi-K2 per-rank v-bmm at TP8
    x = (torch.randn(b, m, k, generator=rng) * 0.3).to(torch.bfloat16).cuda()
    wq, ws = ref.mxfp4_quant_ref(torch.randn(b, n, k, generator=rng) * 0.05)
    wq, ws = wq.cuda(), ws.cuda()
    buf = torch.empty(m, b, n, dtype=torch.bfloat16, device="cuda")
    y = buf.transpose(0, 1)
    batched_gemm_afp4wfp4_pre_quant(x, wq, ws, torch.bfloat16, y)
    exact = ref.batched_gemm_afp4wfp4_pre_quant_ref(x.double(), wq, ws, torch.float64)
    torch_bf16 = ref.batched_gemm_afp4wfp4_pre_quant_ref(x, wq, ws, torch.bfloat16)  # rounded once to bf16
    assert_within_torch_error(y, exact, torch_bf16, "mxfp4 gemm bf16")
    graph_replay_equals_eager(lambda: batched_gemm_afp4wfp4_pre_quant(x, wq, ws, torch.bfloat16, y), [buf])


@pytest.mark.gpu
def test_gpu_flatten_quants_bit_exact(rng):
    x = spread(rng, 8, 256, 128).to(torch.bfloat16).cuda().transpose(0, 1)  # (B=256, H=8, V=128) strided
    assert all(torch.equal(a, b) for a, b in zip(fused_flatten_mxfp4_quant(x), ref.fused_flatten_mxfp4_quant_ref(x)))
    q, s = fused_flatten_fp8_group_quant(x, 128)
    q_ref, s_ref = ref.fused_flatten_fp8_group_quant_ref(x, 128)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))

"""Portable fused QK RMSNorm (DeepSeek-V4) vs the fp32 reference.

CPU: the interpreter in fp32 against fp64, within 2x torch's own fp32 error. GPU: bf16 within 2x
torch's bf16 error, every output element written (NaN-poisoned first), graph replay == eager.
Edges: D not a power of two, heads not a multiple of 16, 0 and 1 token, q weight given, in place,
strided rows.
"""

from __future__ import annotations

import pytest
import torch

from sgl_hip_kernels.testing.checks import assert_within_torch_error, graph_replay_equals_eager
from sgl_hip_kernels.dsv4.qk_norm import fused_qk_norm
from sgl_hip_kernels.dsv4.qk_norm_ref import fused_qk_norm_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(rng, t, hq, hk, d, dtype=torch.float32, strided=False):
    scale = torch.exp2(torch.randint(-6, 6, (t, hq + hk, 1), generator=rng).float())
    x = torch.randn(t, hq + hk, d + (32 if strided else 0), generator=rng) * scale
    x = x[..., :d] if strided else x  # rows with a stride larger than D
    q, k = x[:, :hq], x[:, hq:]
    w = torch.randn(d, generator=rng) * 0.5 + 1.0
    return q.to(dtype).to(DEV), k.to(dtype).to(DEV), w.to(DEV)


@pytest.mark.parametrize("t, hq, hk, d, q_weight, strided", [
    (3, 5, 1, 96, False, False), (2, 64, 1, 512, False, True), (1, 3, 2, 128, True, False), (0, 4, 1, 64, False, False),
])
def test_interpreter_fp32(rng, t, hq, hk, d, q_weight, strided):
    q, k, w = inputs(rng, t, hq, hk, d, strided=strided)
    qw = (torch.randn(d, generator=rng) + 1.0).to(DEV) if q_weight else None
    q_out = torch.full_like(q, float("nan"))
    k_out = torch.full_like(k, float("nan"))
    got_q, got_k = fused_qk_norm(q, k, qw, w, 1e-6, q_out=q_out, k_out=k_out)
    assert got_q is q_out and got_k is k_out
    ref64 = fused_qk_norm_ref(q.double(), k.double(), None if qw is None else qw.double(), w.double(), 1e-6)
    ref32 = fused_qk_norm_ref(q, k, qw, w, 1e-6)
    if t:
        assert_within_torch_error(got_q, ref64[0], ref32[0], "q")
        assert_within_torch_error(got_k, ref64[1], ref32[1], "k")
    assert not got_q.isnan().any() and not got_k.isnan().any()


def test_in_place_and_bad_inputs(rng):
    q, k, w = inputs(rng, 2, 4, 1, 64)
    want = fused_qk_norm_ref(q, k, None, w, 1e-6)
    fused_qk_norm(q, k, None, w, 1e-6, q_out=q, k_out=k)
    assert (q - want[0]).abs().max() < 1e-5 and (k - want[1]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="weights"):
        fused_qk_norm(q, k, None, w[:32], 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        fused_qk_norm(torch.randn(2, 64, 4, device=DEV).transpose(1, 2), k, None, w, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 8192])
def test_gpu_bf16(rng, t):
    q, k, w = inputs(rng, t, 64, 1, 512, dtype=torch.bfloat16)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    fused_qk_norm(q, k, None, w, 1e-6, q_out=q_out, k_out=k_out)
    ref64 = fused_qk_norm_ref(q.double(), k.double(), None, w.double(), 1e-6)

    def torch_bf16(x, wt):  # torch's own bf16 computation
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y if wt is None else y * wt.to(torch.bfloat16)

    assert_within_torch_error(q_out, ref64[0], torch_bf16(q, None), "q bf16")
    assert_within_torch_error(k_out, ref64[1], torch_bf16(k, w), "k bf16")
    graph_replay_equals_eager(lambda: fused_qk_norm(q, k, None, w, 1e-6, q_out=q_out, k_out=k_out), [q_out, k_out])

"""Portable NSA sparse MLA decode vs the torch reference (TileLang tilelang_sparse_fwd contract).

CPU: the Triton interpreter in fp32 against an fp64 reference. GPU: bf16 and fp8 inputs against
the fp32 reference, tolerance from torch's own bf16 error; CUDA-graph replay equals eager.
Edge cases: heads not a multiple of 16, ragged -1 padding, a token with no valid slot (zeros),
duplicate slots, NaN in cache slots no index points at, topk 2048.
"""

from __future__ import annotations

import pytest
import torch

from sgl_hip_kernels.testing.checks import assert_within_torch_error, graph_replay_equals_eager
from sgl_hip_kernels.standins.sparse_mla_decode_ref import sparse_mla_decode_ref
from sgl_hip_kernels.standins.sparse_mla_decode import sparse_mla_decode

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(rng, n, h, slots, topk, dtype=torch.float32, device=DEV):
    q = torch.randn(n, h, 576, generator=rng)
    kv = torch.randn(slots, 1, 576, generator=rng)
    idx = torch.empty(n, 1, topk, dtype=torch.int32)
    for i in range(n):
        idx[i, 0] = torch.randperm(slots, generator=rng)[:topk]
    if n > 1:
        idx[1, 0, topk // 3 :] = -1  # ragged
    if n > 2:
        idx[2] = -1  # no valid slot at all
    if n > 3:
        idx[3, 0, 1] = idx[3, 0, 0]  # a duplicate slot counts twice
    # NaN in every slot no index refers to: a read of any of them would show.
    used = torch.zeros(slots, dtype=torch.bool)
    used[idx[idx >= 0].long()] = True
    kv[~used] = float("nan")
    return q.to(dtype).to(device), kv.to(dtype).to(device), idx.to(device)


@pytest.mark.parametrize("n, h, topk", [(4, 3, 64), (2, 16, 96), (1, 8, 2048), (0, 8, 64)])
def test_interpreter_fp32(rng, n, h, topk):
    q, kv, idx = make_case(rng, n, h, max(2 * topk, 64), topk)
    out = torch.full((n, h, 512), float("nan"), device=DEV)
    got = sparse_mla_decode(q, kv, idx, sm_scale=576**-0.5, out=out)
    assert got is out
    ref64 = sparse_mla_decode_ref(q.double(), kv.double(), idx, 576**-0.5)
    ref32 = sparse_mla_decode_ref(q, kv, idx, 576**-0.5)
    assert not got.isnan().any()
    if n:
        assert_within_torch_error(got, ref64, ref32, "fp32 sparse decode")
    if n > 2:
        assert (got[2] == 0).all()  # no valid slot: zeros, not NaN


def test_reference_against_dense_attention(rng):
    # With every slot valid and listed once, sparse decode is plain softmax attention over them.
    q = torch.randn(2, 4, 576, generator=rng, dtype=torch.float64)
    kv = torch.randn(32, 1, 576, generator=rng, dtype=torch.float64)
    idx = torch.arange(32, dtype=torch.int32).expand(2, 1, 32)
    scale = 0.05
    dense = torch.softmax(q @ kv[:, 0].T * scale, -1) @ kv[:, 0, :512]
    assert (sparse_mla_decode_ref(q, kv, idx, scale).double() - dense).abs().max() < 1e-12


def test_bad_inputs_are_refused(rng):
    q, kv, idx = make_case(rng, 2, 4, 64, 16)
    with pytest.raises(ValueError, match="kv"):
        sparse_mla_decode(q, kv[..., :512], idx, 0.1)
    with pytest.raises(ValueError, match="indices"):
        sparse_mla_decode(q, kv, idx[:1], 0.1)
    with pytest.raises(ValueError, match="int32/int64"):
        sparse_mla_decode(q, kv, idx.float(), 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("h", [8, 64])
def test_gpu_against_reference(rng, dtype, h):
    n, topk = 6, 2048
    q, kv, idx = make_case(rng, n, h, 4096, topk, dtype=dtype, device="cuda")
    if dtype != torch.bfloat16:  # keep fp8 values away from saturation
        q, kv = (q.float() * 0.5).to(dtype), (kv.float() * 0.5).to(dtype)
    scale = 576**-0.5
    out = torch.empty(n, h, 512, dtype=torch.bfloat16, device="cuda")
    got = sparse_mla_decode(q, kv, idx, scale, out=out)
    ref64 = sparse_mla_decode_ref(q.double(), kv.double(), idx, scale).double()
    # torch's own bf16 computation of the same thing (bf16 matmuls and softmax)
    valid = (idx[:, 0] >= 0)[..., None]
    rows = kv[:, 0].to(torch.bfloat16)[idx[:, 0].clamp_min(0).long()]
    rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    s = torch.einsum("nhd,nkd->nhk", q.to(torch.bfloat16), rows) * scale
    s = s.masked_fill((idx < 0), float("-inf"))
    p = torch.softmax(s.float(), -1).to(torch.bfloat16).nan_to_num(0)
    torch_bf16 = torch.einsum("nhk,nkd->nhd", p, rows[..., :512])
    assert_within_torch_error(got, ref64, torch_bf16, f"{dtype} sparse decode")
    assert (got[2] == 0).all() and not got.isnan().any()
    graph_replay_equals_eager(lambda: sparse_mla_decode(q, kv, idx, scale, out=out), [out])

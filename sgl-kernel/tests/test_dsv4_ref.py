"""The DeepSeek-V4 compressor reference (dsv4_ref) against the definition written out another way,
and its edges: -inf scores, a block with no valid row, the first block of a sequence (no previous
block), the indexer's rotation. These pin the contract the fused kernels (issue #7) must meet."""

from __future__ import annotations

import torch

from sgl_hip_kernels.dsv4_ref import block_rows_ref, compress_sequence_ref, pool_block_ref
from sgl_hip_kernels.ref import hadamard_ref


def tables(rng, max_pos=1024):
    angle = torch.rand(max_pos, 32, generator=rng, dtype=torch.float64) * 6.283
    return angle.cos(), angle.sin()


def test_pool_is_a_per_channel_softmax(rng):
    k, d = 8, 128
    kv, score, bias = (torch.randn(k, d, generator=rng, dtype=torch.float64) for _ in range(3))
    valid = torch.tensor([False, True, True, True, True, True, False, True])
    w = torch.randn(d, generator=rng, dtype=torch.float64)
    cos, sin = torch.ones(32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64)  # RoPE at angle 0: identity
    got = pool_block_ref(kv, score, valid, bias, w, 1e-6, cos, sin)
    p = torch.softmax((score + bias)[valid], dim=0)
    c = (p * kv[valid]).sum(0)
    want = c / torch.sqrt(c.pow(2).mean() + 1e-6) * w
    assert torch.allclose(got, want, atol=1e-12)


def test_guards_no_nan(rng):
    k, d = 8, 64
    kv, score, bias = (torch.randn(k, d, generator=rng) for _ in range(3))
    w = torch.ones(d)
    cos, sin = torch.ones(32), torch.zeros(32)
    score[:, 5] = float("-inf")  # one channel with every score -inf
    score[3] = float("-inf")  # one row -inf everywhere
    out = pool_block_ref(kv, score, torch.ones(k, dtype=torch.bool), bias, w, 1e-6, cos, sin)
    assert not out.isnan().any()
    none = pool_block_ref(kv, score, torch.zeros(k, dtype=torch.bool), bias, w, 1e-6, cos, sin)
    assert torch.equal(none, torch.zeros(d))  # no valid row: defined, zero


def test_ratio4_rows_and_first_block(rng):
    d = 16
    u = torch.randn(12, 4 * d, generator=rng)
    kv, score, valid = block_rows_ref(lambda t: u[t], 0, 4, d)
    assert valid.tolist() == [False] * 4 + [True] * 4  # block 0 has no previous block
    kv, score, valid = block_rows_ref(lambda t: u[t], 2, 4, d)
    assert valid.all()
    assert torch.equal(kv[0], u[4, :d]) and torch.equal(score[0], u[4, 2 * d:3 * d])  # previous block, A half
    assert torch.equal(kv[7], u[11, d:2 * d]) and torch.equal(score[7], u[11, 3 * d:])  # own block, B half


def test_sequence_blocks_and_rotation(rng):
    d = 128
    cos, sin = tables(rng)
    u = torch.randn(10, 4 * d, generator=rng, dtype=torch.float64)  # 10 tokens: blocks 0 and 1 (2 left over)
    bias = torch.randn(8, d, generator=rng, dtype=torch.float64)
    w = torch.rand(d, generator=rng, dtype=torch.float64) + 0.5
    out = compress_sequence_ref(u, 4, d, bias, w, 1e-6, cos, sin)
    rot = compress_sequence_ref(u, 4, d, bias, w, 1e-6, cos, sin, rotate=True)
    assert out.shape == rot.shape == (2, d)
    assert torch.allclose(hadamard_ref(out), rot) and torch.allclose(hadamard_ref(hadamard_ref(out)), out)  # H H = I
    u128 = torch.randn(256, 2 * d, generator=rng, dtype=torch.float64)
    assert compress_sequence_ref(u128, 128, d, torch.zeros(128, d, dtype=torch.float64), w, 1e-6, cos, sin).shape == (2, d)

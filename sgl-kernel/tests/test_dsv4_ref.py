"""The DeepSeek-V4 compressor reference (``dsv4.compress_ref``) against the definition written out
another way, and its edges: -inf scores, a block with no valid row, the first block of a sequence
(no previous block), the indexer's rotation; then the batched torch compressor (the benchmark's
baseline) against the per-block reference. These pin the contract the fused kernels must meet."""

from __future__ import annotations

import torch

from sgl_hip_kernels.dsv4.compress_ref import (block_rows_ref, compress_decode_torch, compress_prefill_torch,
                                               compress_sequence_ref, pool_block_ref)
from sgl_hip_kernels.rotations_ref import hadamard_ref


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


def test_ratio128_block_written_out_by_hand(rng):
    # Ratio 128, block n: tokens 128n..128n+127, kv = u[:, :d], score = u[:, d:] + bias, a softmax per
    # channel over the 128 rows, RMSNorm, then GPT-J RoPE pair by pair on the last 64 channels at
    # position 128n — every step spelled out here without the reference's helpers.
    d, eps = 128, 1e-6
    cos, sin = tables(rng)
    u = torch.randn(2 * 128 + 7, 2 * d, generator=rng, dtype=torch.float64)
    bias = torch.randn(128, d, generator=rng, dtype=torch.float64)
    w = torch.rand(d, generator=rng, dtype=torch.float64) + 0.5
    got = compress_sequence_ref(u, 128, d, bias, w, eps, cos, sin)
    assert got.shape == (2, d)
    for n in range(2):
        rows = u[128 * n: 128 * n + 128]
        weights = torch.exp(rows[:, d:] + bias - (rows[:, d:] + bias).max(0).values)
        pooled = (weights * rows[:, :d]).sum(0) / weights.sum(0)
        y = pooled / torch.sqrt((pooled * pooled).sum() / d + eps) * w
        want = y.clone()
        for i in range(32):
            a, b = y[d - 64 + 2 * i], y[d - 64 + 2 * i + 1]
            c, s_ = cos[128 * n, i], sin[128 * n, i]
            want[d - 64 + 2 * i], want[d - 64 + 2 * i + 1] = a * c - b * s_, b * c + a * s_
        assert torch.allclose(got[n], want, rtol=1e-12, atol=1e-12), n


def _contract_state(ratio, pages, seqs, lens, width):
    """The state after each request has seen ``lens[b]`` tokens: its ring holds tokens
    [max(0, r*(L//r) - overlap), L), token t on page pages[b, (t // r) % n_pages] slot t % r."""
    n_pages = pages.shape[1]
    state = torch.randn(int(pages.max()) * ratio + 2 * ratio, width, dtype=torch.float64)
    for b, (u, n) in enumerate(zip(seqs, lens)):
        for t in range(max(0, ratio * (n // ratio) - (4 if ratio == 4 else 0)), n):
            state[int(pages[b, (t // ratio) % n_pages]) * ratio + t % ratio] = u[t]
    return state


def test_batched_torch_compressor_matches_the_per_block_reference(rng):
    """``compress_decode_torch`` / ``compress_prefill_torch`` (what the benchmark times the fused
    kernel against) give the per-block reference's values, fp64, for both ratios, with and without
    the rotation (as the Walsh-Hadamard transform and as its matrix)."""
    eps = 1e-6
    cos, sin = tables(rng, 2048)
    for ratio, d, rotation in ((4, 128, None), (4, 128, True), (128, 128, None), (4, 128, "matrix")):
        k, n_pages, width = (8, 2, 4 * d) if ratio == 4 else (128, 1, 2 * d)
        rotate = rotation is not None
        rot = hadamard_ref(torch.eye(d, dtype=torch.float64)) if rotation == "matrix" else rotation
        bias = torch.randn(k, d, generator=rng, dtype=torch.float64)
        w = torch.rand(d, generator=rng, dtype=torch.float64) + 0.5
        lens = [ratio, 2 * ratio, 3 * ratio - 1, 1, 2 * ratio + 3]  # emitting and not, a first token
        seqs = [torch.randn(n, width, generator=rng, dtype=torch.float64) for n in lens]
        pages = (torch.randperm(len(lens) * n_pages, generator=rng) + 1).reshape(len(lens), n_pages)
        state = _contract_state(ratio, pages, seqs, [n - 1 for n in lens], width)
        rows = torch.stack([u[n - 1] for u, n in zip(seqs, lens)])
        out = compress_decode_torch(rows, state, pages, torch.tensor(lens), bias, w, eps, cos, sin, ratio, rotation=rot)
        for b, (u, n) in enumerate(zip(seqs, lens)):
            if n % ratio:
                assert torch.equal(out[b], torch.zeros(d, dtype=torch.float64)), (ratio, b)
            else:
                ref = compress_sequence_ref(u, ratio, d, bias, w, eps, cos, sin, rotate)[n // ratio - 1]
                assert torch.allclose(out[b], ref, rtol=1e-10, atol=1e-12), (ratio, rotation, b)
        u = torch.randn(3 * ratio + 2, width, generator=rng, dtype=torch.float64)
        got = compress_prefill_torch(u, ratio, bias, w, eps, cos, sin, rotation=rot)
        assert torch.allclose(got, compress_sequence_ref(u, ratio, d, bias, w, eps, cos, sin, rotate), rtol=1e-10, atol=1e-12)

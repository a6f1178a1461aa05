"""The copy audit: what counts as a copy, how many bytes, and nesting."""

from __future__ import annotations

import torch

from sglang_hip_decode.testing.audit import CopyAudit


def randn(*shape, rng, dtype=torch.float32):
    return torch.randn(*shape, generator=rng).to(dtype)


def test_cat_is_counted_with_the_bytes_it_writes(rng):
    a, b = randn(3, 8, 512, rng=rng, dtype=torch.bfloat16), randn(3, 8, 64, rng=rng, dtype=torch.bfloat16)
    with CopyAudit() as audit:
        out = torch.cat([a, b], dim=-1)
    assert audit.counts == {"cat": 1}
    assert audit.bytes["cat"] == out.numel() * 2 == 3 * 8 * 576 * 2
    assert audit.events[0].shape == (3, 8, 576) and audit.events[0].dtype == torch.bfloat16


def test_views_are_not_counted(rng):
    x = randn(4, 8, 16, rng=rng)
    with CopyAudit() as audit:
        x.transpose(0, 1)
        x.view(32, 16)
        x[..., :8]
        x.unsqueeze(1)
        x.contiguous()  # already contiguous: no copy
        x.flatten(1, 2)  # contiguous: a view
        torch.split(x, [8, 8], dim=-1)
    assert audit.total_count == 0 and audit.total_bytes == 0
    assert audit.summary() == "no copies"


def test_contiguous_of_a_transposed_tensor_is_counted(rng):
    x = randn(4, 8, 16, rng=rng)
    with CopyAudit() as audit:
        y = x.transpose(0, 1).contiguous()
    assert audit.counts == {"clone": 1}
    assert audit.bytes["clone"] == y.numel() * 4


def test_flatten_of_a_transposed_tensor_is_a_copy(rng):
    # What forward_absorb_core's bf16 o_proj branch does to the (H,B,V) bmm output.
    x = randn(8, 3, 128, rng=rng, dtype=torch.bfloat16)
    with CopyAudit() as audit:
        y = x.transpose(0, 1).flatten(1, 2)
    assert y.shape == (3, 1024)
    assert audit.counts == {"clone": 1} and audit.total_bytes == 3 * 1024 * 2


def test_copy_and_dtype_conversion_and_index_put(rng):
    src = randn(16, 4, rng=rng)
    dst = torch.empty(16, 4)
    with CopyAudit() as audit:
        dst.copy_(src)
        src.to(torch.bfloat16)
        dst[torch.tensor([1, 5, 7])] = 0.5  # writes 3 rows of 4 fp32
        dst.clone()
    assert audit.counts == {"copy_": 1, "_to_copy": 1, "index_put_": 1, "clone": 1}
    assert audit.bytes == {"copy_": 256, "_to_copy": 128, "index_put_": 3 * 4 * 4, "clone": 256}


def test_arithmetic_is_not_a_copy(rng):
    a, b = randn(8, 8, rng=rng), randn(8, 8, rng=rng)
    with CopyAudit() as audit:
        a + b
        a.mul_(2)
        a @ b
        torch.empty(4)
    assert audit.total_count == 0
    assert audit.all_ops["add"] == 1 and audit.all_ops["mm"] == 1


def test_nested_audits_both_see_inner_copies(rng):
    a, b = randn(4, 4, rng=rng), randn(4, 4, rng=rng)
    with CopyAudit() as outer:
        torch.cat([a, b])
        with CopyAudit() as inner:
            torch.cat([a, b, a])
            a.t().contiguous()
        b.clone()
    assert inner.counts == {"cat": 1, "clone": 1}
    assert inner.bytes["cat"] == 12 * 4 * 4
    assert outer.counts == {"cat": 2, "clone": 2}
    assert outer.bytes["cat"] == (8 + 12) * 4 * 4

"""fp32 references of the rotations several ops share: RoPE (GPT-J interleaved pairs or NeoX halves) and
the scaled Walsh-Hadamard transform. fp64 in, fp64 out (for tests)."""

from __future__ import annotations

import torch


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """RoPE over the last dim of ``x`` in fp32 (fp64 if ``x`` is fp64, for tests). ``cos``/``sin``:
    (..., d) or (..., d/2)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(work)
    d = x.shape[-1]
    half = d // 2
    if cos.shape[-1] == half:  # one frequency per pair: expand to the layout of x
        cos = torch.cat([cos, cos], -1) if is_neox else cos.repeat_interleave(2, -1)
        sin = torch.cat([sin, sin], -1) if is_neox else sin.repeat_interleave(2, -1)
    cos, sin = cos.to(work), sin.to(work)
    if is_neox:  # rotate halves: [-x2, x1]
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    else:  # GPT-J, interleaved pairs: [-x1, x0, -x3, x2, ...]
        pairs = x.unflatten(-1, (half, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    # x*cos + rotated*sin, each product exact in fp32 for bf16 inputs; one rounding at the end.
    return x * cos + rotated * sin


def hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """Walsh-Hadamard transform over the last dim (a power of two) with scale d^-1/2, in x's dtype
    (what sglang's ``rotate_activation`` and DeepSeek-V4's indexer rotation compute)."""
    d = x.shape[-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2).view(-1, d)
        h *= 2
    return (y * d**-0.5).view(x.shape)

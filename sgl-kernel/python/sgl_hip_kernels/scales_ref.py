"""Power-of-two (UE8M0) scales, exactly, for the references and writers that store them (the DSV4
KV cache's per-tile exponents, the indexer K cache's "ue8m0" scale format)."""

from __future__ import annotations

import torch


def pow2_ceil_exponent(x: torch.Tensor) -> torch.Tensor:
    """The smallest e with 2^e >= x (x > 0), from frexp, not ``ceil(log2(x))``: fp32 log2 rounds to
    an integer for x just above a power of two, and would then give x's lower power."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    return exponent - (mantissa == 0.5).to(exponent.dtype)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x (x > 0), exactly."""
    return torch.ldexp(torch.ones_like(x), pow2_ceil_exponent(x))

"""Portable fused QK RMSNorm (DeepSeek-V4 attention, sglang 0.5.13 ``layers/fused_qk_norm.py``):
``y = x * rsqrt(mean(x^2) + eps) * w`` per row, q heads with ``q_weight`` (None: no weight), k heads
with ``k_weight``, fp32 math, one launch for both; see ``qk_norm_ref.fused_qk_norm_ref``."""

from __future__ import annotations

import torch
import triton

from .kernels.qk_norm import _fused_qk_rmsnorm_kernel


def fused_qk_norm(q: torch.Tensor, k: torch.Tensor, q_weight, k_weight: torch.Tensor, eps: float,
                  q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """q (T, HQ, D), k (T, HK, D), last dim contiguous; returns (q_out, k_out) in the inputs' dtypes
    (``q_out=q`` / ``k_out=k`` normalise in place)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"fused_qk_norm: q {tuple(q.shape)} and k {tuple(k.shape)} must be (T, H, D) with one T and D")
    t, hq, d = q.shape
    hk = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("fused_qk_norm: the last dim of q and k must be contiguous")
    if k_weight.shape != (d,) or (q_weight is not None and q_weight.shape != (d,)):
        raise ValueError(f"fused_qk_norm: weights must be ({d},)")
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = torch.empty_like(k) if k_out is None else k_out
    if q_out.shape != q.shape or k_out.shape != k.shape or q_out.stride(2) != 1 or k_out.stride(2) != 1:
        raise ValueError("fused_qk_norm: outputs must match the inputs' shapes with a contiguous last dim")
    n_rows = t * (hq + hk)
    rows = 2 if n_rows > 8192 else 1
    if n_rows:
        _fused_qk_rmsnorm_kernel[(triton.cdiv(n_rows, rows),)](
            q, k, q_out, k_out, q_weight if q_weight is not None else k_weight, k_weight, n_rows, float(eps),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1),
            HQ=hq, HK=hk, D=d, BLOCK_D=triton.next_power_of_2(d), ROWS=rows, HAS_Q_WEIGHT=q_weight is not None,
            num_warps=4,
        )
    return q_out, k_out

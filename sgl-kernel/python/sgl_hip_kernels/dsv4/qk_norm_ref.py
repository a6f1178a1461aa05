"""fp32 reference of DeepSeek-V4's fused QK RMSNorm."""

from __future__ import annotations

import torch


def fused_qk_norm_ref(q: torch.Tensor, k: torch.Tensor, q_weight, k_weight: torch.Tensor, eps: float):
    """RMSNorm per row of q (T, HQ, D) and k (T, HK, D): ``y = x * rsqrt(mean(x^2) + eps) * w`` in fp32
    (``w = 1`` for q when ``q_weight`` is None), stored in the input dtype."""

    work = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp64 only for test references

    def norm(x, w):
        xf = x.to(work)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y if w is None else y * w.to(work)).to(x.dtype)

    return norm(q, q_weight), norm(k, k_weight)

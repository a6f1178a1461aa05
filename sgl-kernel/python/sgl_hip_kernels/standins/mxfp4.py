"""Portable MXFP4 / FP8 kernels with aiter's contracts (see ``ref``): the o_proj flatten-quant
kernels and the MXFP4 pre-quant batched GEMM of MLA's v-bmm."""

from __future__ import annotations

import torch
import triton

from .kernels.mxfp4 import _flatten_fp8_group_quant_kernel, _flatten_mxfp4_quant_kernel, _mxfp4_prequant_bmm_kernel


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {message}")


def fused_flatten_mxfp4_quant(x: torch.Tensor):
    """(M, N1, N2) any strides -> ``(out (M, N1*N2/2) uint8, scales (M, N1*N2/32) uint8)``, the scales
    the transposed view of an (N/32, M) buffer (aiter's layout). N2: a power of two >= 32."""
    where = "fused_flatten_mxfp4_quant"
    _check(x.dim() == 3, where, f"x must be (M, N1, N2), got {tuple(x.shape)}")
    m, n1, n2 = x.shape
    _check(n2 >= 32 and triton.next_power_of_2(n2) == n2, where, f"N2 = {n2} must be a power of two >= 32")
    n = n1 * n2
    out = torch.empty((m, n // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((n // 32, m), dtype=torch.uint8, device=x.device).T
    if m and n1:
        _flatten_mxfp4_quant_kernel[(m, n1)](x, out, scales, *x.stride(), *out.stride(), *scales.stride(), N2=n2, num_warps=1)
    return out, scales


def fused_flatten_fp8_group_quant(x: torch.Tensor, group_size: int, dtype_quant=torch.float8_e4m3fn):
    """(M, N1, N2) any strides -> ``(q (M, N1*N2) fp8, scales (M, N1*N2/group) fp32)``, per group
    ``s = max(max|x|, 1e-10) / FP8_MAX``, ``q = clamp(x / s)`` (fp32). N2: a power of two, a multiple of
    ``group_size`` (a power of two)."""
    where = "fused_flatten_fp8_group_quant"
    _check(x.dim() == 3, where, f"x must be (M, N1, N2), got {tuple(x.shape)}")
    m, n1, n2 = x.shape
    _check(triton.next_power_of_2(group_size) == group_size and n2 % group_size == 0 and triton.next_power_of_2(n2) == n2,
           where, f"N2 = {n2} must be a power of two and a multiple of group_size = {group_size} (a power of two)")
    out = torch.empty((m, n1 * n2), dtype=dtype_quant, device=x.device)
    scales = torch.empty((m, n1 * n2 // group_size), dtype=torch.float32, device=x.device)
    if m and n1:
        _flatten_fp8_group_quant_kernel[(m, n1)](
            x, out, scales, *x.stride(), *out.stride(), *scales.stride(),
            N2=n2, GROUP=group_size, FP8_MAX=float(torch.finfo(dtype_quant).max), num_warps=1,
        )
    return out, scales


def batched_gemm_afp4wfp4_pre_quant(x, w, w_scales, dtype=torch.bfloat16, y=None, config=None):
    """``y[b] = Q_mx(x[b]) @ D(w[b])^T`` with fp32 accumulation, written through ``y``'s strides.

    ``x`` (B, M, K) bf16/fp16/fp32 any strides, quantised to MXFP4 per 32 along K in-kernel;
    ``w`` (B, N, K/2) uint8 (element 2j in the low nibble of byte j); ``w_scales`` (B, N, K/32) uint8
    e8m0; ``y`` (B, M, N) preallocated (any strides, e.g. the transposed view of a (M, B, N)
    buffer) or allocated contiguous in ``dtype``. ``config`` is accepted for aiter's signature."""
    where = "batched_gemm_afp4wfp4_pre_quant"
    _check(x.dim() == 3 and w.dim() == 3 and w_scales.dim() == 3, where, "x, w and w_scales must be 3-D")
    b, m, k = x.shape
    n = w.shape[1]
    _check(w.dtype == torch.uint8 and w_scales.dtype == torch.uint8, where, "w and w_scales must be uint8")
    _check(w.shape == (b, n, k // 2) and w_scales.shape == (b, n, k // 32) and k % 64 == 0, where,
           f"x {tuple(x.shape)}, w {tuple(w.shape)}, w_scales {tuple(w_scales.shape)} do not agree (K a multiple of 64)")
    if y is None:
        y = torch.empty((b, m, n), dtype=dtype, device=x.device)
    _check(y.shape == (b, m, n), where, f"y {tuple(y.shape)} must be {(b, m, n)}")
    ieee = x.dtype == torch.float32
    block_m = 16 if m <= 16 else 32
    block_n = 64 if n >= 64 else 32
    block_k = 64 if k % 128 else 128
    grid = (b, triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    if b and m and n:
        _mxfp4_prequant_bmm_kernel[grid](
            x, w, w_scales, y, m, n, *x.stride(), *w.stride(), *w_scales.stride(), *y.stride(),
            K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=4,
        )
    return y

"""fp32 references of MXFP4 (OCP microscaling: e2m1 values with one e8m0 scale per 32) and FP8 group
quantisation as aiter's Triton kernels compute them (their exact integer rounding, not an idealised
one), the MXFP4 pre-quant batched GEMM and the o_proj flatten-quant kernels; the CPU providers."""

from __future__ import annotations

import torch

MXFP4_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def mxfp4_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last dim (a multiple of 32) to MXFP4: ``(packed (..., K/2) uint8, scales (..., K/32) uint8)``.

    Per block of 32 (fp32 math): ``amax = max|x|``, rounded up to the next power of two when its
    mantissa is >= 0.75 (add 2^21 to the fp32 bits, keep the exponent); ``e = clamp(floor(log2 amax)
    - 2, -127, 127)``; scale byte ``e + 127``; ``q = x * 2^-e`` converted to e2m1 by aiter's bit rule:
    subnormals (|q| < 1) shift into the mantissa, then round to nearest with ties away from zero on
    one guard bit, saturating at 6.0; sign in bit 3. Element 2j is the low nibble of byte j.
    """
    x = x.float()
    *lead, k = x.shape
    if k % MXFP4_BLOCK:
        raise ValueError(f"mxfp4 quantisation needs a last dim that is a multiple of 32, not {k}")
    blocks = x.reshape(*lead, k // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    amax_bits = amax.view(torch.int32).to(torch.int64)
    rounded = (((amax_bits + 0x200000) & 0xFF800000) & 0xFFFFFFFF).to(torch.int64)
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
    e = (torch.log2(rounded).floor() - 2).clamp(-127, 127)
    scale_byte = (e.to(torch.int32) + 127).to(torch.uint8)
    q = (blocks * torch.exp2(-e)).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = q & 0x80000000
    exp = (q >> 23) & 0xFF
    man = q & 0x7FFFFF
    shift = (127 - (exp + 1)).clamp(0, 63)
    man = torch.where(exp < 127, (0x400000 | (man >> 1)) >> shift, man)
    exp = torch.clamp(exp, min=126) - 126
    code = torch.clamp((((exp << 2) | (man >> 21)) + 1) >> 1, max=0x7)
    nibble = ((sign >> 28) | code).to(torch.uint8).reshape(*lead, k)
    packed = nibble[..., 0::2] | (nibble[..., 1::2] << 4)
    return packed, scale_byte.reshape(*lead, k // MXFP4_BLOCK)


def mxfp4_dequant_ref(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 values of MXFP4 data: ``e2m1(nibble) * 2^(scale - 127)`` (exact in fp32)."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).to(torch.int32)
    code = nibbles & 7  # decoded arithmetically (no host table: safe inside a CUDA-graph capture)
    e2, m = (code >> 1).float(), (code & 1).float()
    magnitude = torch.where(e2 == 0, m * 0.5, (1.0 + 0.5 * m) * torch.exp2(e2 - 1.0))
    values = torch.where((nibbles & 8) != 0, -magnitude, magnitude)
    exps = torch.exp2(scales.float() - 127).repeat_interleave(MXFP4_BLOCK, -1)
    return values * exps


def batched_gemm_afp4wfp4_pre_quant_ref(x, w, w_scales, dtype=torch.bfloat16, y=None, config=None):
    """Reference for aiter's ``batched_gemm_afp4wfp4_pre_quant``: ``y[b] = Q(x[b]) @ D(w[b])^T``.

    ``x`` (B, M, K) bf16/fp16, any strides, quantised to MXFP4 per 32 along K (``mxfp4_quant_ref``);
    ``w`` (B, N, K/2) uint8 packed e2m1; ``w_scales`` (B, N, K/32) uint8 e8m0; fp32 accumulation;
    written into ``y`` (B, M, N) honouring its strides (allocated contiguous when None), in ``dtype``.
    """
    b, m, k = x.shape
    if w.shape[0] != b or w.shape[2] * 2 != k or w_scales.shape[:2] != w.shape[:2] or w_scales.shape[2] * MXFP4_BLOCK != k:
        raise ValueError(f"shapes x {tuple(x.shape)}, w {tuple(w.shape)}, w_scales {tuple(w_scales.shape)} do not agree")
    n = w.shape[1]
    xq, xs = mxfp4_quant_ref(x)
    a = mxfp4_dequant_ref(xq, xs)
    wt = mxfp4_dequant_ref(w, w_scales)
    out = torch.bmm(a.double(), wt.double().transpose(1, 2)).float()  # products exact; sum in fp64, rounded once
    if y is None:
        y = torch.empty((b, m, n), dtype=dtype, device=x.device)
    y.copy_(out.to(y.dtype))
    return y


def fused_flatten_mxfp4_quant_ref(x: torch.Tensor):
    """Reference for aiter's ``fused_flatten_mxfp4_quant``: ``x`` (M, N1, N2) any strides, flattened to
    (M, N1*N2) and MXFP4-quantised along it. Returns ``(out (M, N/2) uint8, scales (M, N/32) uint8)``,
    the scales as the transposed view of an (N/32, M) buffer, as aiter lays them out."""
    m, n1, n2 = x.shape
    packed, scales = mxfp4_quant_ref(x.reshape(m, n1 * n2))
    out_scales = torch.empty((scales.shape[1], m), dtype=torch.uint8, device=x.device).T
    out_scales.copy_(scales)
    return packed, out_scales


def fused_flatten_fp8_group_quant_ref(x: torch.Tensor, group_size: int, dtype_quant=torch.float8_e4m3fn):
    """Reference for aiter's ``fused_flatten_fp8_group_quant``: flatten (M, N1, N2) to (M, N), per group
    of ``group_size``: ``s = max(max|x|, 1e-10) / FP8_MAX``, ``q = clamp(x * (1/s), -FP8_MAX, FP8_MAX)``
    cast round-to-nearest-even (fp32 math). Returns ``(q (M, N) fp8, s (M, N/group) fp32)``."""
    m, n1, n2 = x.shape
    flat = x.reshape(m, n1 * n2).float()
    if flat.shape[1] % group_size:
        raise ValueError(f"N1*N2 = {flat.shape[1]} is not a multiple of group_size {group_size}")
    fmax = torch.finfo(dtype_quant).max
    groups = flat.reshape(m, flat.shape[1] // group_size, group_size)
    # IEEE divisions, tensor by tensor: torch divides by a Python scalar on CUDA as a multiply by its
    # reciprocal, which is not the same rounding.
    amax = groups.abs().amax(-1).clamp_min(1e-10)
    scale = amax / torch.full_like(amax, fmax)
    q = (groups * (torch.ones_like(scale) / scale)[..., None]).clamp(-fmax, fmax).to(dtype_quant)
    return q.reshape(m, flat.shape[1]), scale

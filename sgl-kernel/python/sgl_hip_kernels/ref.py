"""fp32 torch references, written over the real byte layouts; imported by tests and benchmarks.

Each reference states the contract of the ROCm kernel it stands for. They are also the CPU
providers (``sglang_hip_decode.providers``), so they honour the same arguments and return values.
"""

from __future__ import annotations

import torch


def _rope_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
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


def fused_qk_rope_cat_and_cache_mla_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_scale,
    is_neox: bool,
    num_decode_toks_for_zeros: int = 0,
    apply_scale: bool = True,
    q_out: torch.Tensor | None = None,
    decode_q_pe_out: torch.Tensor | None = None,
    k_pe_out: torch.Tensor | None = None,
    q_out_dtype=None,
):
    """Reference for aiter's ``fused_qk_rope_cat_and_cache_mla`` (decode form).

    Shapes: ``q_nope`` (B, QH, Dn), ``q_pe`` (B, QH, Dr), ``k_nope`` (Bk, KH, Dn), ``k_pe`` (Bk, KH, Dr),
    ``kv_cache`` (slots, KH, Dn + Dr), ``slot_mapping`` (Bs,) with Bs <= Bk and B <= Bk, ``pos`` (B,),
    ``cos``/``sin`` indexed ``[pos, i]`` with last dim Dr/2 (one value per pair) or Dr; any strides.

    * ``q_out[b, h] = cast(q_dtype, [q_nope[b, h] | rope(q_pe[b, h])])``, q is *not* scaled;
      q_dtype = ``q_out_dtype`` or q_nope's dtype.
    * for ``slot = slot_mapping[b] >= 0`` (b < Bs): ``kv_cache[slot, h_k] = cast(cache dtype,
      [k_nope | rope(k_pe)] * (1 / k_scale))``, and ``k_pe_out[b, h_k] = rope(k_pe)`` in k_pe's dtype;
      decode rows (b < B) rotate k_pe, the extra prefill rows (B <= b < Bs) store k_pe as given.
      Negative slots are skipped (cache and k_pe_out rows left as they were).
    * ``decode_q_pe_out[:num_decode_toks_for_zeros] = rope(q_pe)``; with ``num_decode_toks_for_zeros
      > 0`` a fifth output of zeros (n, QH, Dn) is returned.
    * RoPE is computed in fp32 with one rounding to the output dtype; the cache scale multiplies by
      the fp32 reciprocal of ``k_scale`` (as aiter does), ``apply_scale=False`` or ``k_scale=None``
      means 1.

    Returns ``(q_out, decode_q_pe_out, k_pe_out, kv_cache[, q_nope_zeros])``.
    """
    b, qh, d_nope = q_nope.shape
    bk, kh, dk_nope = k_nope.shape
    d_pe = q_pe.shape[-1]
    (b_slot,) = slot_mapping.shape
    if q_out is None:
        q_out = torch.empty((b, qh, d_nope + d_pe), dtype=q_out_dtype or q_nope.dtype, device=q_nope.device)
    if decode_q_pe_out is None:
        decode_q_pe_out = torch.empty((num_decode_toks_for_zeros, qh, d_pe), dtype=q_nope.dtype, device=q_nope.device)
    if k_pe_out is None:
        k_pe_out = torch.empty((bk, kh, d_pe), dtype=k_pe.dtype, device=k_pe.device)

    positions = pos.long()
    c, s = cos.reshape(cos.shape[0], -1)[positions], sin.reshape(sin.shape[0], -1)[positions]  # (B, d)
    q_rot = _rope_fp32(q_pe, c[:, None, :], s[:, None, :], is_neox)
    q_out[..., :d_nope] = q_nope.to(q_out.dtype)
    q_out[..., d_nope:] = q_rot.to(q_out.dtype)
    n_zero = num_decode_toks_for_zeros
    if n_zero:
        decode_q_pe_out[:n_zero] = q_rot[:n_zero].to(decode_q_pe_out.dtype)

    if k_scale is None or not apply_scale:
        rcp = torch.ones((), dtype=torch.float32, device=k_nope.device)
    else:
        rcp = 1.0 / torch.as_tensor(k_scale, device=k_nope.device).reshape(()).float()
    slots = slot_mapping.long()
    rows = torch.arange(b_slot, device=slots.device)
    keep = slots >= 0
    rows, slots = rows[keep], slots[keep]
    if rows.numel():
        k_rope = k_pe[rows].float()
        decode = rows < b
        if decode.any():
            k_rope[decode] = _rope_fp32(k_pe[rows[decode]], c[rows[decode]][:, None, :], s[rows[decode]][:, None, :], is_neox)
        k_pe_out[rows] = k_rope.to(k_pe_out.dtype)
        entry = torch.cat([k_nope[rows].float() * rcp, k_rope * rcp], -1)
        kv_cache[slots] = entry.to(kv_cache.dtype)
    if n_zero:
        zeros = torch.zeros((n_zero, qh, dk_nope), dtype=q_nope.dtype, device=q_nope.device)
        return q_out, decode_q_pe_out, k_pe_out, kv_cache, zeros
    return q_out, decode_q_pe_out, k_pe_out, kv_cache


def sparse_mla_decode_ref(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512
) -> torch.Tensor:
    """Reference for the NSA sparse MLA decode kernel (TileLang ``tilelang_sparse_fwd`` contract).

    ``q`` (N, H, D) with D = d_v + rope (576), bf16/fp8/fp32; ``kv`` (slots, 1, D) same family;
    ``indices`` (N, 1, topk) int32 token slots, -1 = none. For each (n, h), over the valid j:
    ``o = sum_j softmax_j(sm_scale * <q[n,h], kv[idx_j]>) * kv[idx_j, :d_v]`` in fp32; a row with no
    valid index gives 0. Output (N, H, d_v) in bf16 (q's dtype when q is fp32/fp64). fp8 inputs are read as
    their values (no scale, as the TileLang fp8 kernel assumes k_scale = 1).
    """
    n, h, d = q.shape
    out_dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.bfloat16
    idx = indices.reshape(n, indices.shape[-1]).long()
    valid = idx >= 0
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = kv.reshape(kv.shape[0], d)[idx.clamp_min(0)].to(work)  # (N, topk, D)
    rows = torch.where(valid[..., None], rows, torch.zeros((), dtype=work, device=rows.device))
    scores = torch.einsum("nhd,nkd->nhk", q.to(work), rows) * sm_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    # A row with no valid index: softmax of all -inf is NaN; the contract says 0 (NaN from the data
    # itself must still show, so only those rows are zeroed).
    weights = torch.where(valid.any(-1)[:, None, None], weights, torch.zeros((), device=weights.device))
    out = torch.einsum("nhk,nkd->nhd", weights, rows[..., :d_v])
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# MXFP4 (OCP microscaling, e2m1 values with one e8m0 scale per 32) and FP8 group quantisation, as
# aiter's Triton kernels compute them (their exact integer rounding, not an idealised one).

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


def fused_qk_norm_ref(q: torch.Tensor, k: torch.Tensor, q_weight, k_weight: torch.Tensor, eps: float):
    """RMSNorm per row of q (T, HQ, D) and k (T, HK, D): ``y = x * rsqrt(mean(x^2) + eps) * w`` in fp32
    (``w = 1`` for q when ``q_weight`` is None), stored in the input dtype."""

    work = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp64 only for test references

    def norm(x, w):
        xf = x.to(work)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y if w is None else y * w.to(work)).to(x.dtype)

    return norm(q, q_weight), norm(k, k_weight)

"""Triton bodies: MXFP4 (e2m1 + e8m0 per 32) quantisation with aiter's exact integer rounding, the
flatten-quant kernels the MLA o_proj uses (MXFP4 and FP8 per group), and the MXFP4 pre-quant
batched GEMM of the v-bmm. The rounding rules are stated in ``mxfp4_ref.mxfp4_quant_ref`` /
``mxfp4_ref.fused_flatten_fp8_group_quant_ref``; these bodies compute the same bits."""

import triton
import triton.language as tl

from ...kernels.splitk import dot


@triton.jit
def _mxfp4_codes(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """x (ROWS, COLS) fp32 -> (e2m1 codes (ROWS, COLS) uint32 with the sign in bit 3,
    unbiased scale exponents (ROWS, COLS // 32) fp32)."""
    blocks = tl.reshape(x, (ROWS, COLS // 32, 32))
    amax = tl.max(tl.abs(blocks), axis=2)
    # Round amax up to the next power of two when its mantissa is >= 0.75 (aiter's rule).
    amax = ((amax.to(tl.int32, bitcast=True) + 0x200000) & -8388608).to(tl.float32, bitcast=True)  # 0xFF800000
    e = tl.clamp(tl.floor(tl.log2(amax)) - 2.0, -127.0, 127.0)
    q = blocks * tl.exp2(-e)[:, :, None]
    bits = q.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    exp = (bits >> 23) & 0xFF
    man = bits & 0x7FFFFF
    # |q| < 1: a subnormal e2m1 value, the implicit bit shifted into the mantissa
    shift = tl.minimum(tl.maximum(126 - exp.to(tl.int32), 0), 31).to(tl.uint32)
    man = tl.where(exp < 127, (0x400000 | (man >> 1)) >> shift, man)
    exp = tl.maximum(exp, 126) - 126
    # nearest, ties away from zero, on one guard bit; saturate at 6.0 (code 7)
    code = tl.minimum((((exp << 2) | (man >> 21)) + 1) >> 1, 7)
    code = code | (sign >> 28)
    return tl.reshape(code, (ROWS, COLS)), e


@triton.jit
def _e2m1_value(code):
    """fp32 value of e2m1 codes (sign in bit 3)."""
    c = code & 7
    e2 = (c >> 1).to(tl.float32)
    m = (c & 1).to(tl.float32)
    mag = tl.where(e2 == 0.0, m * 0.5, (1.0 + 0.5 * m) * tl.exp2(e2 - 1.0))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _flatten_mxfp4_quant_kernel(
    x_ptr, out_ptr, scale_ptr,
    s_x_m, s_x_n1, s_x_n2,
    s_o_m, s_o_n,
    s_s_m, s_s_n,
    N2: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    n1 = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, N2)
    x = tl.load(x_ptr + m * s_x_m + n1 * s_x_n1 + offs * s_x_n2).to(tl.float32)
    code, e = _mxfp4_codes(tl.reshape(x, (1, N2)), 1, N2)
    evens, odds = tl.split(tl.reshape(code, (N2 // 2, 2)))
    packed = (evens | (odds << 4)).to(tl.uint8)
    half = tl.arange(0, N2 // 2)
    tl.store(out_ptr + m * s_o_m + (n1 * (N2 // 2) + half) * s_o_n, packed)
    blocks = tl.arange(0, N2 // 32)
    scale = (tl.reshape(e, (N2 // 32,)).to(tl.int32) + 127).to(tl.uint8)
    tl.store(scale_ptr + m * s_s_m + (n1 * (N2 // 32) + blocks) * s_s_n, scale)


@triton.jit
def _flatten_fp8_group_quant_kernel(
    x_ptr, out_ptr, scale_ptr,
    s_x_m, s_x_n1, s_x_n2,
    s_o_m, s_o_n,
    s_s_m, s_s_n,
    N2: tl.constexpr,
    GROUP: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    n1 = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, N2)
    x = tl.load(x_ptr + m * s_x_m + n1 * s_x_n1 + offs * s_x_n2).to(tl.float32)
    groups = tl.reshape(x, (N2 // GROUP, GROUP))
    # IEEE divisions (Triton's "/" may lower to an approximate one): the reference's fp32 math.
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(groups), axis=1), 1e-10), FP8_MAX)
    recip = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    q = tl.clamp(groups * recip[:, None], -FP8_MAX, FP8_MAX)
    q = tl.reshape(q, (N2,)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m * s_o_m + (n1 * N2 + offs) * s_o_n, q)
    g = tl.arange(0, N2 // GROUP)
    tl.store(scale_ptr + m * s_s_m + (n1 * (N2 // GROUP) + g) * s_s_n, scale)


@triton.jit
def _mxfp4_prequant_bmm_kernel(
    x_ptr, w_ptr, ws_ptr, y_ptr,
    M, N,
    s_x_b, s_x_m, s_x_k,
    s_w_b, s_w_n, s_w_k,
    s_ws_b, s_ws_n, s_ws_k,
    s_y_b, s_y_m, s_y_n,
    K: tl.constexpr,  # constexpr: the MLA v-bmm has one K (kv_lora_rank), and the loop unrolls
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 dots (the CPU interpreter); on a GPU the exact e2m1*2^e values go as bf16
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    compute = tl.float32 if IEEE else tl.bfloat16
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + b * s_x_b + rows[:, None] * s_x_m + ks[None, :] * s_x_k, mask=row_ok[:, None], other=0.0)
        code, e = _mxfp4_codes(x.to(tl.float32), BLOCK_M, BLOCK_K)
        a = tl.reshape(_e2m1_value(code), (BLOCK_M, BLOCK_K // 32, 32)) * tl.exp2(e)[:, :, None]
        a = tl.reshape(a, (BLOCK_M, BLOCK_K)).to(compute)
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + b * s_w_b + cols[:, None] * s_w_n + kb[None, :] * s_w_k, mask=col_ok[:, None], other=0)
        packed = packed.to(tl.uint32)
        w_codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
        kg = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        w_exp = tl.load(ws_ptr + b * s_ws_b + cols[:, None] * s_ws_n + kg[None, :] * s_ws_k, mask=col_ok[:, None], other=127)
        w = tl.reshape(_e2m1_value(w_codes), (BLOCK_N, BLOCK_K // 32, 32)) * tl.exp2(w_exp.to(tl.float32) - 127.0)[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(compute)
        acc += dot(a, tl.trans(w), IEEE)
    y = y_ptr + b * s_y_b + rows[:, None] * s_y_m + cols[None, :] * s_y_n
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

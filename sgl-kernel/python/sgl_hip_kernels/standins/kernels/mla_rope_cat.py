"""Triton body: MLA decode RoPE + q concat + KV-cache write (aiter fused_qk_rope_cat_and_cache_mla).

One program per (token, q head) for the decode rows, then one per (token, k head) for the extra
K-only rows. RoPE reads each element's partner from memory (instead of permuting registers) and
computes in fp32 with one rounding at the store.
"""

import triton
import triton.language as tl


@triton.jit
def _rope_fp32(x_ptrs_base, stride_d, offs, cos, sin, IS_NEOX: tl.constexpr, HALF: tl.constexpr):
    x = tl.load(x_ptrs_base + offs * stride_d).to(tl.float32)
    if IS_NEOX:  # rotate halves: partner of i is i +/- HALF
        partner = tl.where(offs < HALF, offs + HALF, offs - HALF)
        sign = tl.where(offs < HALF, -1.0, 1.0)
    else:  # GPT-J interleaved pairs: partner of i is i ^ 1
        partner = tl.where(offs % 2 == 0, offs + 1, offs - 1)
        sign = tl.where(offs % 2 == 0, -1.0, 1.0)
    x_partner = tl.load(x_ptrs_base + partner * stride_d).to(tl.float32)
    return x * cos + (sign * x_partner) * sin


@triton.jit
def _mla_rope_cat_cache_kernel(
    q_nope_ptr, q_pe_ptr, k_nope_ptr, k_pe_ptr, pos_ptr, cos_ptr, sin_ptr,
    q_out_ptr, dq_pe_out_ptr, k_pe_out_ptr, kv_cache_ptr, slot_ptr, k_scale_ptr,
    B, B_SLOT, N_ZERO,
    s_qn_b, s_qn_h, s_qn_d,
    s_qp_b, s_qp_h, s_qp_d,
    s_kn_b, s_kn_h, s_kn_d,
    s_kp_b, s_kp_h, s_kp_d,
    s_pos,
    s_cos_p, s_cos_d,
    s_qo_b, s_qo_h, s_qo_d,
    s_dq_b, s_dq_h, s_dq_d,
    s_ko_b, s_ko_h, s_ko_d,
    s_c_s, s_c_h, s_c_d,
    QH: tl.constexpr,
    KH: tl.constexpr,
    D_NOPE: tl.constexpr,
    D_PE: tl.constexpr,
    HALF_FREQS: tl.constexpr,  # cos/sin hold one value per pair (last dim D_PE/2)
    IS_NEOX: tl.constexpr,
    HAVE_K_SCALE: tl.constexpr,  # constexpr so the scale load disappears when there is none
):
    pid = tl.program_id(0).to(tl.int64)
    nope = tl.arange(0, D_NOPE).to(tl.int64)
    pe = tl.arange(0, D_PE).to(tl.int64)
    HALF: tl.constexpr = D_PE // 2
    if HALF_FREQS:
        if IS_NEOX:
            freq = tl.where(pe < HALF, pe, pe - HALF)
        else:
            freq = pe // 2
    else:
        freq = pe

    # Decode rows: one program per (token, q head); the K is written by the first q head of each
    # k head. Extra rows of a mixed batch (B <= token < B_SLOT): one program per (token, k head),
    # K only, stored without RoPE.
    decode = pid < B * QH
    k_pid = pid - B * QH
    b = tl.where(decode, pid // QH, B + k_pid // KH)
    h = tl.where(decode, pid % QH, 0)
    hk = tl.where(decode, h // (QH // KH), k_pid % KH)
    is_k_row = (h % (QH // KH)) == 0
    # K-only rows rotate nothing; they read position 0's table row, unused.
    p = tl.load(pos_ptr + b * s_pos, mask=decode, other=0).to(tl.int64)
    cos = tl.load(cos_ptr + p * s_cos_p + freq * s_cos_d).to(tl.float32)
    sin = tl.load(sin_ptr + p * s_cos_p + freq * s_cos_d).to(tl.float32)

    if decode:
        q_n = tl.load(q_nope_ptr + b * s_qn_b + h * s_qn_h + nope * s_qn_d)
        q_r = _rope_fp32(q_pe_ptr + b * s_qp_b + h * s_qp_h, s_qp_d, pe, cos, sin, IS_NEOX, HALF)
        q_out_row = q_out_ptr + b * s_qo_b + h * s_qo_h
        tl.store(q_out_row + nope * s_qo_d, q_n.to(tl.float32).to(q_out_ptr.dtype.element_ty))
        tl.store(q_out_row + (D_NOPE + pe) * s_qo_d, q_r.to(q_out_ptr.dtype.element_ty))
        if b < N_ZERO:
            tl.store(dq_pe_out_ptr + b * s_dq_b + h * s_dq_h + pe * s_dq_d, q_r.to(dq_pe_out_ptr.dtype.element_ty))

    if is_k_row & (b < B_SLOT):
        slot = tl.load(slot_ptr + b).to(tl.int64)
        if slot >= 0:
            if HAVE_K_SCALE:
                rcp = tl.math.div_rn(1.0, tl.load(k_scale_ptr).to(tl.float32))
            else:
                rcp = 1.0
            k_n = tl.load(k_nope_ptr + b * s_kn_b + hk * s_kn_h + nope * s_kn_d).to(tl.float32)
            k_row = k_pe_ptr + b * s_kp_b + hk * s_kp_h
            if decode:
                k_r = _rope_fp32(k_row, s_kp_d, pe, cos, sin, IS_NEOX, HALF)
            else:
                k_r = tl.load(k_row + pe * s_kp_d).to(tl.float32)
            tl.store(k_pe_out_ptr + b * s_ko_b + hk * s_ko_h + pe * s_ko_d, k_r.to(k_pe_out_ptr.dtype.element_ty))
            c_row = kv_cache_ptr + slot * s_c_s + hk * s_c_h
            tl.store(c_row + nope * s_c_d, (k_n * rcp).to(kv_cache_ptr.dtype.element_ty))
            tl.store(c_row + (D_NOPE + pe) * s_c_d, (k_r * rcp).to(kv_cache_ptr.dtype.element_ty))

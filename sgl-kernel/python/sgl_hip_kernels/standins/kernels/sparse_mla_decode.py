"""Triton body: NSA sparse MLA decode over top-k token slots (TileLang tilelang_sparse_fwd contract).

One program per (query token, block of heads); online softmax over the token's top-k slots in
blocks of BLOCK_N, K and V from the same 576-wide cache rows (MLA: V = the first D_V columns).
"""

import triton
import triton.language as tl


@triton.jit
def _sparse_mla_decode_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr,
    sm_scale,
    H,
    s_q_n, s_q_h, s_q_d,
    s_kv_s, s_kv_d,
    s_i_n, s_i_k,
    s_o_n, s_o_h, s_o_d,
    TOPK: tl.constexpr,
    D_V: tl.constexpr,
    D_ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs (the CPU interpreter): exact fp32 dots, no TF32
):
    n = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    dv = tl.arange(0, D_V)
    dr = tl.arange(0, D_ROPE)
    compute = tl.float32 if IEEE else tl.bfloat16
    precision: tl.constexpr = "ieee" if IEEE else "tf32"

    q_row = q_ptr + n * s_q_n + heads[:, None] * s_q_h
    q_nope = tl.load(q_row + dv[None, :] * s_q_d, mask=head_ok[:, None], other=0.0).to(compute)
    q_rope = tl.load(q_row + (D_V + dr)[None, :] * s_q_d, mask=head_ok[:, None], other=0.0).to(compute)

    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D_V), tl.float32)
    for start in range(0, TOPK, BLOCK_N):
        ks = start + tl.arange(0, BLOCK_N)
        slot = tl.load(idx_ptr + n * s_i_n + ks * s_i_k, mask=ks < TOPK, other=-1).to(tl.int64)
        valid = slot >= 0
        rows = kv_ptr + tl.where(valid, slot, 0)[:, None] * s_kv_s
        # Invalid slots are never read (NaN in them must not leak).
        kv_nope = tl.load(rows + dv[None, :] * s_kv_d, mask=valid[:, None], other=0.0).to(compute)
        kv_rope = tl.load(rows + (D_V + dr)[None, :] * s_kv_d, mask=valid[:, None], other=0.0).to(compute)
        s = tl.dot(q_nope, tl.trans(kv_nope), input_precision=precision)
        s += tl.dot(q_rope, tl.trans(kv_rope), input_precision=precision)
        s = tl.where(valid[None, :], s * sm_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # Guard: while nothing is valid m_new is -inf; subtracting 0 instead keeps exp() at 0,
        # never exp(-inf - -inf) = NaN (the old state is all zero then, so alpha does not matter).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.where(valid[None, :], tl.exp(s - m_safe[:, None]), 0.0)
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(compute), kv_nope, input_precision=precision)
        m = m_new
    out = tl.where((den > 0)[:, None], acc / tl.where(den > 0, den, 1.0)[:, None], 0.0)
    o_row = out_ptr + n * s_o_n + heads[:, None] * s_o_h
    tl.store(o_row + dv[None, :] * s_o_d, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])

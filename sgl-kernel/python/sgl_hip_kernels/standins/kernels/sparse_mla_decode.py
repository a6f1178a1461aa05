"""Triton body: NSA sparse MLA decode over top-k token slots (TileLang tilelang_sparse_fwd contract).

One program per (block of heads, query token, split of the top-k list; heads and tokens share
grid axis 0); online softmax over the
split's slots in blocks of BLOCK_N, K and V from the same 576-wide cache rows (MLA: V = the first
D_V columns). With more than one split each program writes a partial that ``splitk.combine``
merges (the split-K pieces are shared with the DeepSeek-V4 decode).
"""

import triton
import triton.language as tl

from ...kernels.splitk import LOG2E, dot, softmax_step, write_result


@triton.jit
def _sparse_mla_decode_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
    sm_scale,
    H, TOPK,
    s_q_n, s_q_h, s_q_d,
    s_kv_s, s_kv_d,
    s_i_n, s_i_k,
    s_o_split, s_o_n, s_o_h, s_o_d,
    s_l_split, s_l_n, den_offset,
    D_V: tl.constexpr,
    D_ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KEYS_PER_SPLIT: tl.constexpr,  # a power of two times BLOCK_N: a fixed trip count, few variants
    FINAL: tl.constexpr,  # one split: write the output; else this split's partial and its m, den
    IEEE: tl.constexpr,  # fp32 inputs (the CPU interpreter): exact fp32 dots, no TF32
):
    head_blocks = tl.cdiv(H, BLOCK_H)
    heads = (tl.program_id(0) % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    n = (tl.program_id(0) // head_blocks).to(tl.int64)
    split = tl.program_id(1)
    head_ok = heads < H
    dv = tl.arange(0, D_V)
    dr = tl.arange(0, D_ROPE)
    compute = tl.float32 if IEEE else tl.bfloat16

    q_row = q_ptr + n * s_q_n + heads[:, None] * s_q_h
    q_nope = tl.load(q_row + dv[None, :] * s_q_d, mask=head_ok[:, None], other=0.0).to(compute)
    q_rope = tl.load(q_row + (D_V + dr)[None, :] * s_q_d, mask=head_ok[:, None], other=0.0).to(compute)
    scale2 = sm_scale * LOG2E

    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D_V), tl.float32)
    lo = split * KEYS_PER_SPLIT
    hi = tl.minimum(lo + KEYS_PER_SPLIT, TOPK)
    for j in range(0, KEYS_PER_SPLIT, BLOCK_N):
        start = lo + j
        if start < hi:
            ks = start + tl.arange(0, BLOCK_N)
            slot = tl.load(idx_ptr + n * s_i_n + ks * s_i_k, mask=ks < hi, other=-1).to(tl.int64)
            valid = slot >= 0
            rows = kv_ptr + tl.where(valid, slot, 0)[:, None] * s_kv_s
            # Invalid slots are never read (NaN in them must not leak).
            kv_nope = tl.load(rows + dv[None, :] * s_kv_d, mask=valid[:, None], other=0.0).to(compute)
            kv_rope = tl.load(rows + (D_V + dr)[None, :] * s_kv_d, mask=valid[:, None], other=0.0).to(compute)
            s = dot(q_nope, tl.trans(kv_nope), IEEE)
            s += dot(q_rope, tl.trans(kv_rope), IEEE)
            s = tl.where(valid[None, :], s * scale2, float("-inf"))
            m, den, acc = softmax_step(s, kv_nope, m, den, acc, IEEE)
    o_ptrs = out_ptr + split * s_o_split + n * s_o_n + heads[:, None] * s_o_h + dv[None, :] * s_o_d
    lse_ptrs = lse_ptr + split * s_l_split + n * s_l_n + heads
    no_sink = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    write_result(acc, m, den, no_sink, o_ptrs, lse_ptrs, den_offset, head_ok, head_ok[:, None], FINAL, not FINAL)

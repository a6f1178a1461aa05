"""Triton body: DeepSeek-V4 sparse decode over the FP8 584 B/token cache (contract:
``dsv4/sparse_decode_ref``; layout: ``dsv4/kv_cache``).

One program per (block of heads, query token, split of the key list); head blocks and tokens share
grid axis 0 (heads fastest), splits are axis 1. The key list is the main scope's top-k followed by
the extra scope's; a split walks its part of each, dequantising every gathered token into one
512-wide row (7 fp8 tiles times their power-of-two scales, then the bf16 RoPE values): exact in
bf16, so one QK dot (fp32: eight 64-wide dots summed) and one PV dot per block of keys. Heads are
the fastest grid axis, so the programs that read one token's keys run together and share them
through L2.
"""

import triton
import triton.language as tl

from ...kernels.splitk import LOG2E, dot, softmax_step, write_result


@triton.jit
def _load_keys(cache_ptr, idx_row_ptr, pos, limit, page_stride, block_size, n_tokens,
               BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    """Gather and dequantise the keys at positions ``pos`` of one scope: (BLOCK_N, 512) and validity.
    Positions at or past ``limit``, negative indices and indices past the cache are invalid and
    never read."""
    in_list = pos < limit
    idx = tl.load(idx_row_ptr + pos, mask=in_list, other=-1).to(tl.int64)
    valid = in_list & (idx >= 0) & (idx < n_tokens)
    idx = tl.where(valid, idx, 0)
    page = idx // block_size
    slot = idx - page * block_size
    base = page * page_stride
    data = base + slot * 576
    cols = tl.arange(0, 512)
    nope = cols < 448
    raw = tl.load(cache_ptr + data[:, None] + cols[None, :], mask=valid[:, None] & nope[None, :], other=0)
    rope_ptrs = (cache_ptr + data[:, None] + 448).to(tl.pointer_type(tl.bfloat16)) + (cols - 448)[None, :]
    rope = tl.load(rope_ptrs, mask=valid[:, None] & ~nope[None, :], other=0.0)
    tiles = tl.arange(0, 8)
    exps = tl.load(cache_ptr + (base + block_size * 576 + slot * 8)[:, None] + tiles[None, :],
                   mask=valid[:, None] & (tiles < 7)[None, :], other=127)
    scale = tl.exp2(exps.to(tl.float32) - 127.0)
    vals = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    vals = tl.reshape(tl.reshape(vals, (BLOCK_N, 8, 64)) * scale[:, :, None], (BLOCK_N, 512))
    keys = tl.where(nope[None, :], vals, rope.to(tl.float32)).to(COMPUTE)
    return keys, valid


@triton.jit
def _scores(q, keys, scale2, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """``q . k`` of every head and key, times ``scale2``: (BLOCK_H, BLOCK_N). bf16 (the GPU's path):
    one dot. fp32 (``IEEE``): the 512-long dot as 8 dots of 64 (the cache's own tiles), summed: on a
    GPU, shorter fp32 accumulations (the test suite's interpreter computes each dot exactly and rounds
    it once, so there the split only adds the 8-term sum's roundings)."""
    if IEEE:
        q_tiles = tl.permute(tl.reshape(q, (BLOCK_H, 8, 64)), (1, 0, 2))
        k_tiles = tl.permute(tl.reshape(keys, (BLOCK_N, 8, 64)), (1, 2, 0))
        dots = tl.sum(dot(q_tiles, k_tiles, IEEE), 0)
    else:
        dots = dot(q, tl.trans(keys), IEEE)
    return dots * scale2


@triton.jit
def _dsv4_sparse_decode_kernel(
    q_ptr, cache_ptr, idx_ptr, len_ptr,
    x_cache_ptr, x_idx_ptr, x_len_ptr,
    sink_ptr, out_ptr, lse_ptr,
    sm_scale, H, S_Q,
    s_q_b, s_q_s, s_q_h,
    page_stride, block_size, n_tokens, s_i_b, s_i_s, topk,
    x_page_stride, x_block_size, x_n_tokens, s_xi_b, s_xi_s, x_topk,
    s_o_split, s_o_b, s_o_s, s_o_h,
    s_l_split, s_l_b, s_l_h, s_l_s, den_offset,
    HAS_LEN: tl.constexpr,  # topk_length given: positions past it are skipped, whole blocks unread
    HAS_EXTRA: tl.constexpr,  # the extra (compressed) scope joins the softmax
    HAS_X_LEN: tl.constexpr,
    HAS_SINK: tl.constexpr,
    FINAL: tl.constexpr,  # one split: write out / lse; else this split's partial
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KEYS_PER_SPLIT: tl.constexpr,  # a power of two times BLOCK_N: a fixed trip count, few variants
    IEEE: tl.constexpr,  # fp32 q (the CPU interpreter): fp32 keys and exact fp32 dots
):
    head_blocks = tl.cdiv(H, BLOCK_H)
    heads = (tl.program_id(0) % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = (tl.program_id(0) // head_blocks).to(tl.int64)
    split = tl.program_id(1)
    b = t // S_Q
    s = t % S_Q
    mask_h = heads < H
    compute = tl.float32 if IEEE else tl.bfloat16
    d = tl.arange(0, 512)
    q = tl.load(q_ptr + b * s_q_b + s * s_q_s + heads[:, None] * s_q_h + d[None, :], mask=mask_h[:, None], other=0.0)
    q = q.to(compute)
    scale2 = sm_scale * LOG2E

    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, 512), tl.float32)
    lo = split * KEYS_PER_SPLIT
    hi = lo + KEYS_PER_SPLIT
    blocks = tl.arange(0, BLOCK_N)

    limit = topk
    if HAS_LEN:
        limit = tl.minimum(limit, tl.load(len_ptr + b))
    idx_row = idx_ptr + b * s_i_b + s * s_i_s
    main_hi = tl.minimum(hi, limit)
    # A fixed trip count with the blocks past the end skipped (not a loop bound from the lengths:
    # the same code runs under the CPU interpreter, which cannot take a loop bound from a tensor).
    for j in range(0, KEYS_PER_SPLIT, BLOCK_N):
        start = lo + j
        if start < main_hi:
            keys, valid = _load_keys(cache_ptr, idx_row, start + blocks, main_hi, page_stride, block_size, n_tokens,
                                     BLOCK_N, compute)
            sc = _scores(q, keys, scale2, BLOCK_H, BLOCK_N, IEEE)
            sc = tl.where(valid[None, :], sc, float("-inf"))
            m, den, acc = softmax_step(sc, keys, m, den, acc, IEEE)

    if HAS_EXTRA:
        x_limit = x_topk
        if HAS_X_LEN:
            x_limit = tl.minimum(x_limit, tl.load(x_len_ptr + b))
        x_lo = tl.maximum(lo - topk, 0)
        x_hi = tl.minimum(hi - topk, x_limit)
        x_row = x_idx_ptr + b * s_xi_b + s * s_xi_s
        for j in range(0, KEYS_PER_SPLIT, BLOCK_N):
            start = x_lo + j
            if start < x_hi:
                keys, valid = _load_keys(x_cache_ptr, x_row, start + blocks, x_hi, x_page_stride, x_block_size,
                                         x_n_tokens, BLOCK_N, compute)
                sc = _scores(q, keys, scale2, BLOCK_H, BLOCK_N, IEEE)
                sc = tl.where(valid[None, :], sc, float("-inf"))
                m, den, acc = softmax_step(sc, keys, m, den, acc, IEEE)

    sink2 = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    if HAS_SINK:
        sink2 = tl.load(sink_ptr + heads, mask=mask_h, other=0.0) * LOG2E
    o_ptrs = out_ptr + split * s_o_split + b * s_o_b + s * s_o_s + heads[:, None] * s_o_h + d[None, :]
    lse_ptrs = lse_ptr + split * s_l_split + b * s_l_b + heads * s_l_h + s * s_l_s
    write_result(acc, m, den, sink2, o_ptrs, lse_ptrs, den_offset, mask_h, mask_h[:, None], FINAL, True)

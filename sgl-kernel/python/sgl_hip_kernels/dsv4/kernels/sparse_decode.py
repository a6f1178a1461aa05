"""Triton body: DeepSeek-V4 sparse decode over the FP8 584 B/token cache (contract:
``dsv4/sparse_decode_ref``; layout: ``dsv4/kv_cache``).

One program per (block of heads, query token, split of the key list). The key list is the main
scope's top-k followed by the extra scope's; a split walks its part of each. A gathered key is
eight 64-wide tiles: seven fp8 NoPE tiles, each with its power-of-two scale, and the bf16 RoPE tile.
The fp8 bytes convert to bf16 exactly and the scales are applied where they cost least and change
nothing (a power of two commutes with every rounding here): to the tile's partial scores
``s += scale_t * (q_t . k_t)`` and to the probabilities it multiplies, ``acc_t += (p * scale_t) v_t``.
So no tile is ever widened to fp32 and there are eight (BLOCK_H, 64) accumulators, V = K. Heads
are the fastest grid axis, so the programs that read one token's keys run together and share them
through L2.
"""

import triton
import triton.language as tl

from ...kernels.splitk import LOG2E, online_softmax, write_result


@triton.jit
def _key_tile(cache_ptr, data, valid, T: tl.constexpr, COMPUTE: tl.constexpr, CACHE: tl.constexpr):
    """Tile ``T`` (BLOCK_N, 64) of the gathered keys, unscaled: fp8 NoPE tiles 0..6, the bf16 RoPE tile 7."""
    c = tl.arange(0, 64)
    if T < 7:
        raw = tl.load(cache_ptr + data[:, None] + (T * 64) + c[None, :], mask=valid[:, None], other=0, cache_modifier=CACHE)
        tile = raw.to(tl.float8e4nv, bitcast=True).to(COMPUTE)
    else:
        ptrs = (cache_ptr + data[:, None] + 448).to(tl.pointer_type(tl.bfloat16)) + c[None, :]
        tile = tl.load(ptrs, mask=valid[:, None], other=0.0, cache_modifier=CACHE).to(COMPUTE)
    return tile


@triton.jit
def _tile_scale(cache_ptr, scales_at, valid, T: tl.constexpr):
    """The (BLOCK_N,) scales of tile ``T``: 2^(u8 - 127); 1 for the RoPE tile."""
    if T < 7:
        scale = tl.exp2(tl.load(cache_ptr + scales_at + T, mask=valid, other=127).to(tl.float32) - 127.0)
    else:
        scale = tl.full(scales_at.shape, 1.0, tl.float32)
    return scale


@triton.jit
def _q_tile(q_row, heads_ok, T: tl.constexpr, COMPUTE: tl.constexpr):
    return tl.load(q_row + (T * 64) + tl.arange(0, 64)[None, :], mask=heads_ok[:, None], other=0.0).to(COMPUTE)


@triton.jit
def _tile_scores(q_row, mask_h, cache_ptr, data, valid, T: tl.constexpr, COMPUTE: tl.constexpr, IEEE: tl.constexpr):
    """q's tile T (re-read from L1 each block) times the keys' tile T: (BLOCK_H, BLOCK_N), unscaled."""
    k = _key_tile(cache_ptr, data, valid, T, COMPUTE, "")
    return tl.dot(_q_tile(q_row, mask_h, T, COMPUTE), tl.trans(k), input_precision="ieee" if IEEE else "tf32")


@triton.jit
def _tile_values(acc, alpha, p, cache_ptr, data, valid, T: tl.constexpr, COMPUTE: tl.constexpr, IEEE: tl.constexpr):
    """The accumulator of tile T rescaled and plus p times the keys' tile T (V = K), read again."""
    # ".ca": a second read of the same bytes, not merged with the first by the compiler.
    v = _key_tile(cache_ptr, data, valid, T, COMPUTE, ".ca")
    return acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision="ieee" if IEEE else "tf32")


@triton.jit
def _attend(cache_ptr, idx_row, pos, limit, page_stride, block_size, n_tokens, scale2,
            q_row, mask_h, m, den, a0, a1, a2, a3, a4, a5, a6, a7, COMPUTE: tl.constexpr, IEEE: tl.constexpr):
    """One block of keys at positions ``pos`` of one scope into the running softmax. Positions at
    or past ``limit``, negative indices and indices past the cache are invalid and never read."""
    in_list = pos < limit
    idx = tl.load(idx_row + pos, mask=in_list, other=-1).to(tl.int64)
    valid = in_list & (idx >= 0) & (idx < n_tokens)
    idx = tl.where(valid, idx, 0)
    page = idx // block_size
    slot = idx - page * block_size
    data = page * page_stride + slot * 576
    scales_at = page * page_stride + block_size * 576 + slot * 8
    c0 = _tile_scale(cache_ptr, scales_at, valid, 0)
    c1 = _tile_scale(cache_ptr, scales_at, valid, 1)
    c2 = _tile_scale(cache_ptr, scales_at, valid, 2)
    c3 = _tile_scale(cache_ptr, scales_at, valid, 3)
    c4 = _tile_scale(cache_ptr, scales_at, valid, 4)
    c5 = _tile_scale(cache_ptr, scales_at, valid, 5)
    c6 = _tile_scale(cache_ptr, scales_at, valid, 6)
    # One key tile is live at a time: each is read for its scores, and read again (from L1/L2) for
    # its values. Holding all eight across the softmax, in both dot layouts, needs more registers
    # than a program has (ptxas: spills), and leaves room for too few programs to hide the gathers.
    s = _tile_scores(q_row, mask_h, cache_ptr, data, valid, 7, COMPUTE, IEEE)
    s += _tile_scores(q_row, mask_h, cache_ptr, data, valid, 0, COMPUTE, IEEE) * c0[None, :]
    s += _tile_scores(q_row, mask_h, cache_ptr, data, valid, 1, COMPUTE, IEEE) * c1[None, :]
    s += _tile_scores(q_row, mask_h, cache_ptr, data, valid, 2, COMPUTE, IEEE) * c2[None, :]
    s += _tile_scores(q_row, mask_h, cache_ptr, data, valid, 3, COMPUTE, IEEE) * c3[None, :]
    s += _tile_scores(q_row, mask_h, cache_ptr, data, valid, 4, COMPUTE, IEEE) * c4[None, :]
    s += _tile_scores(q_row, mask_h, cache_ptr, data, valid, 5, COMPUTE, IEEE) * c5[None, :]
    s += _tile_scores(q_row, mask_h, cache_ptr, data, valid, 6, COMPUTE, IEEE) * c6[None, :]
    s = tl.where(valid[None, :], s * scale2, float("-inf"))
    m, den, alpha, p = online_softmax(s, m, den)
    a0 = _tile_values(a0, alpha, p * c0[None, :], cache_ptr, data, valid, 0, COMPUTE, IEEE)
    a1 = _tile_values(a1, alpha, p * c1[None, :], cache_ptr, data, valid, 1, COMPUTE, IEEE)
    a2 = _tile_values(a2, alpha, p * c2[None, :], cache_ptr, data, valid, 2, COMPUTE, IEEE)
    a3 = _tile_values(a3, alpha, p * c3[None, :], cache_ptr, data, valid, 3, COMPUTE, IEEE)
    a4 = _tile_values(a4, alpha, p * c4[None, :], cache_ptr, data, valid, 4, COMPUTE, IEEE)
    a5 = _tile_values(a5, alpha, p * c5[None, :], cache_ptr, data, valid, 5, COMPUTE, IEEE)
    a6 = _tile_values(a6, alpha, p * c6[None, :], cache_ptr, data, valid, 6, COMPUTE, IEEE)
    a7 = _tile_values(a7, alpha, p, cache_ptr, data, valid, 7, COMPUTE, IEEE)
    return m, den, a0, a1, a2, a3, a4, a5, a6, a7


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
    s_l_split, s_l_b, s_l_h, s_l_s,
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
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    b = t // S_Q
    s = t % S_Q
    mask_h = heads < H
    compute: tl.constexpr = tl.float32 if IEEE else tl.bfloat16
    q_row = q_ptr + b * s_q_b + s * s_q_s + heads[:, None] * s_q_h
    scale2 = sm_scale * LOG2E

    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_H,), tl.float32)
    a0 = tl.zeros((BLOCK_H, 64), tl.float32)
    a1 = tl.zeros((BLOCK_H, 64), tl.float32)
    a2 = tl.zeros((BLOCK_H, 64), tl.float32)
    a3 = tl.zeros((BLOCK_H, 64), tl.float32)
    a4 = tl.zeros((BLOCK_H, 64), tl.float32)
    a5 = tl.zeros((BLOCK_H, 64), tl.float32)
    a6 = tl.zeros((BLOCK_H, 64), tl.float32)
    a7 = tl.zeros((BLOCK_H, 64), tl.float32)
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
            m, den, a0, a1, a2, a3, a4, a5, a6, a7 = _attend(
                cache_ptr, idx_row, start + blocks, main_hi, page_stride, block_size, n_tokens, scale2,
                q_row, mask_h, m, den, a0, a1, a2, a3, a4, a5, a6, a7, compute, IEEE)

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
                m, den, a0, a1, a2, a3, a4, a5, a6, a7 = _attend(
                    x_cache_ptr, x_row, start + blocks, x_hi, x_page_stride, x_block_size, x_n_tokens, scale2,
                    q_row, mask_h, m, den, a0, a1, a2, a3, a4, a5, a6, a7, compute, IEEE)

    sink2 = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    if HAS_SINK:
        sink2 = tl.load(sink_ptr + heads, mask=mask_h, other=0.0) * LOG2E
    o_row = out_ptr + split * s_o_split + b * s_o_b + s * s_o_s + heads[:, None] * s_o_h + tl.arange(0, 64)[None, :]
    lse_ptrs = lse_ptr + split * s_l_split + b * s_l_b + heads * s_l_h + s * s_l_s
    mo = mask_h[:, None]
    write_result(a0, m, den, sink2, o_row, lse_ptrs, mask_h, mo, FINAL, True)
    write_result(a1, m, den, sink2, o_row + 64, lse_ptrs, mask_h, mo, FINAL, False)
    write_result(a2, m, den, sink2, o_row + 128, lse_ptrs, mask_h, mo, FINAL, False)
    write_result(a3, m, den, sink2, o_row + 192, lse_ptrs, mask_h, mo, FINAL, False)
    write_result(a4, m, den, sink2, o_row + 256, lse_ptrs, mask_h, mo, FINAL, False)
    write_result(a5, m, den, sink2, o_row + 320, lse_ptrs, mask_h, mo, FINAL, False)
    write_result(a6, m, den, sink2, o_row + 384, lse_ptrs, mask_h, mo, FINAL, False)
    write_result(a7, m, den, sink2, o_row + 448, lse_ptrs, mask_h, mo, FINAL, False)

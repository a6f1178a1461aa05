"""Triton bodies: the DeepSeek-V4 KV compressor (reference §5.3), fused: APE bias add, per-channel
online-softmax pooling, RMSNorm, GPT-J RoPE on the last 64 channels, optional Walsh-Hadamard.

One program per compressed vector. A block's K rows (8 for ratio 4: the previous block's A half,
then its own B half; 128 for ratio 128) are token positions ``p_start + j``. The last ``n_new`` of
them are new rows in ``u`` (the last one at row ``last_u``), the others sit in the request's state
ring: token q lives on page ``pages[req, (q // RATIO) % N_PAGES]``, slot ``q % RATIO``. A position
below 0 is an invalid row (the first block of a sequence has no previous block).

Layouts read (stated because upstream's fused kernel read the checkpoint ape layout, unusable for
the overlap case): a raw row is ``[kv_A | kv_B | s_A | s_B]`` (ratio 4) or ``[kv | s]`` (ratio 128);
``bias`` is (K, D) with rows 0..3 the A half and 4..7 the B half for ratio 4 (the hot-fixed ape).
"""

import triton
import triton.language as tl


@triton.jit
def _pool_rows(
    u_ptr, state_ptr, pages_ptr, bias_ptr,
    p_start, last_u, n_new, req,
    s_u, s_state, s_pages,
    RATIO: tl.constexpr, D: tl.constexpr, N_PAGES: tl.constexpr, BK: tl.constexpr,
):
    """Per-channel softmax pooling of one block's rows: returns (D,) fp32, 0 where no row weighs."""
    OVERLAP: tl.constexpr = RATIO == 4
    K: tl.constexpr = 8 if OVERLAP else RATIO
    NEG_INF: tl.constexpr = float("-inf")
    cols = tl.arange(0, D).to(tl.int64)
    m = tl.full((D,), NEG_INF, tl.float32)
    den = tl.zeros((D,), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for k0 in range(0, K, BK):
        j = k0 + tl.arange(0, BK)
        q = p_start + j  # token position of each row
        valid = q >= 0
        is_new = j >= K - n_new
        from_state = valid & (j < K - n_new)
        if OVERLAP:  # rows 0..3: previous block's A half; rows 4..7: own B half
            kv_col = tl.where(j < 4, 0, D)
            s_col = tl.where(j < 4, 2 * D, 3 * D)
        else:
            kv_col = tl.zeros((BK,), tl.int32)
            s_col = tl.full((BK,), D, tl.int32)
        q_safe = tl.where(valid, q, 0)
        page = tl.load(pages_ptr + req * s_pages + (q_safe // RATIO) % N_PAGES, mask=from_state, other=0)
        state_row = page.to(tl.int64) * RATIO + q_safe % RATIO
        u_row = (last_u - (K - 1 - j)).to(tl.int64)
        new2 = (valid & is_new)[:, None]
        old2 = from_state[:, None]
        u_base = u_ptr + u_row[:, None] * s_u + cols[None, :]
        st_base = state_ptr + state_row[:, None] * s_state + cols[None, :]
        kv = tl.where(new2, tl.load(u_base + kv_col[:, None], mask=new2, other=0.0).to(tl.float32),
                      tl.load(st_base + kv_col[:, None], mask=old2, other=0.0))
        s = tl.where(new2, tl.load(u_base + s_col[:, None], mask=new2, other=0.0).to(tl.float32),
                     tl.load(st_base + s_col[:, None], mask=old2, other=0.0))
        s = s + tl.load(bias_ptr + j[:, None].to(tl.int64) * D + cols[None, :])
        # Both #26208 guards: a row that is invalid or scores -inf weighs exactly 0 (and its kv is not
        # multiplied in, so a NaN/inf kv there cannot leak); an old max of -inf rescales by 0, not NaN.
        weighs = valid[:, None] & (s > NEG_INF)
        s = tl.where(weighs, s, NEG_INF)
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.where(m > NEG_INF, tl.exp(m - m_new), 0.0)
        e = tl.where(weighs, tl.exp(s - tl.where(m_new > NEG_INF, m_new, 0.0)[None, :]), 0.0)
        acc = acc * alpha + tl.sum(e * tl.where(weighs, kv, 0.0), 0)
        den = den * alpha + tl.sum(e, 0)
        m = m_new
    return tl.where(den > 0, acc / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _butterfly(y, D: tl.constexpr, H: tl.constexpr):
    """One Walsh-Hadamard stage: (a, b) -> (a + b, a - b) for element pairs H apart."""
    a, b = tl.split(tl.permute(tl.reshape(y, (D // (2 * H), 2, H)), (0, 2, 1)))
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (D,))


@triton.jit
def _norm_rope_rotate(pooled, normw_ptr, cos_ptr, sin_ptr, pos, eps, s_cos,
                      D: tl.constexpr, LOG2_D: tl.constexpr, ROTATE: tl.constexpr):
    """RMSNorm(weight) over all D, GPT-J RoPE on the last 64 at ``pos``, then (ROTATE) the
    Walsh-Hadamard transform with scale D^-1/2."""
    cols = tl.arange(0, D)
    y = pooled * tl.math.rsqrt(tl.sum(pooled * pooled, 0) / D + eps) * tl.load(normw_ptr + cols)
    even, odd = tl.split(tl.reshape(y, (D // 2, 2)))
    pair = tl.arange(0, D // 2) - (D - 64) // 2  # frequency index of each pair; < 0: not rotated
    is_rope = pair >= 0
    c = tl.load(cos_ptr + pos * s_cos + pair, mask=is_rope, other=1.0)
    s = tl.load(sin_ptr + pos * s_cos + pair, mask=is_rope, other=0.0)
    y = tl.reshape(tl.join(tl.where(is_rope, even * c - odd * s, even), tl.where(is_rope, odd * c + even * s, odd)), (D,))
    if ROTATE:
        for stage in tl.static_range(LOG2_D):  # butterfly stages, unrolled
            y = _butterfly(y, D, 1 << stage)
        y = y * (1.0 / tl.sqrt(float(D)))
    return y


@triton.jit
def _dsv4_compress_decode_kernel(
    u_ptr, state_ptr, pages_ptr, seq_lens_ptr, bias_ptr, normw_ptr, cos_ptr, sin_ptr, out_ptr,
    eps, s_u, s_state, s_pages, s_cos, s_out,
    RATIO: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr, N_PAGES: tl.constexpr, BK: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """Program b: store request b's new row (token seq_len - 1) in its ring, and when that token
    closes a block (seq_len % RATIO == 0) emit the block; otherwise out[b] = 0. seq_len <= 0 (a
    padded slot) touches no state and gives 0. The new row is pooled from ``u``, not re-read from
    the state it was just stored to."""
    W: tl.constexpr = (4 if RATIO == 4 else 2) * D
    BW: tl.constexpr = triton.next_power_of_2(W)
    b = tl.program_id(0).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    t = seq_len - 1
    if seq_len > 0:
        wc = tl.arange(0, BW)
        row = tl.load(u_ptr + b * s_u + wc, mask=wc < W).to(tl.float32)
        page = tl.load(pages_ptr + b * s_pages + (t // RATIO) % N_PAGES).to(tl.int64)
        tl.store(state_ptr + (page * RATIO + t % RATIO) * s_state + wc, row, mask=wc < W)
    cols = tl.arange(0, D)
    if (seq_len > 0) & (seq_len % RATIO == 0):
        pos = seq_len - RATIO  # the block's first token
        p_start = pos - 4 if RATIO == 4 else pos
        pooled = _pool_rows(u_ptr, state_ptr, pages_ptr, bias_ptr, p_start, b, 1, b, s_u, s_state, s_pages,
                            RATIO, D, N_PAGES, BK)
        y = _norm_rope_rotate(pooled, normw_ptr, cos_ptr, sin_ptr, pos, eps, s_cos, D, LOG2_D, ROTATE)
        tl.store(out_ptr + b * s_out + cols, y.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + b * s_out + cols, tl.zeros((D,), out_ptr.dtype.element_ty))


@triton.jit
def _dsv4_compress_prefill_kernel(
    u_ptr, state_ptr, pages_ptr, plan_ptr, bias_ptr, normw_ptr, cos_ptr, sin_ptr, out_ptr,
    eps, s_u, s_state, s_pages, s_cos, s_out,
    RATIO: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr, N_PAGES: tl.constexpr, BK: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """Program i: block plan[i] = (first token position, ragged row of its last token, rows that
    are new, request); a row with position < 0 is padding and gives 0. Reads state, never writes
    it (``_dsv4_state_write_kernel`` runs after, so no program reads a slot another overwrites)."""
    i = tl.program_id(0).to(tl.int64)
    pos = tl.load(plan_ptr + i * 4 + 0)
    cols = tl.arange(0, D)
    if pos >= 0:
        last_u = tl.load(plan_ptr + i * 4 + 1)
        n_new = tl.load(plan_ptr + i * 4 + 2)
        req = tl.load(plan_ptr + i * 4 + 3).to(tl.int64)
        p_start = pos - 4 if RATIO == 4 else pos
        pooled = _pool_rows(u_ptr, state_ptr, pages_ptr, bias_ptr, p_start, last_u, n_new, req, s_u, s_state, s_pages,
                            RATIO, D, N_PAGES, BK)
        y = _norm_rope_rotate(pooled, normw_ptr, cos_ptr, sin_ptr, pos, eps, s_cos, D, LOG2_D, ROTATE)
        tl.store(out_ptr + i * s_out + cols, y.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + i * s_out + cols, tl.zeros((D,), out_ptr.dtype.element_ty))


@triton.jit
def _dsv4_state_write_kernel(
    u_ptr, state_ptr, pages_ptr, writes_ptr, s_u, s_state, s_pages,
    RATIO: tl.constexpr, N_PAGES: tl.constexpr, W: tl.constexpr, BW: tl.constexpr,
):
    """Program i: copy ragged row writes[i, 0] (fp32) to token writes[i, 2]'s slot in request
    writes[i, 1]'s ring; a negative ragged row is padding."""
    i = tl.program_id(0).to(tl.int64)
    src = tl.load(writes_ptr + i * 3 + 0).to(tl.int64)
    if src >= 0:
        req = tl.load(writes_ptr + i * 3 + 1).to(tl.int64)
        t = tl.load(writes_ptr + i * 3 + 2)
        page = tl.load(pages_ptr + req * s_pages + (t // RATIO) % N_PAGES).to(tl.int64)
        wc = tl.arange(0, BW)
        row = tl.load(u_ptr + src * s_u + wc, mask=wc < W).to(tl.float32)
        tl.store(state_ptr + (page * RATIO + t % RATIO) * s_state + wc, row, mask=wc < W)

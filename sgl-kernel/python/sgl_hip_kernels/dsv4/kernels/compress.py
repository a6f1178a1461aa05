"""Triton bodies: the DeepSeek-V4 KV compressor (contract: ``dsv4/compress_ref.py``), fused: APE bias add, per-channel
online-softmax pooling, RMSNorm, GPT-J RoPE on the last 64 channels, optional Walsh-Hadamard.

A block's channels are split over SPLIT programs (pooling is per channel, so each pools CB = D/SPLIT
channels of all K rows; a decode block that reads 128 rows of 512 channels is too much for one
program). They meet through a workspace: each stores its pooled channels and their sum of squares,
then takes a ticket from the block's counter; the last one finishes the block (RMSNorm over all D
with the partial sums added in a fixed order, so the result does not depend on who came last, RoPE,
rotation) and resets the counter to 0 for the next launch.

A block's K rows (8 for ratio 4: the previous block's A half, then its own B half; 128 for ratio
128) are token positions ``p_start + j``. The last ``n_new`` of them are new rows in ``u`` (the last
one at row ``last_u``), the others sit in the request's state ring: token q lives on page
``pages[req, (q // RATIO) % N_PAGES]``, slot ``q % RATIO``. A position below 0 is an invalid row
(the first block of a sequence has no previous block).

Layouts read (stated because upstream's fused kernel read the checkpoint ape layout, unusable for
the overlap case): a raw row is ``[kv_A | kv_B | s_A | s_B]`` (ratio 4) or ``[kv | s]`` (ratio 128);
``bias`` is (K, D) with rows 0..3 the A half and 4..7 the B half for ratio 4 (the hot-fixed ape).

Guards (the launchers check index values on the host except under graph capture; these hold
regardless): a request with a ring page id outside ``[0, n_state_pages)`` stores nothing and reads
nothing from the state, with an out row of NaN; a block whose first token's position is at or past
``n_cos`` (the RoPE table's rows) gives a NaN row; a prefill plan row naming a request outside
``state_pages`` or ragged rows outside ``u`` reads and writes nothing (NaN row for a block). The
SGLang-planned prefill (``_dsv4_compress_prefill_paged_kernel``): its guards in its docstring.
"""

import triton
import triton.language as tl


@triton.jit
def _pool_rows(
    u_ptr, state_ptr, bias_ptr,
    p_start, last_u, n_new, own_page, prev_page, c0,
    s_u, s_state,
    RATIO: tl.constexpr, D: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr,
):
    """Per-channel softmax pooling of channels c0..c0+CB of one block's rows: (CB,) fp32, 0 where
    no row weighs. Old rows are read from ``own_page`` (the block's own tokens) and, ratio 4,
    ``prev_page`` (the previous block's)."""
    OVERLAP: tl.constexpr = RATIO == 4
    K: tl.constexpr = 8 if OVERLAP else RATIO
    NEG_INF: tl.constexpr = float("-inf")
    cols = c0 + tl.arange(0, CB).to(tl.int64)
    m = tl.full((CB,), NEG_INF, tl.float32)
    den = tl.zeros((CB,), tl.float32)
    acc = tl.zeros((CB,), tl.float32)
    for k0 in tl.static_range(0, K, BK):  # unrolled: every tile's loads can be in flight at once
        j = k0 + tl.arange(0, BK)
        q = p_start + j  # token position of each row
        valid = q >= 0
        is_new = j >= K - n_new
        from_state = valid & (j < K - n_new)
        if OVERLAP:  # rows 0..3: previous block's A half, on its page; rows 4..7: own B half
            kv_col = tl.where(j < 4, 0, D)
            s_col = tl.where(j < 4, 2 * D, 3 * D)
            page = tl.where(j < 4, prev_page, own_page)
        else:
            kv_col = tl.zeros((BK,), tl.int32)
            s_col = tl.full((BK,), D, tl.int32)
            page = own_page
        q_safe = tl.where(valid, q, 0)
        state_row = page * RATIO + q_safe % RATIO
        u_row = (last_u - (K - 1 - j)).to(tl.int64)
        # Tiles are [channels, rows] and reduce over rows (axis 1): the same math either way, but the
        # interpreter then sums rows pairwise (numpy along the last axis), as the GPU's tree does,
        # instead of one by one.
        new2 = (valid & is_new)[None, :]
        old2 = from_state[None, :]
        u_base = u_ptr + u_row[None, :] * s_u + cols[:, None]
        st_base = state_ptr + state_row[None, :] * s_state + cols[:, None]
        kv = tl.where(new2, tl.load(u_base + kv_col[None, :], mask=new2, other=0.0).to(tl.float32),
                      tl.load(st_base + kv_col[None, :], mask=old2, other=0.0))
        s = tl.where(new2, tl.load(u_base + s_col[None, :], mask=new2, other=0.0).to(tl.float32),
                     tl.load(st_base + s_col[None, :], mask=old2, other=0.0))
        s = s + tl.load(bias_ptr + j[None, :].to(tl.int64) * D + cols[:, None])
        # Both sglang#26208 guards: a row that is invalid or scores -inf weighs exactly 0 (and its kv is not
        # multiplied in, so a NaN/inf kv there cannot leak); an old max of -inf rescales by 0, not NaN.
        weighs = valid[None, :] & (s > NEG_INF)
        s = tl.where(weighs, s, NEG_INF)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.where(m > NEG_INF, tl.exp(m - m_new), 0.0)
        e = tl.where(weighs, tl.exp(s - tl.where(m_new > NEG_INF, m_new, 0.0)[:, None]), 0.0)
        acc = acc * alpha + tl.sum(e * tl.where(weighs, kv, 0.0), 1)
        den = den * alpha + tl.sum(e, 1)
        m = m_new
    return tl.where(den > 0, acc / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _butterfly(y, D: tl.constexpr, H: tl.constexpr):
    """One Walsh-Hadamard stage: (a, b) -> (a + b, a - b) for element pairs H apart."""
    a, b = tl.split(tl.permute(tl.reshape(y, (D // (2 * H), 2, H)), (0, 2, 1)))
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (D,))


@triton.jit
def _nan_row(out_ptr, slot, s_out, D: tl.constexpr):
    """The defined output of a block the guards refuse."""
    tl.store(out_ptr + slot * s_out + tl.arange(0, D), tl.full((D,), float("nan"), tl.float32).to(out_ptr.dtype.element_ty))


@triton.jit
def _write_row(y, row, loc_row, out_ptr, s_out, cache_ptr, fp8_ptr, wide_ptr, loc_ptr, s_loc, page_bytes, page_size,
               D: tl.constexpr, STORE: tl.constexpr, PRESHUFFLE: tl.constexpr):
    """Row ``row``'s result ``y`` (D,) fp32: into out[row] (STORE 0), or quantised into SGLang's
    compressed cache at slot loc[loc_row] (page loc // page_size, ``page_bytes`` apart), as its HIP Triton
    store lays it out. STORE 1, the V4 layout (d 512): per token 576 data bytes (448 fp8 NoPE, then
    the 64 RoPE values as bf16) and, after the page's data, 8 scale bytes (7 UE8M0 exponents, one
    per 64 NoPE values; the 8th is not written); the row is rounded to bf16 first. STORE 2, the
    indexer's (d 128): 128 fp8 bytes per token (at ``slot * 128``, or in the preshuffled
    PRESHUFFLE x PRESHUFFLE tiles), then the page's fp32 scales. The scales follow the same steps as
    that store (floor 1e-8, FP8 max 448; V4: 2 ** ceil(log2(scale))), so the bytes are the same for
    the same row. ``fp8_ptr`` / ``wide_ptr``: the cache as fp8 and as bf16 (STORE 1) or fp32 (STORE 2)."""
    if STORE == 0:
        tl.store(out_ptr + row * s_out + tl.arange(0, D), y.to(out_ptr.dtype.element_ty))
    else:
        loc = tl.load(loc_ptr + loc_row * s_loc).to(tl.int64)
        slot = loc % page_size
        base = loc // page_size * page_bytes
        if STORE == 1:
            t = tl.reshape(y.to(tl.bfloat16).to(tl.float32), (8, 64))  # tiles 0..6: NoPE; tile 7: RoPE
            tile = tl.arange(0, 8)
            lane = tl.arange(0, 64)
            exponent = tl.math.ceil(tl.log2(tl.maximum(tl.max(tl.abs(t), 1), 1e-8) / 448.0))
            q = tl.clamp(t * tl.exp2(-exponent)[:, None], -448.0, 448.0)
            at = base + slot * 576 + tile[:, None] * 64 + lane[None, :]
            nope = tile[:, None] < 7
            tl.store(fp8_ptr + at, q.to(fp8_ptr.dtype.element_ty), mask=nope)
            rope_at = (base + slot * 576 + 448) // 2 + tile[:, None] * 0 + lane[None, :]  # in bf16 elements
            tl.store(wide_ptr + rope_at, t.to(tl.bfloat16), mask=tile[:, None] == 7)
            tl.store(cache_ptr + base + page_size * 576 + slot * 8 + tile, (exponent.to(tl.int32) + 127).to(tl.uint8),
                     mask=tile < 7)
        else:
            lane = tl.arange(0, D)
            scale = tl.maximum(tl.max(tl.abs(y), 0), 1e-8) / 448.0
            q = tl.clamp(y * (1.0 / scale), -448.0, 448.0)
            if PRESHUFFLE:
                at = (base + slot // PRESHUFFLE * (PRESHUFFLE * D) + lane // PRESHUFFLE * (PRESHUFFLE * PRESHUFFLE)
                      + slot % PRESHUFFLE * PRESHUFFLE + lane % PRESHUFFLE)
            else:
                at = base + slot * D + lane
            tl.store(fp8_ptr + at, q.to(fp8_ptr.dtype.element_ty))
            tl.store(wide_ptr + (base + page_size * D) // 4 + slot, scale)


@triton.jit
def _ring_page(page_a, page_b, block, N_PAGES: tl.constexpr):
    """Page id of a block in a ring of N_PAGES (1 or 2) pages whose ids are page_a, page_b."""
    if N_PAGES == 1:
        return page_a
    return tl.where(tl.maximum(block, 0) % 2 == 0, page_a, page_b)


@triton.jit
def _norm_rope_rotate(pooled, sum_sq, w, c, s, eps, D: tl.constexpr, LOG2_D: tl.constexpr, ROTATE: tl.constexpr):
    """RMSNorm (weight ``w``) over all D (``sum_sq``: the pooled vector's sum of squares), GPT-J
    RoPE on the last 64 (``c``/``s`` per pair: 1/0 outside them), then (ROTATE) the Walsh-Hadamard
    transform with scale D^-1/2."""
    y = pooled * tl.math.rsqrt(sum_sq / D + eps) * w
    even, odd = tl.split(tl.reshape(y, (D // 2, 2)))
    is_rope = tl.arange(0, D // 2) >= (D - 64) // 2
    y = tl.reshape(tl.join(tl.where(is_rope, even * c - odd * s, even), tl.where(is_rope, odd * c + even * s, odd)), (D,))
    if ROTATE:
        for stage in tl.static_range(LOG2_D):  # butterfly stages, unrolled
            y = _butterfly(y, D, 1 << stage)
        y = y * (1.0 / tl.sqrt(float(D)))
    return y


@triton.jit
def _emit_block(
    u_ptr, state_ptr, bias_ptr, normw_ptr, cos_ptr, sin_ptr, out_ptr, pooled_ptr, sumsq_ptr, count_ptr,
    pos, last_u, n_new, own_page, prev_page, slot, loc_row, chunk, eps, s_u, s_state, s_cos, s_cos_c, s_out,
    cache_ptr, fp8_ptr, wide_ptr, loc_ptr, s_loc, page_bytes, page_size,
    RATIO: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr, SPLIT: tl.constexpr,
    BK: tl.constexpr, ROTATE: tl.constexpr, STORE: tl.constexpr, PRESHUFFLE: tl.constexpr,
):
    """Chunk ``chunk`` of the block whose first token is at ``pos``, into row ``slot`` (workspace
    and out) and cache slot loc[loc_row] (``_write_row``)."""
    CB: tl.constexpr = D // SPLIT
    p_start = pos - 4 if RATIO == 4 else pos
    cols = tl.arange(0, D)
    # The finishing loads are issued before the pooling (and the ticket, which no load may pass).
    w = tl.load(normw_ptr + cols)
    pair = tl.arange(0, D // 2) - (D - 64) // 2  # frequency index of each pair; < 0: not rotated
    c = tl.load(cos_ptr + pos * s_cos + pair * s_cos_c, mask=pair >= 0, other=1.0)
    s = tl.load(sin_ptr + pos * s_cos + pair * s_cos_c, mask=pair >= 0, other=0.0)
    pooled = _pool_rows(u_ptr, state_ptr, bias_ptr, p_start, last_u, n_new, own_page, prev_page, chunk * CB,
                        s_u, s_state, RATIO, D, CB, BK)
    if SPLIT == 1:
        y = _norm_rope_rotate(pooled, tl.sum(pooled * pooled, 0), w, c, s, eps, D, LOG2_D, ROTATE)
        _write_row(y, slot, loc_row, out_ptr, s_out, cache_ptr, fp8_ptr, wide_ptr, loc_ptr, s_loc, page_bytes, page_size,
                   D, STORE, PRESHUFFLE)
    else:
        tl.store(pooled_ptr + slot * D + chunk * CB + tl.arange(0, CB), pooled)
        tl.store(sumsq_ptr + slot * SPLIT + chunk, tl.sum(pooled * pooled, 0))
        tl.debug_barrier()  # every thread's stores precede the ticket (released by the acq_rel atomic)
        if tl.atomic_add(count_ptr + slot, 1) == SPLIT - 1:  # the last chunk in finishes the block
            full = tl.load(pooled_ptr + slot * D + cols, cache_modifier=".cg")
            sum_sq = tl.sum(tl.load(sumsq_ptr + slot * SPLIT + tl.arange(0, SPLIT), cache_modifier=".cg"), 0)
            y = _norm_rope_rotate(full, sum_sq, w, c, s, eps, D, LOG2_D, ROTATE)
            _write_row(y, slot, loc_row, out_ptr, s_out, cache_ptr, fp8_ptr, wide_ptr, loc_ptr, s_loc, page_bytes, page_size,
                       D, STORE, PRESHUFFLE)
            tl.store(count_ptr + slot, 0)


@triton.jit
def _pages_inside(page_a, page_b, n_state_pages):
    return (page_a >= 0) & (page_a < n_state_pages) & (page_b >= 0) & (page_b < n_state_pages)


@triton.jit
def _dsv4_compress_decode_kernel(
    u_ptr, state_ptr, pages_ptr, seq_lens_ptr, bias_ptr, normw_ptr, cos_ptr, sin_ptr, out_ptr,
    pooled_ptr, sumsq_ptr, count_ptr,
    eps, n_state_pages, n_cos, s_u, s_state, s_seq, s_pages, s_cos, s_cos_c, s_out,
    cache_ptr, fp8_ptr, wide_ptr, loc_ptr, s_loc, page_bytes, page_size,
    RATIO: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr, SPLIT: tl.constexpr, N_PAGES: tl.constexpr,
    BK: tl.constexpr, ROTATE: tl.constexpr, PREV_CUR: tl.constexpr, STORE: tl.constexpr, PRESHUFFLE: tl.constexpr,
):
    """Programs (b, chunk): chunk 0 stores request b's new row (token seq_len - 1) in its ring;
    when that token closes a block (seq_len % RATIO == 0) every chunk pools its channels of the
    block, else chunk 0 writes out[b] = 0. seq_len <= 0 (a padded slot) touches no state and gives 0.
    The new row is pooled from ``u``, not re-read from the state it is being stored to. Guards:
    module docstring (every chunk of a request takes the same decision). PREV_CUR: the request's
    two page ids are (the previous block's page, the current block's page) for this step, not a
    ring indexed by block parity (ratio 4; ratio 128 reads its one page from the given column).
    STORE > 0: an emitted (or refused) row goes to the cache (``_write_row``), and a row that emits
    nothing is not written anywhere."""
    # A power of two (D is one: the launcher checks). No triton.next_power_of_2 in a jit body: SGLang
    # rebinds it to a plain function when imported (srt/utils/common.py), and Triton then refuses to launch.
    W: tl.constexpr = (4 if RATIO == 4 else 2) * D
    b = tl.program_id(0).to(tl.int64) // SPLIT
    chunk = tl.program_id(0) % SPLIT
    seq_len = tl.load(seq_lens_ptr + b * s_seq)
    page_a = tl.load(pages_ptr + b * s_pages).to(tl.int64)  # the ring's page ids, loaded beside seq_len
    page_b = tl.load(pages_ptr + b * s_pages + N_PAGES - 1).to(tl.int64)
    live = seq_len > 0
    pages_ok = _pages_inside(page_a, page_b, n_state_pages)
    emits = live & (seq_len % RATIO == 0)
    t = seq_len - 1
    n = t // RATIO  # the new token's block: the one an emitting step closes
    own_page = page_b if PREV_CUR else _ring_page(page_a, page_b, n, N_PAGES)
    if live & pages_ok & (chunk == 0):
        wc = tl.arange(0, W)
        row = tl.load(u_ptr + b * s_u + wc).to(tl.float32)
        tl.store(state_ptr + (own_page * RATIO + t % RATIO) * s_state + wc, row)
    if emits & pages_ok & (seq_len - RATIO < n_cos):
        prev_page = page_a if PREV_CUR else _ring_page(page_a, page_b, n - 1, N_PAGES)
        _emit_block(u_ptr, state_ptr, bias_ptr, normw_ptr, cos_ptr, sin_ptr, out_ptr, pooled_ptr, sumsq_ptr, count_ptr,
                    seq_len - RATIO, b, 1, own_page, prev_page,
                    b, b, chunk, eps, s_u, s_state, s_cos, s_cos_c, s_out,
                    cache_ptr, fp8_ptr, wide_ptr, loc_ptr, s_loc, page_bytes, page_size,
                    RATIO, D, LOG2_D, SPLIT, BK, ROTATE, STORE, PRESHUFFLE)
    elif chunk == 0:
        # Refused by a guard: a NaN row; into the cache only for a request that emits (loc names
        # no slot for the others).
        if live & (emits if STORE else (not pages_ok or emits)):
            _write_row(tl.full((D,), float("nan"), tl.float32), b, b, out_ptr, s_out, cache_ptr, fp8_ptr, wide_ptr, loc_ptr,
                       s_loc, page_bytes, page_size, D, STORE, PRESHUFFLE)
        elif STORE == 0:
            tl.store(out_ptr + b * s_out + tl.arange(0, D), tl.zeros((D,), out_ptr.dtype.element_ty))


@triton.jit
def _request_pages(pages_ptr, req, use, n_req, s_pages, N_PAGES: tl.constexpr):
    """A request's two ring page ids (the same one twice for a 1-page ring), -1 when ``use`` is
    false or ``req`` is not a row of ``state_pages``."""
    ok = use & (req >= 0) & (req < n_req)
    page_a = tl.load(pages_ptr + req * s_pages, mask=ok, other=-1).to(tl.int64)
    page_b = tl.load(pages_ptr + req * s_pages + N_PAGES - 1, mask=ok, other=-1).to(tl.int64)
    return page_a, page_b


@triton.jit
def _store_kept_row(u_ptr, state_ptr, pages_ptr, writes_ptr, i, n_state_pages, n_req, n_u, s_u, s_state, s_pages,
                    RATIO: tl.constexpr, N_PAGES: tl.constexpr, W: tl.constexpr):
    """Copy ragged row writes[i, 0] (fp32) to token writes[i, 2]'s slot in request writes[i, 1]'s
    ring; a negative ragged row is padding; a request any of whose ring pages is outside the state
    (or a row outside u) stores nothing, as in decode."""
    src = tl.load(writes_ptr + i * 3 + 0).to(tl.int64)
    req = tl.load(writes_ptr + i * 3 + 1).to(tl.int64)
    t = tl.load(writes_ptr + i * 3 + 2)
    page_a, page_b = _request_pages(pages_ptr, req, src >= 0, n_req, s_pages, N_PAGES)
    page = _ring_page(page_a, page_b, t // RATIO, N_PAGES)
    if (src >= 0) & (src < n_u) & (t >= 0) & _pages_inside(page_a, page_b, n_state_pages):
        wc = tl.arange(0, W)  # W: the row width, 2 or 4 times a power-of-two d (the launcher checks)
        row = tl.load(u_ptr + src * s_u + wc).to(tl.float32)
        tl.store(state_ptr + (page * RATIO + t % RATIO) * s_state + wc, row)


@triton.jit
def _dsv4_compress_prefill_kernel(
    u_ptr, state_ptr, pages_ptr, plan_ptr, writes_ptr, bias_ptr, normw_ptr, cos_ptr, sin_ptr, out_ptr,
    pooled_ptr, sumsq_ptr, count_ptr,
    n_compress_programs, eps, n_state_pages, n_cos, n_req, n_u, s_u, s_state, s_pages, s_cos, s_cos_c, s_out,
    RATIO: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr, SPLIT: tl.constexpr, N_PAGES: tl.constexpr,
    BK: tl.constexpr, ROTATE: tl.constexpr,
):
    """Programs (i, chunk) below ``n_compress_programs``: block plan[i] = (first token position,
    ragged row of its last token, rows that are new, request); a plan row with position < 0 is
    padding and gives 0. Programs from there on store the kept rows ``writes`` (the planner only
    puts them in this launch when none of them lands on a slot a block reads; otherwise
    ``_dsv4_state_write_kernel`` runs after)."""
    pid = tl.program_id(0)
    if pid < n_compress_programs:
        i = pid.to(tl.int64) // SPLIT
        chunk = pid % SPLIT
        pos = tl.load(plan_ptr + i * 4 + 0)
        last_u = tl.load(plan_ptr + i * 4 + 1)
        n_new = tl.load(plan_ptr + i * 4 + 2)
        req = tl.load(plan_ptr + i * 4 + 3).to(tl.int64)
        page_a, page_b = _request_pages(pages_ptr, req, pos >= 0, n_req, s_pages, N_PAGES)
        K: tl.constexpr = 8 if RATIO == 4 else RATIO
        rows_ok = (n_new >= 1) & (n_new <= K) & (last_u < n_u) & (last_u - n_new + 1 >= 0)
        if (pos >= 0) & _pages_inside(page_a, page_b, n_state_pages) & (pos < n_cos) & rows_ok:
            n = pos // RATIO
            _emit_block(u_ptr, state_ptr, bias_ptr, normw_ptr, cos_ptr, sin_ptr, out_ptr, pooled_ptr, sumsq_ptr, count_ptr,
                        pos, last_u, n_new,
                        _ring_page(page_a, page_b, n, N_PAGES), _ring_page(page_a, page_b, n - 1, N_PAGES),
                        i, i, chunk, eps, s_u, s_state, s_cos, s_cos_c, s_out,
                        out_ptr, out_ptr, out_ptr, plan_ptr, 0, 0, 1,  # no cache store (STORE 0)
                        RATIO, D, LOG2_D, SPLIT, BK, ROTATE, 0, 0)
        elif chunk == 0:
            if pos >= 0:  # refused by a guard
                _nan_row(out_ptr, i, s_out, D)
            else:
                tl.store(out_ptr + i * s_out + tl.arange(0, D), tl.zeros((D,), out_ptr.dtype.element_ty))
    else:
        _store_kept_row(u_ptr, state_ptr, pages_ptr, writes_ptr, (pid - n_compress_programs).to(tl.int64), n_state_pages,
                        n_req, n_u, s_u, s_state, s_pages, RATIO, N_PAGES, (4 if RATIO == 4 else 2) * D)


@triton.jit
def _dsv4_state_write_kernel(
    u_ptr, state_ptr, pages_ptr, writes_ptr, n_state_pages, n_req, n_u, s_u, s_state, s_pages,
    RATIO: tl.constexpr, N_PAGES: tl.constexpr, W: tl.constexpr,
):
    """Program i: store kept row writes[i] (after the compress launch, when the two may not overlap)."""
    _store_kept_row(u_ptr, state_ptr, pages_ptr, writes_ptr, tl.program_id(0).to(tl.int64), n_state_pages, n_req, n_u,
                    s_u, s_state, s_pages, RATIO, N_PAGES, W)


@triton.jit
def _dsv4_compress_prefill_paged_kernel(
    u_ptr, state_ptr, blocks_ptr, bias_ptr, normw_ptr, cos_ptr, sin_ptr, out_ptr, pooled_ptr, sumsq_ptr, count_ptr,
    eps, n_state_pages, n_cos, n_u, s_u, s_state, s_cos, s_cos_c, s_out,
    cache_ptr, fp8_ptr, wide_ptr, loc_ptr, s_loc, page_bytes, page_size,
    RATIO: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr, SPLIT: tl.constexpr,
    BK: tl.constexpr, ROTATE: tl.constexpr, STORE: tl.constexpr, PRESHUFFLE: tl.constexpr,
):
    """Programs (i, chunk): block row i, four int32 read in place from SGLang's ``CompressPlan``
    (16 bytes): seq_len after the block's last token (-1: a padding row, which touches nothing),
    that token's ragged row (low 16 bits) and the block's rows still in the state ring
    (``buffer_len``, high 16 bits), the state page of the previous block (ratio 4) and of the block
    itself. Row j of the K-row window is in the ring (page, slot ``position % RATIO``) when j <
    buffer_len, else ragged row ``ragged - (K - 1 - j)`` of ``u``. The result goes to out[i]
    (STORE 0) or to cache slot loc[ragged] (``_write_row``). Guards: a page that a ring row is read
    from outside the state, ragged rows outside ``u``, buffer_len >= K, a position past the RoPE
    table or a seq_len that closes no block: a NaN row (into the cache only where loc[ragged]
    exists). The state is not written: ``_dsv4_state_copy_kernel`` runs after (a kept row may land
    on a ring slot a block of the same chunk reads)."""
    K: tl.constexpr = 8 if RATIO == 4 else RATIO
    i = tl.program_id(0).to(tl.int64) // SPLIT
    chunk = tl.program_id(0) % SPLIT
    seq_len = tl.load(blocks_ptr + i * 4 + 0)
    packed = tl.load(blocks_ptr + i * 4 + 1)
    prev_page = tl.load(blocks_ptr + i * 4 + 2).to(tl.int64)
    own_page = tl.load(blocks_ptr + i * 4 + 3).to(tl.int64)
    ragged = (packed & 0xFFFF).to(tl.int64)
    buffer_len = (packed >> 16) & 0xFFFF
    pos = seq_len - RATIO  # the block's first token
    # The pages are read only where ring rows are (the planner leaves them unset without any).
    if RATIO == 4:
        needs_prev = (buffer_len > 0) & (pos >= 4)
        needs_own = buffer_len > 4
    else:
        needs_prev = buffer_len < 0  # never: one page
        needs_own = buffer_len > 0
    pages_ok = ((needs_prev == 0) | ((prev_page >= 0) & (prev_page < n_state_pages))) & (
        (needs_own == 0) | ((own_page >= 0) & (own_page < n_state_pages)))
    n_new = K - buffer_len
    rows_ok = (buffer_len < K) & (ragged < n_u) & (ragged - n_new + 1 >= 0)
    if seq_len != -1:
        if (pos >= 0) & (seq_len % RATIO == 0) & pages_ok & rows_ok & (pos < n_cos):
            _emit_block(u_ptr, state_ptr, bias_ptr, normw_ptr, cos_ptr, sin_ptr, out_ptr, pooled_ptr, sumsq_ptr, count_ptr,
                        pos, ragged, n_new, tl.where(needs_own, own_page, 0), tl.where(needs_prev, prev_page, 0),
                        i, ragged, chunk, eps, s_u, s_state, s_cos, s_cos_c, s_out,
                        cache_ptr, fp8_ptr, wide_ptr, loc_ptr, s_loc, page_bytes, page_size,
                        RATIO, D, LOG2_D, SPLIT, BK, ROTATE, STORE, PRESHUFFLE)
        elif (chunk == 0) & ((ragged < n_u) | (STORE == 0)):  # refused by a guard
            _write_row(tl.full((D,), float("nan"), tl.float32), i, ragged, out_ptr, s_out, cache_ptr, fp8_ptr, wide_ptr,
                       loc_ptr, s_loc, page_bytes, page_size, D, STORE, PRESHUFFLE)


@triton.jit
def _dsv4_state_copy_kernel(u_ptr, state_ptr, writes_ptr, n_u, n_state_rows, s_u, s_state, W: tl.constexpr):
    """Program i: ragged row writes[i, 0] of ``u`` into state row writes[i, 1] (two int32 read in
    place from SGLang's ``WritePlan``, 8 bytes; a ragged row of -1 is padding); a row outside ``u``
    or the state is not copied."""
    i = tl.program_id(0).to(tl.int64)
    src = tl.load(writes_ptr + i * 2 + 0).to(tl.int64)
    dst = tl.load(writes_ptr + i * 2 + 1).to(tl.int64)
    if (src >= 0) & (src < n_u) & (dst >= 0) & (dst < n_state_rows):
        wc = tl.arange(0, W)
        tl.store(state_ptr + dst * s_state + wc, tl.load(u_ptr + src * s_u + wc).to(tl.float32))

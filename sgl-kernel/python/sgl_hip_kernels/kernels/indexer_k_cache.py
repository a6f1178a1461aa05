"""Triton bodies: the indexer's FP8 K cache (layout and contract: ``indexer_k_cache_ref``) — the
writer, the gather, and the paged MQA logits reader, each for the row-major or the preshuffled
(MFMA 16x16) K layout (``PRESHUFFLE``).

The fp8 bytes are encoded with integer and exact float arithmetic (``e4m3fn_code``), not the
hardware or interpreter conversion: OCP e4m3 on any GPU, and the same bytes under the CPU
interpreter, whose fp32 -> fp8 cast rounds some values into the wrong binade.
"""

import triton
import triton.language as tl

from .splitk import dot


@triton.jit
def e4m3fn_code(x):
    """fp32 ``x`` with ``|x| <= 448`` -> its OCP e4m3 code (int32), round to nearest even."""
    a = tl.abs(x)
    binade = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: binade -6's step
    magic = ((binade + 20 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(binade + 20): its ulp is the e4m3 step
    r = (a + magic) - magic  # a rounded to a multiple of 2^(binade - 3), ties to even
    rbits = r.to(tl.int32, bitcast=True)
    normal = ((((rbits >> 23) & 0xFF) - 127 + 7) << 3) | ((rbits >> 20) & 7)
    code = tl.where(r >= 0.015625, normal, (r * 512.0).to(tl.int32))
    return code | (((x.to(tl.int32, bitcast=True) >> 31) & 1) << 7)


@triton.jit
def _k_offset(o, c, D: tl.constexpr, PRESHUFFLE: tl.constexpr):
    """Byte of (token offset o, column c) in a block's K region."""
    if PRESHUFFLE:
        off = (o // 16) * (16 * D) + (c // 16) * 256 + (o % 16) * 16 + (c % 16)
    else:
        off = o * D + c
    return off


@triton.jit
def _pow2_ceil(s):
    """The smallest power of two >= s (s > 0, normal), from the bits: exact."""
    bits = s.to(tl.int32, bitcast=True)
    up = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (up << 23).to(tl.float32, bitcast=True)


@triton.jit
def _paged(table_row, pos, live, block_size, num_blocks, table_width, block_stride):
    """Where sequence positions ``pos`` live: (readable, offset in the block, the block's byte base).
    A position whose block-table entry is missing, negative or past the cache is not readable."""
    entry = pos // block_size
    page = tl.load(table_row + entry, mask=live & (entry < table_width), other=-1).to(tl.int64)
    ok = live & (page >= 0) & (page < num_blocks)
    return ok, (pos % block_size).to(tl.int64), tl.where(ok, page, 0) * block_stride


@triton.jit
def _indexer_k_write_kernel(
    k_ptr, cache_ptr, slot_ptr, s_k, block_stride, block_size, capacity,
    D: tl.constexpr, Q: tl.constexpr, UE8M0: tl.constexpr, PRESHUFFLE: tl.constexpr,
):
    """One token per program: quantise per Q columns, store the fp8 bytes and the fp32 scales."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if (slot >= 0) & (slot < capacity):  # negative: skipped (aiter); past the cache: never written
        NG: tl.constexpr = D // Q
        x = tl.reshape(tl.load(k_ptr + t * s_k + tl.arange(0, D)).to(tl.float32), (NG, Q))
        scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-4) / 448.0
        if UE8M0:
            scale = _pow2_ceil(scale)
        code = e4m3fn_code(tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0))
        block = slot // block_size
        o = slot - block * block_size
        base = cache_ptr + block * block_stride
        c = tl.arange(0, D)
        tl.store(base + _k_offset(o, c, D, PRESHUFFLE), tl.reshape(code, (D,)).to(tl.uint8))
        scale_ptrs = (base + block_size * D + o * (4 * NG)).to(tl.pointer_type(tl.float32)) + tl.arange(0, NG)
        tl.store(scale_ptrs, scale)


@triton.jit
def _indexer_k_gather_kernel(
    cache_ptr, k_out_ptr, scale_out_ptr, table_ptr, cu_ptr,
    block_stride, block_size, num_blocks, s_table, table_width, s_ko, s_so,
    D: tl.constexpr, SB: tl.constexpr, BLOCK_T: tl.constexpr, PRESHUFFLE: tl.constexpr,
):
    """Program (sequence b, chunk): tokens cu[b] + chunk*BLOCK_T + [0, BLOCK_T) of that sequence. A
    token whose block-table entry is missing or outside the cache reads nothing and gets NaN bytes."""
    b = tl.program_id(0)
    first = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    i = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = (first + i).to(tl.int64)
    live = j < end
    ok, o, base = _paged(table_ptr + b * s_table, i, live, block_size, num_blocks, table_width, block_stride)
    c = tl.arange(0, D)
    codes = tl.load(cache_ptr + base[:, None] + _k_offset(o[:, None], c[None, :], D, PRESHUFFLE), mask=ok[:, None],
                    other=0x7F)
    tl.store(k_out_ptr + j[:, None] * s_ko + c[None, :], codes, mask=live[:, None])
    sb = tl.arange(0, SB)
    scale_bytes = tl.load(cache_ptr + (base + block_size * D + o * SB)[:, None] + sb[None, :], mask=ok[:, None], other=0xFF)
    tl.store(scale_out_ptr + j[:, None] * s_so + sb[None, :], scale_bytes, mask=live[:, None])


@triton.jit
def _paged_mqa_logits_kernel(
    q_ptr, cache_ptr, w_ptr, ctx_ptr, table_ptr, out_ptr,
    H, NEXT_N, max_model_len, block_stride, block_size, num_blocks, s_table, table_width,
    s_q_t, s_q_h, s_w_t, s_o_t,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRESHUFFLE: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (query row t, block of key positions): ``sum_h relu(<q[t,h], k[j]> sf[j]) w[t,h]`` for
    the positions the row's query may see, -inf for the others; a visible position whose block is
    missing from the table or outside the cache is never read and gets NaN."""
    t = tl.program_id(0).to(tl.int64)
    row = t // NEXT_N
    last = tl.load(ctx_ptr + row) - NEXT_N + (t % NEXT_N)
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    visible = pos <= last
    ok, o, base = _paged(table_ptr + row * s_table, pos, visible, block_size, num_blocks, table_width, block_stride)
    c = tl.arange(0, D)
    compute: tl.constexpr = tl.float32 if IEEE else tl.bfloat16
    keys = tl.load(cache_ptr + base[:, None] + _k_offset(o[:, None], c[None, :], D, PRESHUFFLE), mask=ok[:, None], other=0)
    keys = keys.to(tl.float8e4nv, bitcast=True).to(compute)
    sf = tl.load((cache_ptr + base + block_size * D + o * 4).to(tl.pointer_type(tl.float32)), mask=ok, other=0.0)
    heads = tl.arange(0, BLOCK_H)
    q = tl.load(q_ptr + t * s_q_t + heads[:, None] * s_q_h + c[None, :], mask=(heads < H)[:, None], other=0)
    q = q.to(tl.float8e4nv, bitcast=True).to(compute)
    w = tl.load(w_ptr + t * s_w_t + heads, mask=heads < H, other=0.0)
    dots = dot(q, tl.trans(keys), IEEE)  # (BLOCK_H, BLOCK_N)
    logits = tl.sum(tl.maximum(dots * sf[None, :], 0.0) * w[:, None], 0)
    logits = tl.where(ok, logits, tl.where(visible, float("nan"), float("-inf")))
    tl.store(out_ptr + t * s_o_t + pos, logits, mask=pos < max_model_len)

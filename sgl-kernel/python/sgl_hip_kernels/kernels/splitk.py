"""Triton pieces every split-K sparse decode here shares: the online-softmax step, writing a
program's result (final, or a split's partial), and the combine kernel.

Scores are kept in log2 units (``s * sm_scale * log2(e)``) so every exponential is an ``exp2``.
A split's partial is its normalised output ``o = acc / den`` (fp32), its running max ``m`` (-inf
when it saw nothing valid) and its denominator ``den``, kept apart rather than folded into an LSE
(a log2 / exp2 round trip would cost the fp32 result about twice torch's error). Combining splits
i: ``M = max m_i``, ``w_i = den_i 2^(m_i - M)``, ``out = sum w_i o_i / (sum w_i + 2^(sink2 - M))``,
``lse = (M + log2 sum w_i) ln 2``: the single-pass result, in any split order.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b``. IEEE (fp32 operands: the CPU interpreter): exact fp32 products and sums. Else the
    backend's default precision for the operands (bf16: their only one). Never ``"tf32"`` by name:
    Triton's gfx950 (MI355X) backend refuses it at compile time (gfx942 and NVIDIA accept it), which
    ``tests/test_compile_targets.py`` checks for every kernel here that a patch runs."""
    if IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def softmax_step(s, v, m, den, acc, IEEE: tl.constexpr):
    """One block of keys: ``s`` (BLOCK_H, BLOCK_N) log2-unit scores, -inf where invalid; ``v``
    (BLOCK_N, D) values. Returns the updated running max, denominator and accumulator."""
    m_new = tl.maximum(m, tl.max(s, 1))
    # While nothing is valid m_new is -inf: subtracting 0 keeps every 2^(s - m) at 0 (never the NaN
    # of -inf - -inf); the old state is all zero then, so alpha does not matter.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    den = den * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return m_new, den, acc


@triton.jit
def write_result(acc, m, den, sink2, o_ptrs, lse_ptrs, den_offset, mask_h, mask_o, FINAL: tl.constexpr,
                 HAS_LSE: tl.constexpr):
    """Store a program's result. FINAL: ``acc / (den + 2^(sink2 - m))`` (``sink2`` -inf: no sink) and
    the natural-log LSE, 0 and +inf for a row with nothing valid. Otherwise a split's partial:
    ``acc / den`` (0 when empty), ``m`` at ``lse_ptrs`` and ``den`` ``den_offset`` elements after."""
    empty = den == 0.0
    m_safe = tl.where(empty, 0.0, m)
    denom = den
    if FINAL:
        denom = den + tl.exp2(sink2 - m_safe)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, denom)[:, None])
    tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=mask_o)
    if HAS_LSE:
        if FINAL:
            tl.store(lse_ptrs, tl.where(empty, float("inf"), (m_safe + tl.log2(tl.where(empty, 1.0, den))) * LN2),
                     mask=mask_h)
        else:
            tl.store(lse_ptrs, tl.where(empty, float("-inf"), m), mask=mask_h)
            tl.store(lse_ptrs + den_offset, den, mask=mask_h)


@triton.jit
def _splitk_combine_kernel(
    part_o_ptr, part_m_ptr, sink_ptr, out_ptr, lse_ptr,
    H, S_Q,
    s_po_split, s_po_t, s_po_h,
    s_pm_split, s_pm_t, den_offset,
    s_o_b, s_o_s, s_o_h,
    s_l_b, s_l_h, s_l_s,
    SPLITS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_SINK: tl.constexpr,
    HAS_LSE: tl.constexpr,
):
    """One program per (query token, block of heads): merge the ``SPLITS`` partials (see the module
    docstring) into the final output and LSE; the sink joins only here."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = heads < H
    d = tl.arange(0, D)
    big_m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for i in range(0, SPLITS):
        m_i = tl.load(part_m_ptr + i * s_pm_split + t * s_pm_t + heads, mask=mask_h, other=float("-inf"))
        big_m = tl.maximum(big_m, m_i)
    empty = big_m == float("-inf")
    m_safe = tl.where(empty, 0.0, big_m)
    total = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D), tl.float32)
    for i in range(0, SPLITS):
        stats = part_m_ptr + i * s_pm_split + t * s_pm_t + heads
        m_i = tl.load(stats, mask=mask_h, other=float("-inf"))
        w = tl.load(stats + den_offset, mask=mask_h & (m_i > float("-inf")), other=0.0) * tl.exp2(m_i - m_safe)
        o = tl.load(part_o_ptr + i * s_po_split + t * s_po_t + heads[:, None] * s_po_h + d[None, :],
                    mask=(mask_h & (w > 0))[:, None], other=0.0)
        total += w
        acc += w[:, None] * o
    denom = total
    if HAS_SINK:
        sink2 = tl.load(sink_ptr + heads, mask=mask_h, other=0.0) * LOG2E
        denom += tl.exp2(sink2 - m_safe)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, denom)[:, None])
    b = t // S_Q
    s = t % S_Q
    o_ptrs = out_ptr + b * s_o_b + s * s_o_s + heads[:, None] * s_o_h + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None])
    if HAS_LSE:
        lse = tl.where(empty, float("inf"), (m_safe + tl.log2(tl.where(empty, 1.0, total))) * LN2)
        tl.store(lse_ptr + b * s_l_b + heads * s_l_h + s * s_l_s, lse, mask=mask_h)

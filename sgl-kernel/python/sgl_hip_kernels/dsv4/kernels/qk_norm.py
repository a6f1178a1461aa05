"""Triton body: fused QK RMSNorm (DeepSeek-V4 attention): every q head without a weight, every k
head with ``k_weight``, in one launch over all T*(HQ+HK) rows, fp32 math, stored in the output dtype."""

import triton
import triton.language as tl


@triton.jit
def _fused_qk_rmsnorm_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr,
    n_rows, eps,
    s_q_t, s_q_h, s_k_t, s_k_h, s_qo_t, s_qo_h, s_ko_t, s_ko_h,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program: 2 for large launches (fewer, fuller programs), else 1
    HAS_Q_WEIGHT: tl.constexpr,  # constexpr: DSV4's q norm has no weight, so no load is emitted
):
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    kw = tl.load(kw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_Q_WEIGHT:
        qw = tl.load(qw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for i in tl.static_range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + i
        if row < n_rows:
            t = row // (HQ + HK)
            h = row % (HQ + HK)
            if h < HQ:
                x = tl.load(q_ptr + t * s_q_t + h * s_q_h + cols, mask=col_ok, other=0.0).to(tl.float32)
                y = x * tl.math.rsqrt(tl.sum(x * x, 0) / D + eps)
                if HAS_Q_WEIGHT:
                    y = y * qw
                tl.store(qo_ptr + t * s_qo_t + h * s_qo_h + cols, y.to(qo_ptr.dtype.element_ty), mask=col_ok)
            else:
                hk = h - HQ
                x = tl.load(k_ptr + t * s_k_t + hk * s_k_h + cols, mask=col_ok, other=0.0).to(tl.float32)
                y = x * tl.math.rsqrt(tl.sum(x * x, 0) / D + eps) * kw
                tl.store(ko_ptr + t * s_ko_t + hk * s_ko_h + cols, y.to(ko_ptr.dtype.element_ty), mask=col_ok)

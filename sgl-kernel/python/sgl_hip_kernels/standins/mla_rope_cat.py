"""Portable ``fused_qk_rope_cat_and_cache_mla``: aiter's contract, in Triton, for NVIDIA and the CPU.

See ``ref.fused_qk_rope_cat_and_cache_mla_ref`` for the contract (shapes, rounding, the fifth
output); this launcher validates its inputs like aiter's, allocates or accepts the outputs, and
launches ``kernels.mla_rope_cat._mla_rope_cat_cache_kernel``.
"""

from __future__ import annotations

import torch
import triton

from .kernels.mla_rope_cat import _mla_rope_cat_cache_kernel


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"fused_qk_rope_cat_and_cache_mla: {message}")


def fused_qk_rope_cat_and_cache_mla(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_scale,
    is_neox: bool,
    num_decode_toks_for_zeros: int = 0,
    apply_scale: bool = True,
    q_out: torch.Tensor | None = None,
    decode_q_pe_out: torch.Tensor | None = None,
    k_pe_out: torch.Tensor | None = None,
    q_out_dtype=None,
):
    """RoPE q_pe/k_pe, return ``q_out = [q_nope | rope(q_pe)]``, write ``[k_nope | rope(k_pe)] / k_scale``
    into ``kv_cache`` at ``slot_mapping`` (negative slots skipped). Returns
    ``(q_out, decode_q_pe_out, k_pe_out, kv_cache[, q_nope_zeros])`` exactly as aiter does."""
    _check(all(t.dim() == 3 for t in (q_nope, q_pe, k_nope, k_pe, kv_cache)), "q/k/kv_cache must be 3-D (tokens, heads, dim)")
    b, qh, d_nope = q_nope.shape
    bk, kh, dk_nope = k_nope.shape
    d_pe = q_pe.shape[-1]
    _check(q_pe.shape[:2] == (b, qh), f"q_pe {tuple(q_pe.shape)} does not match q_nope {tuple(q_nope.shape)}")
    _check(k_pe.shape == (bk, kh, d_pe), f"k_pe {tuple(k_pe.shape)}, expected {(bk, kh, d_pe)}")
    _check(slot_mapping.dim() == 1, "slot_mapping must be 1-D")
    b_slot = slot_mapping.shape[0]
    _check(b_slot <= bk and b <= bk, f"slot_mapping ({b_slot}) and q ({b}) may not exceed the k tokens ({bk})")
    _check(kv_cache.shape[1] == kh and kv_cache.shape[2] == dk_nope + d_pe,
           f"kv_cache {tuple(kv_cache.shape)} != (slots, {kh}, {dk_nope + d_pe})")
    _check(dk_nope == d_nope, "this kernel needs k_nope and q_nope of one width")
    _check(qh % kh == 0, f"q heads ({qh}) must be a multiple of k heads ({kh})")
    _check(d_pe % 2 == 0 and triton.next_power_of_2(d_pe) == d_pe and triton.next_power_of_2(d_nope) == d_nope,
           f"dims must be powers of two (nope {d_nope}, rope {d_pe})")
    d_freq = cos.shape[-1]
    _check(d_freq in (d_pe, d_pe // 2), f"cos/sin last dim {d_freq} must be {d_pe} or {d_pe // 2}")
    _check(cos.shape == sin.shape and cos.stride() == sin.stride(), "cos and sin must have one shape and stride")
    _check(pos.shape[0] >= b, f"pos has {pos.shape[0]} entries for {b} q tokens")
    have_scale = k_scale is not None and apply_scale
    if isinstance(k_scale, torch.Tensor):
        _check(k_scale.numel() == 1, "k_scale must hold a single value")
    elif have_scale:
        k_scale = torch.tensor([float(k_scale)], dtype=torch.float32, device=k_nope.device)
    # cos/sin as (positions, d_freq) views: the kernel needs only the position and dim strides.
    cos2 = cos.reshape(cos.shape[0], -1) if cos.dim() != 2 else cos
    sin2 = sin.reshape(sin.shape[0], -1) if sin.dim() != 2 else sin
    _check(cos2.shape[1] == d_freq, "cos/sin must be (max_pos, ..., d) with singleton middle dims")

    if q_out is None:
        q_out = torch.empty((b, qh, d_nope + d_pe), dtype=q_out_dtype or q_nope.dtype, device=q_nope.device)
    _check(q_out.shape == (b, qh, d_nope + d_pe), f"q_out {tuple(q_out.shape)} mismatch")
    n_zero = int(num_decode_toks_for_zeros)
    if decode_q_pe_out is None:
        decode_q_pe_out = torch.empty((n_zero, qh, d_pe), dtype=q_nope.dtype, device=q_nope.device)
    _check(decode_q_pe_out.shape == (n_zero, qh, d_pe), "decode_q_pe_out shape mismatch")
    if k_pe_out is None:
        k_pe_out = torch.empty((bk, kh, d_pe), dtype=k_pe.dtype, device=k_pe.device)
    _check(k_pe_out.shape == (bk, kh, d_pe), "k_pe_out shape mismatch, expected (bk, kh, d_pe)")

    grid = (b * qh + (b_slot - b) * kh,)
    if grid[0] > 0:
        dq = decode_q_pe_out if n_zero else q_out  # any valid pointer when nothing is stored there
        _mla_rope_cat_cache_kernel[grid](
            q_nope, q_pe, k_nope, k_pe, pos, cos2, sin2,
            q_out, dq, k_pe_out, kv_cache, slot_mapping, k_scale if have_scale else slot_mapping,
            b, b_slot, n_zero,
            *q_nope.stride(), *q_pe.stride(), *k_nope.stride(), *k_pe.stride(),
            pos.stride(0), cos2.stride(0), cos2.stride(1),
            *q_out.stride(), *dq.stride(), *k_pe_out.stride(), *kv_cache.stride(),
            QH=qh, KH=kh, D_NOPE=d_nope, D_PE=d_pe,
            HALF_FREQS=d_freq == d_pe // 2, IS_NEOX=bool(is_neox), HAVE_K_SCALE=have_scale,
            num_warps=1,
        )
    if n_zero:
        zeros = torch.zeros((n_zero, qh, dk_nope), dtype=q_nope.dtype, device=q_nope.device)
        return q_out, decode_q_pe_out, k_pe_out, kv_cache, zeros
    return q_out, decode_q_pe_out, k_pe_out, kv_cache

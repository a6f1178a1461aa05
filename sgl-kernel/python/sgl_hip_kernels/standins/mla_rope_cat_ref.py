"""fp32 reference of aiter's ``fused_qk_rope_cat_and_cache_mla`` over the real MLA KV-cache layout; the
CPU provider of that kernel (so it honours the same arguments and return values)."""

from __future__ import annotations

import torch

from ..rotations_ref import rope_ref


def fused_qk_rope_cat_and_cache_mla_ref(
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
    """Reference for aiter's ``fused_qk_rope_cat_and_cache_mla`` (decode form).

    Shapes: ``q_nope`` (B, QH, Dn), ``q_pe`` (B, QH, Dr), ``k_nope`` (Bk, KH, Dn), ``k_pe`` (Bk, KH, Dr),
    ``kv_cache`` (slots, KH, Dn + Dr), ``slot_mapping`` (Bs,) with Bs <= Bk and B <= Bk, ``pos`` (B,),
    ``cos``/``sin`` indexed ``[pos, i]`` with last dim Dr/2 (one value per pair) or Dr; any strides.

    * ``q_out[b, h] = cast(q_dtype, [q_nope[b, h] | rope(q_pe[b, h])])``, q is *not* scaled;
      q_dtype = ``q_out_dtype`` or q_nope's dtype.
    * for ``slot = slot_mapping[b] >= 0`` (b < Bs): ``kv_cache[slot, h_k] = cast(cache dtype,
      [k_nope | rope(k_pe)] * (1 / k_scale))``, and ``k_pe_out[b, h_k] = rope(k_pe)`` in k_pe's dtype;
      decode rows (b < B) rotate k_pe, the extra prefill rows (B <= b < Bs) store k_pe as given.
      Negative slots are skipped (cache and k_pe_out rows left as they were).
    * ``decode_q_pe_out[:num_decode_toks_for_zeros] = rope(q_pe)``; with ``num_decode_toks_for_zeros
      > 0`` a fifth output of zeros (n, QH, Dn) is returned.
    * RoPE is computed in fp32 with one rounding to the output dtype; the cache scale multiplies by
      the fp32 reciprocal of ``k_scale`` (as aiter does), ``apply_scale=False`` or ``k_scale=None``
      means 1.

    Returns ``(q_out, decode_q_pe_out, k_pe_out, kv_cache[, q_nope_zeros])``.
    """
    b, qh, d_nope = q_nope.shape
    bk, kh, dk_nope = k_nope.shape
    d_pe = q_pe.shape[-1]
    (b_slot,) = slot_mapping.shape
    if q_out is None:
        q_out = torch.empty((b, qh, d_nope + d_pe), dtype=q_out_dtype or q_nope.dtype, device=q_nope.device)
    if decode_q_pe_out is None:
        decode_q_pe_out = torch.empty((num_decode_toks_for_zeros, qh, d_pe), dtype=q_nope.dtype, device=q_nope.device)
    if k_pe_out is None:
        k_pe_out = torch.empty((bk, kh, d_pe), dtype=k_pe.dtype, device=k_pe.device)

    positions = pos.long()
    c, s = cos.reshape(cos.shape[0], -1)[positions], sin.reshape(sin.shape[0], -1)[positions]  # (B, d)
    q_rot = rope_ref(q_pe, c[:, None, :], s[:, None, :], is_neox)
    q_out[..., :d_nope] = q_nope.to(q_out.dtype)
    q_out[..., d_nope:] = q_rot.to(q_out.dtype)
    n_zero = num_decode_toks_for_zeros
    if n_zero:
        decode_q_pe_out[:n_zero] = q_rot[:n_zero].to(decode_q_pe_out.dtype)

    if k_scale is None or not apply_scale:
        rcp = torch.ones((), dtype=torch.float32, device=k_nope.device)
    else:
        rcp = 1.0 / torch.as_tensor(k_scale, device=k_nope.device).reshape(()).float()
    slots = slot_mapping.long()
    rows = torch.arange(b_slot, device=slots.device)
    keep = slots >= 0
    rows, slots = rows[keep], slots[keep]
    if rows.numel():
        k_rope = k_pe[rows].float()
        decode = rows < b
        if decode.any():
            k_rope[decode] = rope_ref(k_pe[rows[decode]], c[rows[decode]][:, None, :], s[rows[decode]][:, None, :], is_neox)
        k_pe_out[rows] = k_rope.to(k_pe_out.dtype)
        entry = torch.cat([k_nope[rows].float() * rcp, k_rope * rcp], -1)
        kv_cache[slots] = entry.to(kv_cache.dtype)
    if n_zero:
        zeros = torch.zeros((n_zero, qh, dk_nope), dtype=q_nope.dtype, device=q_nope.device)
        return q_out, decode_q_pe_out, k_pe_out, kv_cache, zeros
    return q_out, decode_q_pe_out, k_pe_out, kv_cache

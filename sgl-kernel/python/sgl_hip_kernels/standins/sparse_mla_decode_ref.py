"""fp32 reference of the NSA sparse MLA decode (TileLang ``tilelang_sparse_fwd``, and the attention
``_forward_aiter`` computes over the same top-k slots); the CPU provider of that kernel."""

from __future__ import annotations

import torch


def sparse_mla_decode_ref(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512
) -> torch.Tensor:
    """Reference for the NSA sparse MLA decode kernel (TileLang ``tilelang_sparse_fwd`` contract).

    ``q`` (N, H, D) with D = d_v + rope (576), bf16/fp8/fp32; ``kv`` (slots, 1, D) same family;
    ``indices`` (N, 1, topk) int32 token slots, -1 = none. For each (n, h), over the valid j:
    ``o = sum_j softmax_j(sm_scale * <q[n,h], kv[idx_j]>) * kv[idx_j, :d_v]`` in fp32; a row with no
    valid index gives 0. Output (N, H, d_v) in bf16 (q's dtype when q is fp32/fp64). fp8 inputs are read as
    their values (no scale, as the TileLang fp8 kernel assumes k_scale = 1).
    """
    n, h, d = q.shape
    out_dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.bfloat16
    idx = indices.reshape(n, indices.shape[-1]).long()
    valid = idx >= 0
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = kv.reshape(kv.shape[0], d)[idx.clamp_min(0)].to(work)  # (N, topk, D)
    rows = torch.where(valid[..., None], rows, torch.zeros((), dtype=work, device=rows.device))
    scores = torch.einsum("nhd,nkd->nhk", q.to(work), rows) * sm_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    # A row with no valid index: softmax of all -inf is NaN; the contract says 0 (NaN from the data
    # itself must still show, so only those rows are zeroed).
    weights = torch.where(valid.any(-1)[:, None, None], weights, torch.zeros((), device=weights.device))
    out = torch.einsum("nhk,nkd->nhd", weights, rows[..., :d_v])
    return out.to(out_dtype)

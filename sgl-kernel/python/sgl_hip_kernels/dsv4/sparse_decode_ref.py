"""Reference of DeepSeek-V4 sparse decode attention (FlashMLA's sparse FP8 decode, ``tests/ref.py``
semantics), over the real cache bytes read by :func:`kv_cache.dequantize_kv`, in fp64 (or fp32).

For query token (b, s) and head h, over the valid positions j of the main scope's indices (and, when
given, the extra scope's, in the same softmax):

* a position is valid when its index is >= 0 and it comes before ``topk_length[b]`` (when given);
* ``s_j = sm_scale * <q, k_j>``, ``m = max_j s_j``, ``den = sum_j exp(s_j - m)``, ``lse = m + ln den``;
* ``out = sum_j exp(s_j - m) k_j / (den + exp(attn_sink[h] - m))`` (``/ den`` without a sink): V = K, all
  512 values (the RoPE part included); the LSE does not include the sink;
* a row with nothing valid: ``out = 0`` and ``lse = +inf``.

Shapes: q (b, s_q, h_q, 512); indices (b, s_q, topk); out (b, s_q, h_q, 512); lse (b, h_q, s_q).
With ``work=torch.bfloat16`` it is torch computing the same in the kernel's input precision (bf16
matmuls and softmax): the tests' "torch's own error" and the benchmark's torch arm.
"""

from __future__ import annotations

import torch

from .kv_cache import gather_tokens


def _scope_rows(cache, indices, block_size, topk_length, work):
    """The gathered K rows (b, s_q, topk, 512) in ``work`` and their validity (b, s_q, topk)."""
    idx = indices.long()
    valid = idx >= 0
    if topk_length is not None:
        valid &= torch.arange(idx.shape[-1], device=idx.device) < topk_length.long()[:, None, None]
    # Invalid positions read token 0 and are zeroed: what they name is never used (NaN there must not leak).
    rows = gather_tokens(cache, block_size, torch.where(valid, idx, 0)).to(work)
    rows = torch.where(valid[..., None], rows, torch.zeros((), dtype=work, device=rows.device))
    return rows, valid


def sparse_decode_ref(q, k_cache, indices, block_size, sm_scale, *, topk_length=None, attn_sink=None,
                      extra_k_cache=None, extra_indices=None, extra_block_size=None, extra_topk_length=None,
                      work=torch.float64):
    """-> (out, lse) in ``work`` precision (see the module docstring for the contract)."""
    rows, valid = _scope_rows(k_cache, indices, block_size, topk_length, work)
    if extra_k_cache is not None:
        x_rows, x_valid = _scope_rows(extra_k_cache, extra_indices, extra_block_size, extra_topk_length, work)
        rows, valid = torch.cat([rows, x_rows], 2), torch.cat([valid, x_valid], 2)
    scores = torch.einsum("bshd,bskd->bshk", q.to(work), rows) * sm_scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lonely = ~valid.any(-1)[:, :, None]  # (b, s_q, 1)
    m = scores.amax(-1, keepdim=True)
    m = torch.where(lonely[..., None], torch.zeros((), dtype=work, device=m.device), m)
    p = torch.exp(scores - m)
    den = p.sum(-1, keepdim=True)
    denom = den if attn_sink is None else den + torch.exp(attn_sink.to(work)[None, None, :, None] - m)
    out = torch.einsum("bshk,bskd->bshd", p, rows) / torch.where(lonely[..., None], torch.ones_like(denom), denom)
    lse = torch.where(lonely, torch.full((), float("inf"), dtype=work, device=m.device), (m + torch.log(den))[..., 0])
    return out, lse.transpose(1, 2)

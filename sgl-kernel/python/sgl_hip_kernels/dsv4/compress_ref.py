"""fp32 references for the DeepSeek-V4 KV compressor, the contract the fused kernels
must meet. Layouts this project's kernels read (stated because upstream's fused kernel read the
checkpoint ape layout and was unusable for the overlap case):

* raw row per token ``u_t`` (width ``2*c*d``; ``c = 2`` for ratio 4, else 1):
  ratio 4 ``[kv_A | kv_B | s_A | s_B]`` (A: the overlap half, consumed by the *next* block),
  ratio 128 ``[kv | s]``;
* ``bias`` (K, d), K = 8 for ratio 4 (the hot-fixed ape: rows 0..3 = ``ape[:, :d]``, rows 4..7 =
  ``ape[:, d:]`` of the checkpoint's (4, 2d)), K = 128 for ratio 128 (``ape`` itself);
* ``cos``/``sin`` (max_pos, 32): GPT-J interleaved RoPE on the last 64 channels at the block's first
  token position ``r * n``.

Block n of a sequence covers tokens ``[r*n, r*n + r - 1]`` and is emitted with the token ``r*n + r - 1``.
Rows: ratio 128, j = 0..127 -> token 128n + j: ``kv = u[0:d]``, ``s = u[d:2d] + bias[j]``; ratio 4,
j = 0..3 -> token 4n - 4 + j (previous block): ``kv = u[0:d]``, ``s = u[2d:3d] + bias[j]``; j = 4..7 ->
token 4n + j - 4: ``kv = u[d:2d]``, ``s = u[3d:4d] + bias[j]``; for n = 0 rows 0..3 are invalid.
Pooling is a per-channel softmax over the valid rows (an invalid row, or a score of -inf, weighs 0;
a channel with no weight at all pools to 0, never NaN), then RMSNorm (weight, eps), RoPE, and for the
indexer (d = 128, ``rotate``) a Walsh-Hadamard transform with scale d^-1/2.
"""

from __future__ import annotations

import torch

from ..rotations_ref import hadamard_ref, rope_ref


def pool_block_ref(kv, score, valid, bias, norm_w, eps, cos, sin, rotate=False):
    """One compressed vector. ``kv``/``score`` (K, d), ``valid`` (K,) bool, ``bias`` (K, d), ``norm_w``
    (d,), ``cos``/``sin`` (32,): fp32 (fp64 inputs stay fp64, for tests). Returns (d,)."""
    work = torch.float64 if kv.dtype == torch.float64 else torch.float32
    kv, s = kv.to(work), score.to(work) + bias.to(work)
    weight_ok = valid[:, None] & (s > float("-inf"))
    s = torch.where(weight_ok, s, torch.full_like(s, float("-inf")))
    m = s.amax(0)
    e = torch.where(weight_ok, torch.exp(s - torch.where(m > float("-inf"), m, torch.zeros_like(m))), torch.zeros_like(s))
    den = e.sum(0)
    num = (e * torch.where(weight_ok, kv, torch.zeros_like(kv))).sum(0)
    pooled = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    y = pooled * torch.rsqrt(pooled.pow(2).mean() + eps) * norm_w.to(work)
    y = torch.cat([y[:-64], rope_ref(y[-64:], cos, sin, is_neox=False)])
    return hadamard_ref(y) if rotate else y


def block_rows_ref(u_of_token, n: int, ratio: int, d: int):
    """``(kv (K, d), score (K, d), valid (K,))`` of block n; ``u_of_token(t)`` returns the raw row of
    token t of the sequence."""
    if ratio == 4:
        kv, score, valid = [], [], []
        for j in range(8):
            t = 4 * n - 4 + j if j < 4 else 4 * n + j - 4
            ok = t >= 0 and (j >= 4 or n > 0)
            u = u_of_token(max(t, 0))
            if j < 4:
                kv.append(u[0:d]), score.append(u[2 * d:3 * d])
            else:
                kv.append(u[d:2 * d]), score.append(u[3 * d:4 * d])
            valid.append(ok)
        return torch.stack(kv), torch.stack(score), torch.tensor(valid)
    rows = [u_of_token(ratio * n + j) for j in range(ratio)]
    u = torch.stack(rows)
    return u[:, :d], u[:, d:2 * d], torch.ones(ratio, dtype=torch.bool)


def compress_sequence_ref(u, ratio, d, bias, norm_w, eps, cos_table, sin_table, rotate=False):
    """Every full block of one sequence's raw rows ``u`` (T, width): (T // ratio, d)."""
    out = []
    for n in range(u.shape[0] // ratio):
        kv, score, valid = block_rows_ref(lambda t: u[t], n, ratio, d)
        out.append(pool_block_ref(kv, score, valid, bias, norm_w, eps, cos_table[ratio * n], sin_table[ratio * n], rotate))
    return torch.stack(out) if out else u.new_zeros((0, d), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The same contract written as the unfused torch sequence over a whole batch (state write, row
# gather, bias, masked softmax, weighted sum, RMSNorm, RoPE, rotation): the baseline the benchmark
# times the fused kernel against, checked against the per-block reference above in the tests.


def _pool_rows_torch(rows, valid, pos, ratio, bias, norm_w, eps, cos, sin, rotation):
    """Gathered raw rows (N, K, W) and their validity (N, K) -> (N, d), block first positions ``pos``."""
    d = bias.shape[1]
    if ratio == 4:
        kv = torch.cat([rows[:, :4, :d], rows[:, 4:, d:2 * d]], 1)
        score = torch.cat([rows[:, :4, 2 * d:3 * d], rows[:, 4:, 3 * d:]], 1)
    else:
        kv, score = rows[..., :d], rows[..., d:]
    score = (score + bias).masked_fill(~valid[..., None], float("-inf"))
    pooled = (torch.softmax(score, 1).nan_to_num(0.0) * kv).sum(1)
    y = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + eps) * norm_w
    pairs = y[:, -64:].unflatten(-1, (32, 2))
    c, s = cos[pos], sin[pos]
    rope = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 1] * c + pairs[..., 0] * s], -1)
    y = torch.cat([y[:, :-64], rope.flatten(-2)], -1)
    if rotation is None:
        return y
    return y @ rotation if isinstance(rotation, torch.Tensor) else hadamard_ref(y)


def compress_decode_torch(u, state, state_pages, seq_lens, bias, norm_w, eps, cos, sin, ratio, rotation=None):
    """``compress_decode``'s contract in torch ops: stores each request's row (token ``seq_len - 1``)
    in its ring and returns (B, d), block ``seq_len // ratio - 1`` where ``seq_len % ratio == 0``, else
    0. ``rotation``: None, ``True`` (the Walsh-Hadamard transform) or a (d, d) matrix applying it.
    Every request must have ``seq_len >= 1`` (no padded slots)."""
    k = bias.shape[0]
    n_pages = state_pages.shape[1]
    seq_lens, pages = seq_lens.long(), state_pages.long()
    t = seq_lens - 1
    state.index_copy_(0, pages.gather(1, ((t // ratio) % n_pages)[:, None])[:, 0] * ratio + t % ratio, u.to(state.dtype))
    emit = (seq_lens > 0) & (seq_lens % ratio == 0)
    pos = (seq_lens - ratio).clamp(min=0)
    q = pos[:, None] - (4 if ratio == 4 else 0) + torch.arange(k, device=state.device)
    qs = q.clamp(min=0)
    rows = state[pages.gather(1, (qs // ratio) % n_pages) * ratio + qs % ratio]
    y = _pool_rows_torch(rows, (q >= 0) & emit[:, None], pos, ratio, bias, norm_w, eps, cos, sin, rotation)
    return torch.where(emit[:, None], y, torch.zeros_like(y))


def compress_prefill_torch(u, ratio, bias, norm_w, eps, cos, sin, rotation=None):
    """Every full block of one request's raw rows ``u`` (T, W) with no prefix, in torch ops: (T // ratio, d)."""
    k = bias.shape[0]
    pos = torch.arange(u.shape[0] // ratio, device=u.device) * ratio
    q = pos[:, None] - (4 if ratio == 4 else 0) + torch.arange(k, device=u.device)
    return _pool_rows_torch(u[q.clamp(min=0)], q >= 0, pos, ratio, bias, norm_w, eps, cos, sin, rotation)

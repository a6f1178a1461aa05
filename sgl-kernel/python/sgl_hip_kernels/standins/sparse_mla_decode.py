"""Portable NSA sparse MLA decode with TileLang's ``tilelang_sparse_fwd`` contract (see
``sparse_mla_decode_ref``): ``q`` (N, H, d_v + rope), ``kv`` (slots, 1, d_v + rope), ``indices``
(N, 1, topk) int32 with -1 for none; output (N, H, d_v), bf16 (fp32 for fp32 inputs). fp8 inputs
are read as their values (k_scale = 1, as TileLang's fp8 kernel assumes).

Launch: one program per (block of heads, token, split of the top-k list) by ``launch_rule``, and
the split-K combine the DeepSeek-V4 decode uses when there is more than one split."""

from __future__ import annotations

import torch
import triton

from .. import splitk
from .kernels.sparse_mla_decode import _sparse_mla_decode_kernel

_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2") if hasattr(torch, n))


def launch_rule(tokens: int, heads: int, topk: int, device, splits: int | None = None) -> splitk.SplitPlan:
    """The fixed launch of one call (``splits`` forces the split count), the top-k split so the grid
    covers the GPU (``splitk.plan``). On a GPU, from the H200 sweep (``bench_dsv4_sparse_decode.py
    --sweep --only nsa``, top-k 2048): more than 16 heads, 32 heads x 64 keys, 8 warps (h64 b64:
    212 us against 307 for 16 x 32, bf16; 228 against 331, fp8); up to 16 heads (tl.dot needs 16
    rows; fewer are masked), 16 x 64 with 8 warps at up to 4 tokens (h8 b1: 21.7 us against 26.5)
    and 16 x 32 with 4 warps above (h8 b64: 86.8 against 134.3); only b1 and b64 were swept, the
    switch at 4 tokens is not measured. On the CPU (interpreter) and on ROCm (not swept there): the
    earlier rule, 16 or 32 heads x 32 keys, 8 warps."""
    if torch.device(device).type != "cuda" or torch.version.hip:
        block_h, block_n, warps = (16 if heads <= 16 else 32), 32, 8
    elif heads > 16:
        block_h, block_n, warps = 32, 64, 8
    else:
        block_h, block_n, warps = (16, 64, 8) if tokens <= 4 else (16, 32, 4)
    return splitk.plan(tokens, heads, topk, device, block_h, block_n, warps, 2, splits=splits)


def sparse_mla_decode(q, kv, indices, sm_scale: float, d_v: int = 512, out: torch.Tensor | None = None,
                      splits: int | None = None, rule: splitk.SplitPlan | None = None):
    """-> out; see the module docstring. ``splits`` forces the split count (tests); ``rule`` replaces
    the launch rule (the benchmark's sweep)."""
    if q.dim() != 3 or kv.dim() != 3 or indices.dim() != 3:
        raise ValueError(f"sparse_mla_decode: q {tuple(q.shape)}, kv {tuple(kv.shape)}, indices {tuple(indices.shape)} "
                         "must be 3-D")
    n, h, d = q.shape
    if kv.shape[1] != 1 or kv.shape[2] != d:
        raise ValueError(f"sparse_mla_decode: kv {tuple(kv.shape)} must be (slots, 1, {d})")
    if indices.shape[0] != n or indices.shape[1] != 1:
        raise ValueError(f"sparse_mla_decode: indices {tuple(indices.shape)} must be ({n}, 1, topk)")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sparse_mla_decode: indices must be int32/int64, not {indices.dtype}")
    d_rope = d - d_v
    if triton.next_power_of_2(d_v) != d_v or triton.next_power_of_2(d_rope) != d_rope:
        raise ValueError(f"sparse_mla_decode: d_v ({d_v}) and rope ({d_rope}) must be powers of two")
    supported = (torch.float32, torch.bfloat16, torch.float16) + _FLOAT8
    if q.dtype not in supported or kv.dtype not in supported:
        raise ValueError(f"sparse_mla_decode: dtypes q {q.dtype} / kv {kv.dtype} not supported")
    ieee = q.dtype == torch.float32 and kv.dtype == torch.float32
    out_dtype = torch.float32 if ieee else torch.bfloat16
    if out is None:
        out = torch.empty((n, h, d_v), dtype=out_dtype, device=q.device)
    elif out.shape != (n, h, d_v) or out.dtype != out_dtype or out.stride(2) != 1:
        raise ValueError(f"sparse_mla_decode: out must be ({n}, {h}, {d_v}) {out_dtype} with a contiguous last dim")
    topk = indices.shape[-1]
    kv2 = kv[:, 0, :]
    if n == 0 or h == 0:
        return out
    p = rule if rule is not None else launch_rule(n, h, topk, q.device, splits)
    final = p.splits == 1
    if final:
        o_buf, l_buf = out, out  # no lse is written
        o_strides, l_strides, den_off = (0, *out.stride()), (0, 0), 0
    else:
        o_buf, stats = splitk.partials(p, n, h, d_v, q.device)
        l_buf, den_off = stats[0], splitk.den_offset(stats)
        o_strides, l_strides = o_buf.stride(), l_buf.stride()[:2]
    grid = (triton.cdiv(h, p.block_h) * n, p.splits)  # (token, head block) flattened on x: no 65535 cap
    _sparse_mla_decode_kernel[grid](
        q, kv2, indices, o_buf, l_buf, float(sm_scale), h, topk,
        *q.stride(), *kv2.stride(), indices.stride(0), indices.stride(2), *o_strides, *l_strides, den_off,
        D_V=d_v, D_ROPE=d_rope, BLOCK_H=p.block_h, BLOCK_N=p.block_n, KEYS_PER_SPLIT=p.keys_per_split, FINAL=final,
        IEEE=ieee, num_warps=p.num_warps, num_stages=p.num_stages,
    )
    if not final:
        splitk.combine(o_buf, stats, out, (out.stride(0), 0, out.stride(1)), 1)
    return out

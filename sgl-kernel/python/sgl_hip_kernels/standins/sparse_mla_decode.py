"""Portable NSA sparse MLA decode with TileLang's ``tilelang_sparse_fwd`` contract (see
``sparse_mla_decode_ref``): ``q`` (N, H, d_v + rope), ``kv`` (slots, 1, d_v + rope), ``indices``
(N, 1, topk) int32 with -1 for none; output (N, H, d_v), bf16 (fp32 for fp32 inputs). fp8 inputs
are read as their values (k_scale = 1, as TileLang's fp8 kernel assumes)."""

from __future__ import annotations

import torch
import triton

from .kernels.sparse_mla_decode import _sparse_mla_decode_kernel

_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2") if hasattr(torch, n))


def sparse_mla_decode(q, kv, indices, sm_scale: float, d_v: int = 512, out: torch.Tensor | None = None):
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
    elif out.shape != (n, h, d_v) or out.dtype != out_dtype:
        raise ValueError(f"sparse_mla_decode: out must be ({n}, {h}, {d_v}) {out_dtype}")
    topk = indices.shape[-1]
    kv2 = kv[:, 0, :]
    block_h = 16  # tl.dot needs 16 rows; fewer heads are masked
    grid = (n, triton.cdiv(h, block_h))
    if n:
        _sparse_mla_decode_kernel[grid](
            q, kv2, indices, out, float(sm_scale), h,
            *q.stride(), *kv2.stride(), indices.stride(0), indices.stride(2), *out.stride(),
            TOPK=topk, D_V=d_v, D_ROPE=d_rope, BLOCK_H=block_h, BLOCK_N=32, IEEE=ieee,
            num_warps=4, num_stages=2,
        )
    return out

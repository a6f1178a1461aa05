"""Portable DeepSeek-V4 sparse decode attention over the FP8 584 B/token cache, FlashMLA's sparse
decode semantics (contract: ``sparse_decode_ref``; cache layout: ``kv_cache``):
``sparse_decode(q, k_cache, indices, block_size, sm_scale, ...) -> (out, lse)``.

* q (b, s_q, h_q, 512) bf16 (fp32: the CPU interpreter's precision; the output is then fp32), any
  strides with the last dim contiguous; any head count (heads are masked, never refused);
* k_cache / extra_k_cache: the pages as :func:`kv_cache.quantize_kv` returns them, or SGLang's byte
  views of them (page stride from ``stride(0)``);
* indices / extra_indices (b, s_q, topk) int32, ``block * block_size + offset``, -1 invalid;
  topk_length / extra_topk_length (b,) int32: positions at or past it are ignored (whole blocks of
  keys past it are not read); one length per batch row, also when s_q > 1 (FlashMLA's contract);
* attn_sink (h_q,) fp32; out (b, s_q, h_q, 512) bf16 (``out=``: contiguous); lse (b, h_q, s_q) fp32.

Bad input is refused on the host with a message (dtypes, shapes, strides, devices, page geometry);
index values are checked on the host only where that is free (CPU tensors). On the device an index
past the cache is treated as invalid: no load ever leaves the cache.

Launch: one program per (16 or 64 heads, query token, split), ``splitk.plan``'s fixed rule; with more
than one split a combine kernel merges the partials (scratch from the caching allocator on the
current stream). No state is kept between calls and nothing global is touched at import.
"""

from __future__ import annotations

import torch
import triton

from .. import splitk
from .kernels.sparse_decode import _dsv4_sparse_decode_kernel
from .kv_cache import D, cache_pages


def launch_rule(tokens: int, heads: int, keys: int, device, splits: int | None = None) -> splitk.SplitPlan:
    """The fixed launch of one call (``splits`` forces the split count). More than 16 heads: 64
    heads x 64 keys per step, 8 warps, the best or within 5% of the best of the H200 sweep
    (``bench_dsv4_sparse_decode.py --sweep``: h 64 batch 1 and 64, h 128 batch 128 s_q 2); up to
    16 heads, and on the CPU: 16 x 32 (tl.dot needs 16 rows; fewer heads are masked; under the
    interpreter numpy's fp32 matmul of 64-row blocks errs about twice as much as torch's einsum)."""
    if heads <= 16 or torch.device(device).type != "cuda":
        return splitk.plan(tokens, heads, keys, device, block_h=16, block_n=32, num_warps=8, num_stages=2, splits=splits)
    return splitk.plan(tokens, heads, keys, device, block_h=64, block_n=64, num_warps=8, num_stages=2, splits=splits)


def _check_scope(name, cache, indices, block_size, length, q, check_indices):
    b, s_q = q.shape[:2]
    if cache.device != q.device or indices.device != q.device:
        raise ValueError(f"sparse_decode: {name} cache and indices must be on {q.device}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (b, s_q) or indices.dtype != torch.int32:
        raise ValueError(f"sparse_decode: {name} indices must be ({b}, {s_q}, topk) int32, got "
                         f"{tuple(indices.shape)} {indices.dtype}")
    if indices.stride(2) != 1 and indices.shape[2] > 1:
        raise ValueError(f"sparse_decode: {name} indices must have a contiguous last dim")
    rows, stride, n_tokens = cache_pages(cache, block_size, f"sparse_decode: {name} k_cache")
    if length is not None:
        if (length.device != q.device or length.dtype != torch.int32 or tuple(length.shape) != (b,)
                or (b > 1 and length.stride(0) != 1)):
            raise ValueError(f"sparse_decode: {name} topk_length must be contiguous ({b},) int32 on {q.device} (one "
                             f"length per batch row: FlashMLA indexes it by token // s_q), got {tuple(length.shape)} "
                             f"{length.dtype}")
    if check_indices and q.device.type == "cpu" and indices.numel():
        used = indices
        if length is not None:  # entries past a row's length are ignored, whatever they hold
            used = torch.where(torch.arange(indices.shape[2]) < length[:, None, None].long(), indices, -1)
        if int(used.max()) >= n_tokens:
            raise ValueError(f"sparse_decode: {name} indices reach {int(used.max())}, past the cache's {n_tokens} tokens")
    return rows, stride, n_tokens


def sparse_decode(q, k_cache, indices, block_size, sm_scale, *, topk_length=None, attn_sink=None,
                  extra_k_cache=None, extra_indices=None, extra_block_size=None, extra_topk_length=None,
                  out=None, splits: int | None = None, rule: splitk.SplitPlan | None = None,
                  check_indices: bool = True):
    """-> (out, lse); see the module docstring. ``splits`` forces the split count (tests); ``rule``
    replaces the whole launch (the benchmark's sweep of the launch rule); ``check_indices=False``
    skips the host's index check on CPU tensors (the tests of the device guard)."""
    if q.dim() != 4 or q.shape[3] != D or q.dtype not in (torch.bfloat16, torch.float32) or q.stride(3) != 1:
        raise ValueError(f"sparse_decode: q must be (b, s_q, h_q, {D}) bf16 with a contiguous last dim, got "
                         f"{tuple(q.shape)} {q.dtype}")
    b, s_q, h, _ = q.shape
    rows, stride, n_tokens = _check_scope("main", k_cache, indices, block_size, topk_length, q, check_indices)
    has_extra = extra_k_cache is not None
    if has_extra != (extra_indices is not None) or (has_extra and extra_block_size is None):
        raise ValueError("sparse_decode: the extra scope needs extra_k_cache, extra_indices and extra_block_size together")
    if not has_extra and (extra_topk_length is not None or extra_block_size is not None):
        raise ValueError("sparse_decode: extra_topk_length / extra_block_size without an extra scope")
    if has_extra:
        x_rows, x_stride, x_n_tokens = _check_scope("extra", extra_k_cache, extra_indices, extra_block_size,
                                                    extra_topk_length, q, check_indices)
        x_topk = extra_indices.shape[2]
    else:
        x_rows, x_stride, x_n_tokens, x_topk = rows, stride, n_tokens, 0
    if attn_sink is not None and (attn_sink.shape != (h,) or attn_sink.dtype != torch.float32
                                  or attn_sink.device != q.device or (h > 1 and attn_sink.stride(0) != 1)):
        raise ValueError(f"sparse_decode: attn_sink must be contiguous ({h},) fp32 on {q.device}")
    out_dtype = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
    if out is None:
        out = torch.empty(b, s_q, h, D, dtype=out_dtype, device=q.device)
    elif out.shape != (b, s_q, h, D) or out.dtype != out_dtype or not out.is_contiguous() or out.device != q.device:
        raise ValueError(f"sparse_decode: out must be contiguous ({b}, {s_q}, {h}, {D}) {out_dtype} on {q.device}")
    lse = torch.empty(b, h, s_q, dtype=torch.float32, device=q.device)
    tokens, topk = b * s_q, indices.shape[2]
    if tokens == 0 or h == 0:
        return out, lse
    p = rule if rule is not None else launch_rule(tokens, h, topk + x_topk, q.device, splits)
    final = p.splits == 1
    if final:
        o_buf, o_strides = out, (0, out.stride(0), out.stride(1), out.stride(2))
        l_buf, l_strides, den_off = lse, (0, lse.stride(0), lse.stride(1), lse.stride(2)), 0
    else:
        o_buf, stats = splitk.partials(p, tokens, h, D, q.device)
        l_buf, den_off = stats[0], splitk.den_offset(stats)
        o_strides = (o_buf.stride(0), s_q * o_buf.stride(1), o_buf.stride(1), o_buf.stride(2))
        l_strides = (l_buf.stride(0), s_q * l_buf.stride(1), l_buf.stride(2), l_buf.stride(1))
    dummy = lse
    grid = (triton.cdiv(h, p.block_h) * tokens, p.splits)  # (token, head block) flattened on x: no 65535 cap
    _dsv4_sparse_decode_kernel[grid](
        q, rows, indices, topk_length if topk_length is not None else dummy,
        x_rows, extra_indices if has_extra else indices, extra_topk_length if extra_topk_length is not None else dummy,
        attn_sink if attn_sink is not None else dummy, o_buf, l_buf,
        float(sm_scale), h, s_q,
        q.stride(0), q.stride(1), q.stride(2),
        stride, block_size, n_tokens, indices.stride(0), indices.stride(1), topk,
        x_stride, extra_block_size if has_extra else block_size, x_n_tokens,
        *(extra_indices.stride()[:2] if has_extra else (0, 0)), x_topk,
        *o_strides, *l_strides, den_off,
        HAS_LEN=topk_length is not None, HAS_EXTRA=has_extra, HAS_X_LEN=extra_topk_length is not None,
        HAS_SINK=attn_sink is not None, FINAL=final, BLOCK_H=p.block_h, BLOCK_N=p.block_n, KEYS_PER_SPLIT=p.keys_per_split,
        IEEE=q.dtype == torch.float32, num_warps=p.num_warps, num_stages=p.num_stages,
    )
    if not final:
        splitk.combine(o_buf, stats, out, (out.stride(0), out.stride(1), out.stride(2)), s_q, sink=attn_sink, lse=lse,
                       lse_strides=(lse.stride(0), lse.stride(1), lse.stride(2)))
    return out, lse

"""Portable indexer FP8 K cache with aiter's contract (``indexer_k_quant_and_cache``,
``cp_gather_indexer_k_quant_cache``; layout, row-major or preshuffled, in ``indexer_k_cache_ref``),
and its consumer, the paged MQA logits (DeepGEMM's / aiter's ``fp8_paged_mqa_logits`` semantics),
reading either layout: so a writer and a reader are tested as a pair, which aiter's suite does not
do (the sglang #31563 mismatch shipped in 0.5.13).

``fp8_paged_mqa_logits(..., probe=(slot, layout_probe(D), scale_fmt))`` is the debug mode: before
reading, it checks (``indexer_k_cache_ref.check_layout``) that the probe token a writer stored at
``slot`` sits where the reader's layout expects it, and raises ``LayoutMismatchError`` naming both
layouts if not (one device -> host read).

The launchers check shapes, dtypes, strides, devices and the block geometry on the host (the
preshuffle needs block_size and head_dim multiples of 16); slot values only for CPU tensors. On the
device a slot or a block-table entry outside the cache is never read or written: the writer skips
it, the gather and the reader return NaN there.
"""

from __future__ import annotations

import torch
import triton

from .indexer_k_cache_ref import (LayoutMismatchError, check_geometry, check_layout, layout_probe,  # noqa: F401
                                  row_bytes)
from .kernels.indexer_k_cache import _indexer_k_gather_kernel, _indexer_k_write_kernel, _paged_mqa_logits_kernel


def _pow2(n: int, what: str) -> None:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def indexer_k_quant_and_cache(k, kv_cache, slot_mapping, quant_block_size: int, scale_fmt, preshuffle: bool = False):
    """Quantise ``k`` (T, D) and store token i at slot ``slot_mapping[i]`` (negative: skipped)."""
    if k.dim() != 2 or k.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k.stride(1) != 1:
        raise ValueError(f"indexer_k_quant_and_cache: k must be (T, D) bf16/fp16/fp32 with contiguous rows, got "
                         f"{tuple(k.shape)} {k.dtype}")
    t, d = k.shape
    _pow2(d, "indexer_k_quant_and_cache: head_dim")
    _pow2(quant_block_size, "indexer_k_quant_and_cache: quant_block_size")
    if scale_fmt not in (None, "", "ue8m0"):
        raise ValueError(f"indexer_k_quant_and_cache: scale_fmt must be 'ue8m0' or None, got {scale_fmt!r}")
    num_blocks, block_size = check_geometry(kv_cache, d, quant_block_size, preshuffle, "indexer_k_quant_and_cache")
    if slot_mapping.shape != (t,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indexer_k_quant_and_cache: slot_mapping must be ({t},) int32/int64")
    if k.device != kv_cache.device or slot_mapping.device != k.device:
        raise ValueError("indexer_k_quant_and_cache: k, kv_cache and slot_mapping must be on one device")
    capacity = num_blocks * block_size
    if k.device.type == "cpu" and t and int(slot_mapping.max()) >= capacity:
        raise ValueError(f"indexer_k_quant_and_cache: slot {int(slot_mapping.max())} is past the cache's {capacity} slots")
    if t:
        _indexer_k_write_kernel[(t,)](
            k, _bytes(kv_cache), slot_mapping, k.stride(0), kv_cache.stride(0), block_size, capacity,
            D=d, Q=quant_block_size, UE8M0=scale_fmt == "ue8m0", PRESHUFFLE=bool(preshuffle), num_warps=4,
        )


def cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens, preshuffle: bool = False):
    """Every sequence's tokens in order: ``dst_k`` (T, D) their fp8 bytes, ``dst_scale`` (T, 4 * D / Q)
    the bytes of their fp32 scales (uint8; or (T, D / Q) fp32)."""
    if dst_k.dim() != 2 or dst_k.element_size() != 1 or dst_k.stride(1) != 1:
        raise ValueError(f"cp_gather_indexer_k_quant_cache: dst_k must be (T, D) one-byte elements, got {tuple(dst_k.shape)}")
    t, d = dst_k.shape
    scale_bytes = _bytes(dst_scale)  # uint8 as it is; an fp32 (T, D / Q) view becomes its (T, 4 * D / Q) bytes
    if scale_bytes.dim() != 2 or scale_bytes.shape[0] != t or scale_bytes.shape[1] % 4 or scale_bytes.stride(1) != 1:
        raise ValueError(f"cp_gather_indexer_k_quant_cache: dst_scale must be ({t}, 4 * D / Q) uint8 or ({t}, D / Q) fp32")
    groups = scale_bytes.shape[1] // 4
    _pow2(groups, "cp_gather_indexer_k_quant_cache: D / quant_block_size")
    if d % groups:
        raise ValueError(f"cp_gather_indexer_k_quant_cache: {groups} scales do not divide head_dim {d}")
    num_blocks, block_size = check_geometry(kv_cache, d, d // groups, preshuffle, "cp_gather_indexer_k_quant_cache")
    if block_table.dim() != 2 or block_table.dtype != torch.int32 or block_table.stride(1) != 1:
        raise ValueError("cp_gather_indexer_k_quant_cache: block_table must be (batch, blocks) int32, contiguous rows")
    if cu_seq_lens.shape != (block_table.shape[0] + 1,) or cu_seq_lens.dtype != torch.int32:
        raise ValueError(f"cp_gather_indexer_k_quant_cache: cu_seq_lens must be ({block_table.shape[0] + 1},) int32")
    for name, x in (("dst_k", dst_k), ("dst_scale", dst_scale), ("block_table", block_table), ("cu_seq_lens", cu_seq_lens)):
        if x.device != kv_cache.device:
            raise ValueError(f"cp_gather_indexer_k_quant_cache: {name} is on {x.device}, kv_cache on {kv_cache.device}")
    if kv_cache.device.type == "cpu" and int(cu_seq_lens[-1]) > t:
        raise ValueError(f"cp_gather_indexer_k_quant_cache: cu_seq_lens ends at {int(cu_seq_lens[-1])}, dst_k has {t} rows")
    block_t = 64
    if t and block_table.shape[0]:
        _indexer_k_gather_kernel[(block_table.shape[0], triton.cdiv(t, block_t))](
            _bytes(kv_cache), _bytes(dst_k), scale_bytes, block_table, cu_seq_lens,
            kv_cache.stride(0), block_size, num_blocks, block_table.stride(0), block_table.shape[1],
            dst_k.stride(0), scale_bytes.stride(0),
            D=d, SB=4 * groups, BLOCK_T=block_t, PRESHUFFLE=bool(preshuffle), num_warps=4,
        )


def fp8_paged_mqa_logits(q_fp8, kv_cache, weights, context_lens, block_table, max_model_len: int, preshuffle: bool,
                         block_size: int, *, probe=None, out=None):
    """q_fp8 (B, next_n, H, D) fp8 e4m3 (or its bytes), weights (B * next_n, H) fp32, context_lens (B,)
    int32, block_table (B, blocks) int32 -> logits (B * next_n, max_model_len) fp32; one fp32 scale
    per token (Q = D)."""
    if q_fp8.dim() != 4 or q_fp8.element_size() != 1 or q_fp8.stride(3) != 1:
        raise ValueError(f"fp8_paged_mqa_logits: q_fp8 must be (B, next_n, H, D) fp8, got {tuple(q_fp8.shape)} {q_fp8.dtype}")
    b, next_n, h, d = q_fp8.shape
    _pow2(d, "fp8_paged_mqa_logits: head_dim")
    num_blocks, cache_block = check_geometry(kv_cache, d, d, preshuffle, "fp8_paged_mqa_logits")
    if cache_block != block_size:
        raise ValueError(f"fp8_paged_mqa_logits: kv_cache blocks hold {cache_block} tokens, block_size is {block_size}")
    if weights.shape != (b * next_n, h) or weights.dtype != torch.float32 or weights.stride(1) != 1:
        raise ValueError(f"fp8_paged_mqa_logits: weights must be ({b * next_n}, {h}) fp32")
    if context_lens.shape != (b,) or context_lens.dtype != torch.int32:
        raise ValueError(f"fp8_paged_mqa_logits: context_lens must be ({b},) int32")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32 or block_table.stride(1) != 1:
        raise ValueError(f"fp8_paged_mqa_logits: block_table must be ({b}, blocks) int32 with contiguous rows")
    for name, x in (("q_fp8", q_fp8), ("weights", weights), ("context_lens", context_lens), ("block_table", block_table)):
        if x.device != kv_cache.device:
            raise ValueError(f"fp8_paged_mqa_logits: {name} is on {x.device}, kv_cache on {kv_cache.device}")
    if out is None:
        out = torch.empty(b * next_n, max_model_len, dtype=torch.float32, device=q_fp8.device)
    elif out.shape != (b * next_n, max_model_len) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"fp8_paged_mqa_logits: out must be ({b * next_n}, {max_model_len}) fp32, contiguous rows")
    if probe is not None:
        slot, probe_k, scale_fmt = probe
        check_layout(kv_cache, slot, probe_k, d, scale_fmt, preshuffle)
    q_rows = _bytes(q_fp8).reshape(b * next_n, h, d)
    block_n = 64
    if b * next_n and max_model_len:
        _paged_mqa_logits_kernel[(b * next_n, triton.cdiv(max_model_len, block_n))](
            q_rows, _bytes(kv_cache), weights, context_lens, block_table, out,
            h, next_n, max_model_len, kv_cache.stride(0), block_size, num_blocks, block_table.stride(0),
            block_table.shape[1], q_rows.stride(0), q_rows.stride(1), weights.stride(0), out.stride(0),
            D=d, BLOCK_H=max(16, triton.next_power_of_2(h)), BLOCK_N=block_n, PRESHUFFLE=bool(preshuffle),
            IEEE=q_fp8.device.type == "cpu", num_warps=4,
        )
    return out

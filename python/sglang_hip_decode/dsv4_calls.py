"""What the DeepSeek-V4 patches' edited upstream bodies call at run time (imported inside the edited
method, so a server without these patches never imports it, nor the kernels).

:func:`sparse_decode_call` (patch ``dsv4-sparse-decode``): the HIP DSV4 attention backend's FlashMLA
call, ``flash_mla_with_kvcache_entrypoint(**input_dict, backend=...)[0]``, answered by this project's
portable ``sgl_hip_kernels.dsv4.sparse_decode`` where that kernel implements exactly the call's
contract, else ``None`` (the edited body then makes upstream's call, unchanged). Ours answers when
all of these hold, each a property of the call's shapes and mode (the same on every replay of a
captured CUDA graph):

* the batch is a decode batch (``forward_mode.is_decode()``; prefill, target-verify and draft-extend
  keep upstream's kernel);
* q is (tokens, 1, heads, 512) bf16 (fp32: the CPU interpreter's precision), ``head_dim_v`` 512;
* the FP8 cache (``is_fp8_kvcache``) of both scopes is the 584 B/token V4 layout (0.5.22+ also has
  V4.1 layouts: those keep upstream's kernel), one-byte elements, a page's bytes contiguous, no block
  table, no ``cache_seqlens``;
* the device's FP8 is OCP e4m3 (the kernel reads the cache as e4m3fn): gfx942 (MI300X / MI325X),
  where SGLang writes e4m3fnuz, keeps upstream's kernel; so does any call on a GPU with fp32 q;
* upstream's split count is not pinned: 0.5.22+'s deterministic inference (``hip_attn_kv_splits()``
  > 0) fixes it for batch-invariant bits, ours picks splits by batch size, so it keeps upstream's;
* the backend asked for is not one of upstream's debugging paths (``torch``, ``comparison``);
* ``softmax_scale`` is a number;
* every other input is what the kernel accepts: indices (tokens, 1, topk) int32 with a contiguous
  last dim, lengths (tokens,) int32 contiguous, the sink (heads,) fp32 contiguous, all on q's device.
  A call that misses any of these keeps upstream's kernel (never an error of ours in a decode step).

0.5.22+ passes ``inv_rope`` where the kernel it picks (aiter's) applies the inverse RoPE itself; ours
does not, so upstream's own standalone inverse RoPE (``hip_flash_mla._apply_inverse_rope``) runs on
our output, as upstream's paths without the fused form do.
"""

from __future__ import annotations

import functools

import torch

from sgl_hip_kernels.dsv4 import sparse_decode

V4_BYTES_PER_TOKEN = 584  # FlashMLA's MODEL1 FP8 layout: 448 fp8 NoPE + 64 bf16 RoPE + 8 scale bytes
HEAD_DIM = 512


def _v4_cache(cache, device) -> bool:
    """SGLang's (pages, page_size, 1, 584) byte view of V4 pages, each page's bytes contiguous, at an
    even address and page stride (the kernel reads the RoPE values as bf16)."""
    return bool(
        isinstance(cache, torch.Tensor) and cache.device == device and cache.dim() == 4
        and cache.element_size() == 1 and cache.dtype != torch.bool
        and cache.shape[2] == 1 and cache.shape[3] == V4_BYTES_PER_TOKEN
        and cache.stride(3) == 1 and (cache.shape[1] == 1 or cache.stride(1) == V4_BYTES_PER_TOKEN)
        and (cache.shape[0] <= 1 or cache.stride(0) % 2 == 0) and cache.data_ptr() % 2 == 0
    )


def _int32_rows(t, shape, device) -> bool:
    """An int32 tensor of ``shape`` (``None`` entries any size) on ``device``, its last dim contiguous."""
    return bool(
        isinstance(t, torch.Tensor) and t.device == device and t.dtype == torch.int32 and t.dim() == len(shape)
        and all(want is None or have == want for have, want in zip(t.shape, shape))
        and (t.shape[-1] <= 1 or t.stride(-1) == 1)
    )


def _scope_ok(call, cache_key, indices_key, length_key, q) -> bool:
    length = call.get(length_key)
    return (_v4_cache(call.get(cache_key), q.device)
            and _int32_rows(call.get(indices_key), (q.shape[0], 1, None), q.device)
            and (length is None or _int32_rows(length, (q.shape[0],), q.device)))


DEBUG_BACKENDS = ("torch", "comparison")  # upstream's reference and cross-check paths: never replaced


@functools.lru_cache(maxsize=None)
def _fp8_is_fnuz(device_index: int) -> bool:
    """Whether this HIP GPU's FP8 is e4m3fnuz (gfx94x), as SGLang's ``is_fp8_fnuz`` decides it."""
    return bool(torch.version.hip) and torch.cuda.get_device_properties(device_index).gcnArchName.startswith("gfx94")


def _kernel_reads_this_fp8(q) -> bool:
    return q.device.type != "cuda" or not _fp8_is_fnuz(q.device.index if q.device.index is not None else 0)


def _splits_pinned() -> bool:
    """0.5.22+: deterministic inference pins upstream's split count (none of this before)."""
    from sglang.srt.layers.attention import hip_flash_mla

    pinned = getattr(hip_flash_mla, "hip_attn_kv_splits", None)
    return pinned is not None and pinned() > 0


def sparse_decode_applies(forward_batch, call: dict, backend=None) -> bool:
    """Whether :func:`sparse_decode_call` answers this call (module docstring)."""
    q, sink, scale = call.get("q"), call.get("attn_sink"), call.get("softmax_scale")
    return bool(
        forward_batch.forward_mode.is_decode()
        and backend not in DEBUG_BACKENDS
        and isinstance(scale, (int, float)) and not isinstance(scale, bool)
        and isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] == 1 and q.shape[3] == HEAD_DIM
        and (q.dtype == torch.bfloat16 or (q.dtype == torch.float32 and q.device.type == "cpu")) and q.stride(3) == 1
        and call.get("head_dim_v") == HEAD_DIM
        and call.get("is_fp8_kvcache") is True
        and call.get("block_table") is None and call.get("cache_seqlens") is None
        and _scope_ok(call, "k_cache", "indices", "topk_length", q)
        and (call.get("extra_k_cache") is None
             or _scope_ok(call, "extra_k_cache", "extra_indices_in_kvcache", "extra_topk_length", q))
        and (sink is None or (isinstance(sink, torch.Tensor) and sink.device == q.device
                              and sink.dtype == torch.float32 and tuple(sink.shape) == (q.shape[2],)
                              and (q.shape[2] <= 1 or sink.stride(0) == 1)))
        and _kernel_reads_this_fp8(q)
        and not _splits_pinned()
    )


def sparse_decode_call(forward_batch, call: dict, backend=None):
    """The call's output (tokens, 1, heads, 512), what ``entrypoint(**call, backend=backend)[0]``
    returns, or ``None`` where ours does not answer it."""
    if not sparse_decode_applies(forward_batch, call, backend):
        return None
    k_cache, extra = call["k_cache"], call.get("extra_k_cache")
    out, _ = sparse_decode(
        call["q"], k_cache, call["indices"], k_cache.shape[1], call["softmax_scale"],
        topk_length=call.get("topk_length"), attn_sink=call.get("attn_sink"),
        extra_k_cache=extra, extra_indices=call.get("extra_indices_in_kvcache") if extra is not None else None,
        extra_block_size=extra.shape[1] if extra is not None else None,
        extra_topk_length=call.get("extra_topk_length") if extra is not None else None,
    )
    inv_rope = call.get("inv_rope")
    if inv_rope is not None:
        from sglang.srt.layers.attention.hip_flash_mla import _apply_inverse_rope

        _apply_inverse_rope(out, inv_rope)
    return out

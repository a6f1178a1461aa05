"""DeepSeek-V4's FP8 sparse KV cache (FlashMLA's "MODEL1" FP8 layout, SGLang's
``deepseek_v4_memory_pool``): the byte layout, the writer (:func:`quantize_kv`) and the fp32
reference reader (:func:`dequantize_kv`), both in torch over the real bytes.

A page of ``block_size`` tokens, in byte order:

* data region, ``block_size x 576`` B: per token 448 fp8-e4m3 (OCP, ``float8_e4m3fn``) NoPE bytes,
  then its 64 RoPE values as bf16 (128 B);
* scale region, ``block_size x 8`` B: per token 7 UE8M0 bytes, one per 64 NoPE values
  (``scale = 2 ** (u8 - 127)``), then one pad byte (written 0);
* padding up to a multiple of 576 B (``page_bytes``).

Token ``i`` of the cache (FlashMLA's ``indices_in_kvcache``) is token ``i % block_size`` of page
``i // block_size``. The quantizer rounds each tile's scale up to a power of two as SGLang's writers
do: ``scale = 2 ** ceil(log2(max(amax, 1e-8) / 448))``, ``fp8 = clamp(x / scale, -448, 448)``.
"""

from __future__ import annotations

import torch

from ..scales_ref import pow2_ceil_exponent

D = 512  # K = V width: 448 NoPE + 64 RoPE
D_NOPE = 448
D_ROPE = 64
TILE = 64  # NoPE values per scale
N_SCALES = D_NOPE // TILE  # 7
DATA_BYTES = D_NOPE + 2 * D_ROPE  # 576
SCALE_BYTES = N_SCALES + 1  # 8 (one pad byte)
TOKEN_BYTES = DATA_BYTES + SCALE_BYTES  # 584
FP8_MAX = 448.0
AMAX_FLOOR = 1e-8  # SGLang's quantizer (FlashMLA's reference floors at 1e-4 instead)


def page_bytes(block_size: int) -> int:
    """Bytes per page: ``block_size`` tokens of 584 B, padded up to a multiple of 576 (SGLang's pool)."""
    if block_size < 1:
        raise ValueError(f"dsv4 kv cache: block_size must be >= 1, got {block_size}")
    return -(-block_size * TOKEN_BYTES // DATA_BYTES) * DATA_BYTES


def quantize_kv(kv: torch.Tensor, block_size: int) -> torch.Tensor:
    """``kv`` (pages, block_size, 512) bf16/fp32 -> the cache, uint8 ``(pages, page_bytes(block_size))``."""
    if kv.dim() != 3 or kv.shape[1] != block_size or kv.shape[2] != D:
        raise ValueError(f"quantize_kv: kv must be (pages, {block_size}, {D}), got {tuple(kv.shape)}")
    if kv.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"quantize_kv: kv must be bf16 or fp32, got {kv.dtype}")
    pages = kv.shape[0]
    nope = kv[..., :D_NOPE].float().reshape(pages, block_size, N_SCALES, TILE)
    amax = nope.abs().amax(-1).clamp_min(AMAX_FLOOR)
    exponent = pow2_ceil_exponent(amax / FP8_MAX)  # exact, also just above a power of two
    scaled = (nope / torch.ldexp(torch.ones_like(amax), exponent)[..., None]).clamp(-FP8_MAX, FP8_MAX)
    cache = torch.zeros(pages, page_bytes(block_size), dtype=torch.uint8, device=kv.device)
    data = cache[:, : block_size * DATA_BYTES].view(pages, block_size, DATA_BYTES)
    data[..., :D_NOPE] = scaled.reshape(pages, block_size, D_NOPE).to(torch.float8_e4m3fn).view(torch.uint8)
    data[..., D_NOPE:] = kv[..., D_NOPE:].to(torch.bfloat16).contiguous().view(torch.uint8)
    scales = cache[:, block_size * DATA_BYTES : block_size * TOKEN_BYTES].view(pages, block_size, SCALE_BYTES)
    scales[..., :N_SCALES] = (exponent + 127).to(torch.uint8)
    return cache


def cache_pages(cache: torch.Tensor, block_size: int, what: str = "k_cache") -> tuple[torch.Tensor, int, int]:
    """The pages of a cache as ``(pages, bytes)`` uint8 rows (a view: no copy), their stride, and the
    number of tokens the cache holds. Accepts what :func:`quantize_kv` returns and SGLang's byte views
    of the same pages (e.g. ``(pages, block_size, 1, 584)`` over the padded pages, or an fp8 view):
    one-byte elements, the bytes of a page contiguous, the page stride from ``stride(0)``."""
    if (not isinstance(cache, torch.Tensor) or cache.element_size() != 1 or cache.dim() < 2
            or cache.dtype == torch.bool):
        raise ValueError(f"{what}: must be a tensor of one-byte elements (uint8 or an fp8 view), at least 2-D, got "
                         f"{getattr(cache, 'dtype', type(cache))} {tuple(getattr(cache, 'shape', ()))}")
    if block_size < 1:
        raise ValueError(f"{what}: block_size must be >= 1, got {block_size}")
    inner = 1
    for size, stride in zip(reversed(cache.shape[1:]), reversed(cache.stride()[1:])):
        if size != 1 and stride != inner:
            raise ValueError(f"{what}: the bytes of a page must be contiguous, got strides {cache.stride()}")
        inner *= size
    used = block_size * TOKEN_BYTES
    if inner not in (used, page_bytes(block_size)):
        raise ValueError(f"{what}: a page of {inner} B does not hold block_size {block_size} (expects {used} B, or "
                         f"{page_bytes(block_size)} B padded)")
    if cache.dim() == 4 and cache.shape[1] != block_size:
        raise ValueError(f"{what}: a (pages, block, 1, bytes) view has block {cache.shape[1]}, not block_size {block_size}")
    pages = cache.shape[0]
    stride = cache.stride(0) if pages > 1 else inner
    if stride < inner or stride % 2:
        raise ValueError(f"{what}: page stride {stride} must be even and >= the page's {inner} B")
    rows = torch.as_strided(cache.view(torch.uint8), (pages, inner), (stride, 1))
    if rows.data_ptr() % 2:
        raise ValueError(f"{what}: the cache must start at an even address (its bf16 RoPE values are read as bf16)")
    return rows, stride, pages * block_size


def _dequantize_tokens(data: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """Tokens' 576 data bytes (..., 576) and 8 scale bytes (..., 8) -> their (..., 512) fp32 values."""
    nope = data[..., :D_NOPE].contiguous().view(torch.float8_e4m3fn).float()
    nope = nope.unflatten(-1, (N_SCALES, TILE)) * torch.exp2(exps[..., :N_SCALES].float() - 127)[..., None]
    rope = data[..., D_NOPE:].contiguous().view(torch.bfloat16).float()
    return torch.cat([nope.flatten(-2), rope], -1)


def _regions(cache: torch.Tensor, block_size: int):
    """The data (pages, block_size, 576) and scale (pages, block_size, 8) bytes, as views."""
    rows, _, _ = cache_pages(cache, block_size)
    pages = rows.shape[0]
    data = rows[:, : block_size * DATA_BYTES].view(pages, block_size, DATA_BYTES)
    exps = rows[:, block_size * DATA_BYTES : block_size * TOKEN_BYTES].view(pages, block_size, SCALE_BYTES)
    return data, exps


def dequantize_kv(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """The fp32 reference reader: the cache -> ``(pages, block_size, 512)`` fp32 values
    (``fp8 * 2 ** (u8 - 127)`` for the NoPE part, the bf16 RoPE values)."""
    return _dequantize_tokens(*_regions(cache, block_size))


def gather_tokens(cache: torch.Tensor, block_size: int, indices: torch.Tensor) -> torch.Tensor:
    """The fp32 values of the tokens ``indices`` name (``block * block_size + offset``; every entry
    must be inside the cache): ``indices.shape + (512,)``. Reads only those tokens' bytes."""
    data, exps = _regions(cache, block_size)
    idx = indices.long()
    page, slot = idx // block_size, idx % block_size
    return _dequantize_tokens(data[page, slot], exps[page, slot])

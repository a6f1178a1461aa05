"""This project's DeepSeek-V4 decode kernels: the fused KV compressor (``compress``; its host planner
``plan``; contract and fp32 reference ``compress_ref``), the fused QK RMSNorm (``qk_norm``), and the
sparse decode attention over the FP8 584 B/token cache (``sparse_decode``; the cache's layout,
writer and reference reader ``kv_cache``; contract and fp64 reference ``sparse_decode_ref``)."""

from .kv_cache import dequantize_kv, page_bytes, quantize_kv
from .sparse_decode import sparse_decode

__all__ = ["dequantize_kv", "page_bytes", "quantize_kv", "sparse_decode"]

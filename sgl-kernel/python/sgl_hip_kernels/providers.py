"""Registers this package's portable kernels and torch references with sglang_hip_decode's
provider table (``sglang_hip_decode.providers``), beside the real ROCm kernels. Imported by that
table on first use; loaders are lazy, so nothing here imports Triton until a kernel is resolved."""

from sglang_hip_decode.providers import import_loader, register_kernel

register_kernel(
    "fused_qk_rope_cat_and_cache_mla",
    triton=import_loader("sgl_hip_kernels.mla_rope_cat:fused_qk_rope_cat_and_cache_mla"),
    torch=import_loader("sgl_hip_kernels.ref:fused_qk_rope_cat_and_cache_mla_ref"),
)
# One contract serves nsa_backend._forward_tilelang (TileLang) and _forward_aiter (aiter MLA decode
# over the same top-k slots): o[n, h] = softmax(sm_scale * q kv^T) kv[:, :d_v] over valid slots.
register_kernel(
    "tilelang_sparse_fwd",
    triton=import_loader("sgl_hip_kernels.sparse_mla_decode:sparse_mla_decode"),
    torch=import_loader("sgl_hip_kernels.ref:sparse_mla_decode_ref"),
)
for _name in ("batched_gemm_afp4wfp4_pre_quant", "fused_flatten_mxfp4_quant", "fused_flatten_fp8_group_quant"):
    register_kernel(
        _name,
        triton=import_loader(f"sgl_hip_kernels.mxfp4:{_name}"),
        torch=import_loader(f"sgl_hip_kernels.ref:{_name}_ref"),
    )

"""sgl_hip_kernels: portable Triton kernels for the decode paths sglang-hip-decode patches, standing alone.

* ``standins``: the contracts of the ROCm kernels the patches sit between (aiter's
  ``fused_qk_rope_cat_and_cache_mla``, MXFP4 GEMM and flatten-quant kernels; TileLang's sparse MLA
  decode), so every patched path also runs on NVIDIA GPUs and (as references) on the CPU;
* ``dsv4``: this project's own DeepSeek-V4 kernels (KV compressor and its planner, fused QK RMSNorm,
  sparse decode over the FP8 584 B/token cache);
* ``indexer_k_cache``: aiter's indexer FP8 K cache (row-major or preshuffled) — writer, gather, and
  the paged MQA logits reader, with a layout check (``indexer_k_cache_ref``: the torch reference);
* ``splitk``: the split-K launch rules and combine the sparse decodes share;
* ``testing``: the timing and table helpers their benchmarks use.

Each op keeps its ``@triton.jit`` bodies in a ``kernels/`` module, a thin launcher beside it, and an
fp32 reference in ``<op>_ref.py``. Importing this package imports nothing else (not even torch), and
the package never imports the plugin: :data:`PROVIDERS` is plain data that the plugin's provider
table reads.
"""

# ROCm kernel name -> {provider kind: "module:function"} for the stand-ins: the portable Triton
# launcher (on a GPU) and the fp32 torch reference (anywhere, the CPU's provider). One contract
# serves nsa_backend._forward_tilelang (TileLang) and _forward_aiter (aiter MLA decode over the same
# top-k slots): o[n, h] = softmax(sm_scale * q kv^T) kv[:, :d_v] over valid slots.
PROVIDERS: dict[str, dict[str, str]] = {
    "fused_qk_rope_cat_and_cache_mla": {
        "triton": "sgl_hip_kernels.standins.mla_rope_cat:fused_qk_rope_cat_and_cache_mla",
        "torch": "sgl_hip_kernels.standins.mla_rope_cat_ref:fused_qk_rope_cat_and_cache_mla_ref",
    },
    "tilelang_sparse_fwd": {
        "triton": "sgl_hip_kernels.standins.sparse_mla_decode:sparse_mla_decode",
        "torch": "sgl_hip_kernels.standins.sparse_mla_decode_ref:sparse_mla_decode_ref",
    },
    **{
        name: {"triton": f"sgl_hip_kernels.indexer_k_cache:{name}", "torch": f"sgl_hip_kernels.indexer_k_cache_ref:{name}_ref"}
        for name in ("indexer_k_quant_and_cache", "cp_gather_indexer_k_quant_cache")
    },
    **{
        name: {"triton": f"sgl_hip_kernels.standins.mxfp4:{name}", "torch": f"sgl_hip_kernels.standins.mxfp4_ref:{name}_ref"}
        for name in ("batched_gemm_afp4wfp4_pre_quant", "fused_flatten_mxfp4_quant", "fused_flatten_fp8_group_quant")
    },
}

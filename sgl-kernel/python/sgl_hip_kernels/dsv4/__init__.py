"""This project's DeepSeek-V4 decode kernels: the fused KV compressor (``compress``; its host planner
``plan``; contract and fp32 reference ``compress_ref``) and the fused QK RMSNorm (``qk_norm``)."""

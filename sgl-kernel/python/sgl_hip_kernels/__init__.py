"""sgl_hip_kernels: portable Triton kernels for the ROCm decode paths sglang-hip-decode patches.

Each kernel keeps its ``@triton.jit`` body in its own module, a thin launcher beside it, and an fp32
torch reference in ``ref.py``; ``providers.py`` (when present) registers the Triton launcher and the
torch reference with ``sglang_hip_decode.providers``.
"""

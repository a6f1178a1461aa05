"""Portable stand-ins for the ROCm kernels the patched upstream code calls (aiter, TileLang), each with
the real kernel's full contract (shapes, dtypes, strides, rounding) stated in its docstring, and an
fp32 reference in ``<op>_ref.py``."""

"""Kernel providers (tests and benchmarks): one table that says which implementation of each ROCm kernel runs here.

The patched upstream code calls ROCm kernels (aiter, TileLang). Tests and benchmarks resolve each
through :func:`resolve`, which takes the first that is available, in this order:

1. ``rocm``: the real kernel, where it imports (a ROCm torch with aiter / TileLang installed);
2. ``triton``: this project's portable Triton kernel (``sgl_hip_kernels.PROVIDERS``), on a GPU;
3. ``torch``: the torch reference, anywhere (the CPU's provider).

``SGLANG_HIP_DECODE_PROVIDER=rocm|triton|torch`` (or ``resolve(..., prefer=...)``) forces one kind
and fails loudly if it is not available. Every resolution is recorded, so a test session or a
benchmark can print exactly which implementations it ran (:func:`used`, :func:`describe_used`).

Loaders are zero-argument callables that import and return the kernel; they run on first use only,
so registering costs nothing. A stand-in implements the real kernel's full contract, stated in its
docstring.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import threading
from typing import Callable, Optional

KINDS = ("rocm", "triton", "torch")
ENV_PROVIDER = "SGLANG_HIP_DECODE_PROVIDER"

Loader = Callable[[], Callable]


@dataclasses.dataclass
class KernelEntry:
    name: str
    doc: str = ""
    loaders: dict[str, Loader] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Resolution:
    name: str
    kind: Optional[str]  # None: nothing available
    fn: Optional[Callable]
    reasons: tuple[tuple[str, str], ...]  # (kind, why it was not taken) for the kinds passed over

    def __str__(self) -> str:
        return f"{self.name}={self.kind or 'none'}"


class ProviderUnavailable(RuntimeError):
    pass


_LOCK = threading.Lock()
_KERNELS: dict[str, KernelEntry] = {}
_USED: dict[str, str] = {}


def register_kernel(name: str, *, doc: str = "", **loaders: Loader) -> None:
    """Add loaders for ``name`` (keywords ``rocm=``, ``triton=``, ``torch=``); later calls merge."""
    bad = set(loaders) - set(KINDS)
    if bad:
        raise ValueError(f"unknown provider kind(s) {sorted(bad)} for {name}; kinds are {KINDS}")
    with _LOCK:
        entry = _KERNELS.setdefault(name, KernelEntry(name))
        entry.doc = doc or entry.doc
        entry.loaders.update(loaders)


def import_loader(path: str) -> Loader:
    """A loader for ``"package.module:attribute"``."""

    def load() -> Callable:
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)

    load.__qualname__ = f"import_loader({path!r})"
    return load


def kernels() -> dict[str, KernelEntry]:
    _load_builtin()
    with _LOCK:
        return dict(_KERNELS)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _on_gpu(device) -> bool:
    torch = _torch()
    if torch is None:
        return False
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"  # ROCm torch reports its GPUs as "cuda" too


def _available(kind: str, entry: KernelEntry, device) -> tuple[Optional[Callable], str]:
    loader = entry.loaders.get(kind)
    if loader is None:
        return None, "not implemented"
    torch = _torch()
    if torch is None:
        return None, "torch is not installed"
    if kind == "rocm" and not getattr(torch.version, "hip", None):
        return None, "not a ROCm torch"
    if kind == "triton" and not _on_gpu(device):
        return None, "no GPU (the Triton kernels run on the CPU only under TRITON_INTERPRET=1)"
    try:
        return loader(), ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def resolve(name: str, *, device=None, prefer: Optional[str] = None) -> Resolution:
    """The implementation of ``name`` to run on ``device`` (default: the current GPU, else CPU)."""
    entry = kernels().get(name)
    if entry is None:
        raise KeyError(f"no kernel named {name!r}; known: {sorted(kernels())}")
    forced = prefer or os.environ.get(ENV_PROVIDER) or None
    if forced is not None and forced not in KINDS:
        raise ValueError(f"{ENV_PROVIDER}={forced!r}: expected one of {KINDS}")
    order = (forced,) if forced else KINDS
    reasons = []
    for kind in order:
        fn, why = _available(kind, entry, device)
        if fn is not None:
            with _LOCK:
                _USED[name] = kind
            return Resolution(name, kind, fn, tuple(reasons))
        reasons.append((kind, why))
    if forced:
        raise ProviderUnavailable(f"{name}: provider {forced!r} is not available here: {reasons[0][1]}")
    return Resolution(name, None, None, tuple(reasons))


def get(name: str, *, device=None, prefer: Optional[str] = None) -> Callable:
    """The callable :func:`resolve` picks; raises :class:`ProviderUnavailable` if there is none."""
    res = resolve(name, device=device, prefer=prefer)
    if res.fn is None:
        why = "; ".join(f"{k}: {r}" for k, r in res.reasons)
        raise ProviderUnavailable(f"{name}: no provider available ({why})")
    return res.fn


def used() -> dict[str, str]:
    """``{kernel: kind}`` for every kernel resolved in this process so far."""
    with _LOCK:
        return dict(_USED)


def describe(pairs: dict[str, str]) -> str:
    """``kernel=kind, ...`` (sorted), or ``none resolved``."""
    return ", ".join(f"{k}={v}" for k, v in sorted(pairs.items())) if pairs else "none resolved"


def describe_used() -> str:
    return describe(used())


# --------------------------------------------------------------------------------------------
# The kernels the patched upstream code calls, with the real ROCm kernel as first choice; the
# portable Triton kernels and torch references come from sgl_hip_kernels.PROVIDERS (plain data).

_BUILTIN_ROCM = {
    "fused_qk_rope_cat_and_cache_mla": (
        "aiter.ops.triton.fused_kv_cache:fused_qk_rope_cat_and_cache_mla",
        "RoPE on q_pe/k_pe, [k_nope|rope(k_pe)] into the MLA KV cache, returns q_cat (forward_absorb_core)",
    ),
    "batched_gemm_afp4wfp4_pre_quant": (
        "aiter.ops.triton.batched_gemm_afp4wfp4_pre_quant:batched_gemm_afp4wfp4_pre_quant",
        "MXFP4 batched GEMM, activations quantised per 32 along K (MXFP4 v-bmm)",
    ),
    "fused_flatten_mxfp4_quant": (
        "aiter.ops.triton.fused_mxfp4_quant:fused_flatten_mxfp4_quant",
        "flatten (M,N1,N2) and MXFP4-quantise for an MXFP4 o_proj",
    ),
    "fused_flatten_fp8_group_quant": (
        "aiter.ops.triton.fused_fp8_quant:fused_flatten_fp8_group_quant",
        "flatten (M,N1,N2) and FP8-quantise per group for an FP8 o_proj",
    ),
    "indexer_k_quant_and_cache": (
        "aiter.ops.cache:indexer_k_quant_and_cache",
        "NSA/DSA indexer K: fp8 quantise per 128 and store, row-major or preshuffled (aiter #2879)",
    ),
    "cp_gather_indexer_k_quant_cache": (
        "aiter.ops.cache:cp_gather_indexer_k_quant_cache",
        "NSA/DSA indexer K: gather the fp8 K bytes and scales of every sequence through the block table",
    ),
    "tilelang_sparse_fwd": (
        "sglang.srt.layers.attention.nsa.tilelang_kernel:tilelang_sparse_fwd",
        "NSA sparse MLA decode (TileLang), nsa_backend._forward_tilelang",
    ),
}

_builtin_loaded = False


def _load_builtin() -> None:
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    for name, (path, doc) in _BUILTIN_ROCM.items():
        register_kernel(name, doc=doc, rocm=import_loader(path))
    try:
        from sgl_hip_kernels import PROVIDERS
    except ModuleNotFoundError as exc:  # the kernel library is not installed: ROCm kernels only
        if exc.name != "sgl_hip_kernels":
            raise
        return
    for name, paths in PROVIDERS.items():
        register_kernel(name, **{kind: import_loader(path) for kind, path in paths.items()})

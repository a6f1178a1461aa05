"""Compile, on the CPU, every Triton kernel a patch runs on a ROCm server, for the GPUs it will meet:
gfx950 (MI355X, the target), gfx942 (MI300X / MI325X) and sm_90 (the H200 the measurements use), at
the launch shapes the launchers pick on a GPU (Triton's own backends; nothing runs).
``python -m sgl_hip_kernels.testing.compile_targets ARCH`` prints one JSON line per kernel:
``{"kernel": ..., "arch": ..., "ok": bool, "error": ...}`` (``tests/test_compile_targets.py``).

Why: a kernel that does not compile for an architecture fails at its first call inside the patched
server (a patch's guard, which declines unsupported inputs, cannot see it), and the interpreter the
CPU suite runs never compiles anything. Triton's gfx950 backend refuses ``input_precision="tf32"``,
which gfx942 and NVIDIA accept.
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sgl_hip_kernels.dsv4.compress import launch_rule
from sgl_hip_kernels.dsv4.kernels.compress import (_dsv4_compress_decode_kernel, _dsv4_compress_prefill_paged_kernel,
                                                   _dsv4_state_copy_kernel)
from sgl_hip_kernels.dsv4.kernels.sparse_decode import _dsv4_sparse_decode_kernel
from sgl_hip_kernels.kernels.splitk import _splitk_combine_kernel

TARGETS = {"gfx950": GPUTarget("hip", "gfx950", 64), "gfx942": GPUTarget("hip", "gfx942", 64),
           "sm90": GPUTarget("cuda", 90, 32)}


def _signature(kernel, pointers: dict, floats: tuple, constexprs: dict) -> dict:
    """Triton's signature for ``kernel``: the named pointer types, fp32 for ``floats``, constexpr for
    ``constexprs``, i64 for every other (integer) argument."""
    names = list(inspect.signature(kernel.fn).parameters)
    unknown = (set(pointers) | set(floats) | set(constexprs)) - set(names)
    assert not unknown, f"not parameters of {kernel.fn.__name__}: {sorted(unknown)}"
    return {n: pointers.get(n) or ("fp32" if n in floats else "constexpr" if n in constexprs else "i64") for n in names}


# (what, kernel, pointer types, float scalars, constexprs, launch options): the GPU launch rules' shapes
_SPARSE_PTRS = {"q_ptr": "*bf16", "cache_ptr": "*u8", "idx_ptr": "*i32", "len_ptr": "*i32", "x_cache_ptr": "*u8",
                "x_idx_ptr": "*i32", "x_len_ptr": "*i32", "sink_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32"}
_SPARSE_CONST = dict(HAS_LEN=True, HAS_EXTRA=True, HAS_X_LEN=True, HAS_SINK=True, BLOCK_N=64, KEYS_PER_SPLIT=128,
                     IEEE=False)
_COMPRESS_PTRS = {"u_ptr": "*fp32", "state_ptr": "*fp32", "pages_ptr": "*i32", "seq_lens_ptr": "*i32",
                  "bias_ptr": "*fp32", "normw_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                  "pooled_ptr": "*fp32", "sumsq_ptr": "*fp32", "count_ptr": "*i32"}
KERNELS = {
    "dsv4 sparse decode, one split, 64 heads": (
        _dsv4_sparse_decode_kernel, _SPARSE_PTRS, ("sm_scale",), dict(_SPARSE_CONST, FINAL=True, BLOCK_H=64),
        dict(num_warps=8, num_stages=2)),
    "dsv4 sparse decode, a split's partial, 16 heads": (
        _dsv4_sparse_decode_kernel, dict(_SPARSE_PTRS, out_ptr="*fp32"), ("sm_scale",),
        dict(_SPARSE_CONST, FINAL=False, BLOCK_H=16, BLOCK_N=32), dict(num_warps=8, num_stages=2)),
    "split-K combine": (
        _splitk_combine_kernel, {"part_o_ptr": "*fp32", "part_m_ptr": "*fp32", "sink_ptr": "*fp32", "out_ptr": "*bf16",
                                 "lse_ptr": "*fp32"}, (),
        dict(SPLITS=4, D=512, BLOCK_H=16, HAS_SINK=True, HAS_LSE=True), dict(num_warps=4)),
}


def _compress(ratio: int, d: int, out: str, store: int = 0, preshuffle: int = 0, batch: int = 1, prefill: bool = False):
    """dsv4-fused-compress's kernels at ``compress.launch_rule``'s GPU launch: decode (plan pages) or
    the prefill over SGLang's plan (``prefill``); rows into ``out`` (STORE 0), or quantised into the
    compressed cache (1: V4, 2: indexer)."""
    rule = launch_rule(ratio, d, prefill=prefill, batch=batch)
    constexprs = dict(RATIO=ratio, D=d, LOG2_D=d.bit_length() - 1, SPLIT=rule.split, BK=rule.rows_per_tile,
                      ROTATE=d == 128, STORE=store, PRESHUFFLE=preshuffle)
    if not prefill:
        constexprs.update(N_PAGES=2 if ratio == 4 else 1, PREV_CUR=True)
    sink = dict(out_ptr=out, cache_ptr=out, fp8_ptr=out, wide_ptr=out, loc_ptr="*i32") if not store else dict(
        out_ptr="*fp32", cache_ptr="*u8", fp8_ptr="*fp8e4nv", wide_ptr="*bf16" if store == 1 else "*fp32", loc_ptr="*i64")
    pointers = dict(_COMPRESS_PTRS, **sink)
    if prefill:
        del pointers["pages_ptr"], pointers["seq_lens_ptr"]
        pointers["blocks_ptr"] = "*i32"
    return _dsv4_compress_prefill_paged_kernel if prefill else _dsv4_compress_decode_kernel, pointers, ("eps",), \
        constexprs, dict(num_warps=rule.num_warps)


# dsv4-fused-compress's shapes: the attention compressor (d 512) writes bf16 rows, the indexer's (d 128,
# rotated) fp32; or each stores into its cache in the same launch (the V4 layout; the indexer's, token-major
# or preshuffled in 16 x 16 tiles as aiter's paged MQA reads it)
KERNELS.update({f"dsv4 compress decode, ratio {r}, d {d} ({'indexer' if d == 128 else 'attention'}), plan pages":
                _compress(r, d, "*fp32" if d == 128 else "*bf16") for r in (4, 128) for d in (512, 128)})
KERNELS.update({f"dsv4 compress decode, ratio {r}, d 512, into the V4 cache": _compress(r, 512, "", 1)
                for r in (4, 128)})
KERNELS["dsv4 compress decode, ratio 4, d 512, into the V4 cache, batch 16+ (one program a block)"] = \
    _compress(4, 512, "", 1, batch=16)
KERNELS.update({f"dsv4 compress decode, ratio 4, d 128, into the indexer cache (preshuffle {p})":
                _compress(4, 128, "", 2, p) for p in (0, 16)})

# Prefill over SGLang's own plan: each compressor into its cache (the V4 layout; the indexer's, token-major
# or preshuffled), then the kept rows' copy into the state (a row of 4d / 2d fp32: d 512 ratio 4, d 128 ratio 128)
KERNELS.update({f"dsv4 compress prefill (SGLang's plan), ratio {r}, d 512, into the V4 cache": _compress(
    r, 512, "", 1, prefill=True) for r in (4, 128)})
KERNELS.update({f"dsv4 compress prefill (SGLang's plan), ratio {r}, d 128, into the indexer cache (preshuffle {p})":
                _compress(r, 128, "", 2, p, prefill=True) for r, p in ((4, 0), (4, 16), (128, 0))})
KERNELS.update({f"dsv4 compress prefill, kept rows into the state, rows of {w}": (
    _dsv4_state_copy_kernel, {"u_ptr": "*fp32", "state_ptr": "*fp32", "writes_ptr": "*i32"}, (), dict(W=w),
    dict(num_warps=4)) for w in (2048, 256)})


def compile_all(arch: str) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_targets: run without TRITON_INTERPRET (an interpreted kernel cannot be compiled)")
    results = []
    for what, (kernel, pointers, floats, constexprs, options) in KERNELS.items():
        try:
            compiled = triton.compile(ASTSource(kernel, _signature(kernel, pointers, floats, constexprs), constexprs),
                                      target=TARGETS[arch], options=options)
            results.append(dict(kernel=what, arch=arch, ok=bool(compiled.asm), error=None))
        except Exception as e:  # noqa: BLE001 - the report is the point
            results.append(dict(kernel=what, arch=arch, ok=False, error=f"{type(e).__name__}: {str(e)[-400:]}"))
    return results


if __name__ == "__main__":
    for row in compile_all(sys.argv[1]):
        print(json.dumps(row))

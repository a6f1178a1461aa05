"""The decode paths ``sglang-hip-decode find-copies`` runs the redundant-copy finder on: the decode
harness's real sglang functions (the release this process imports), small shapes, on the CPU with the
torch providers (or the GPU when asked), unpatched or with the path's patch applied.

* ``nsa``: GLM-5 / DeepSeek-V3.2 NSA decode, ``forward_absorb_core`` → ``RadixAttention`` →
  ``NativeSparseAttnBackend.forward_decode`` (TileLang impl, fused RoPE branch; nsa-cat-skip); from
  0.5.13 the DSA backend (``testing.mla_decode_dsa``: the method the model's own dispatch picks, which
  on ROCm from 0.5.18 is ``forward_absorb_rocm_core``).
* ``mxfp4``: Kimi-K2 MXFP4 decode, the same absorb core with MXFP4 ``w_vc`` and a bf16 o_proj
  (the aiter MLA backend stand-in; mxfp4-vbmm-layout).
* ``indexer``: the NSA indexer's ``_get_q_k_bf16`` and ``_get_k_bf16`` with an in-place RoPE
  (indexer-rope-guard).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class PathSpec:
    patch: str  # the module under sglang_hip_decode.patches
    describe: str
    # (kind, op, file, function) of each copy the patch removes; per_call = how often per call
    removes: frozenset = frozenset()
    per_call: float = 0.0


LAYERS = 2
FORWARD_MLA = "sglang/srt/models/deepseek_common/attention_forward_methods/forward_mla.py"
PATHS = {
    "nsa": PathSpec("nsa_cat_skip", "NSA/DSA decode (what the model dispatches on ROCm: forward_absorb_core, from "
                                    "0.5.18 forward_absorb_rocm_core -> the sparse backend's forward_decode; tilelang "
                                    f"impl, fused RoPE), {LAYERS} layers, batch 3, 4 heads",
                    frozenset({("duplicate", "cat", "sglang/srt/layers/attention/utils.py", "concat_mla_absorb_q_general")}),
                    LAYERS),
    "mxfp4": PathSpec("mxfp4_vbmm_layout", "Kimi-K2 MXFP4 decode (forward_absorb_core, from 0.5.18 "
                                           "forward_absorb_rocm_core; aiter MLA stand-in, MXFP4 w_vc, bf16 o_proj), "
                                           f"{LAYERS} layers, batch 3, 4 heads",
                      frozenset({("relayout", "clone", FORWARD_MLA, "forward_absorb_core")}), LAYERS),
    "indexer": PathSpec("indexer_rope_guard", "NSA indexer _get_q_k_bf16 + _get_k_bf16 (in-place RoPE), 4 tokens, "
                                              "8 index heads"),
}


def _patch(kind: str):
    import importlib

    return importlib.import_module(f"sglang_hip_decode.patches.{PATHS[kind].patch}").PATCH


def applies(kind: str) -> tuple[bool, str]:
    """Whether ``kind``'s patch has edits on this process's sglang (else why not)."""
    from .releases import edits_here

    return edits_here(_patch(kind))


def _mla_call(kind: str, device: str, calls: int) -> tuple[Callable, Callable]:
    from ..patching import installed_release

    if (installed_release() or (0, 0, 0, 0)) >= (0, 5, 13, 0):  # the dsa_backend rename; 0.5.18+ ROCm core
        from .mla_decode_dsa import MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs
    else:
        from .mla_decode import MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs

    extra = dict(attention="aiter", w_vc="mxfp4", o_proj="bf16") if kind == "mxfp4" else {}
    case = MlaDecodeCase(batch=3, heads=4, topk=32, context=64, hidden=64, layers=LAYERS, device=device, **extra)
    gen = torch.Generator().manual_seed(1)
    path = MlaDecodePath(case, gen, import_sglang())
    x = make_inputs(case, gen)
    fresh = iter([x.clone() for _ in range(calls)])  # each call writes its caches: cloned before the finder runs
    return path.hip, lambda: path.step(next(fresh))


def _indexer_call(device: str) -> tuple[Callable, Callable]:
    from .nsa_indexer import IndexerCase, IndexerPath

    gen = torch.Generator().manual_seed(2)
    path = IndexerPath(IndexerCase(tokens=4, heads=8, q_lora_rank=64, hidden=64, device=device), gen)
    q_lora, x, positions = path.inputs(gen)

    def call():
        path.q_k(q_lora, x, positions)
        path.k(x, positions)

    return path.rotate_stand_in, call


def find_copies(kind: str, *, patched: bool, calls: int = 2, device: str = "cpu") -> dict:
    """Run ``kind``'s path ``calls`` times under the finder; the report as a dict."""
    from .. import patching
    from ..patching import installed_release
    from ..declare import format_release
    from .find_copies import RedundantCopyFinder

    if kind not in PATHS:
        raise ValueError(f"unknown path {kind!r}: one of {', '.join(PATHS)}")
    patch = _patch(kind)
    has_edits, why = applies(kind)
    release = installed_release()
    report = {"path": kind, "describe": PATHS[kind].describe, "sglang": format_release(release) if release else "?",
              "patched": patched, "patch": patch.name, "patch_note": "" if has_edits else why, "device": device}
    try:
        context, call = _indexer_call(device) if kind == "indexer" else _mla_call(kind, device, calls + 1)
    except (ImportError, AttributeError) as exc:  # the harness's modules or classes are not where it looks
        return dict(report, unavailable=f"the harness does not drive this path on sglang {report['sglang']} "
                                        f"({type(exc).__name__}: {exc})", patch_active=False, calls=0, rows=[], excluded=0)
    finder = RedundantCopyFinder()
    with context():
        with patching.applied(*((patch,) if patched and has_edits else ())):
            active = any(patch.name in patching.active_patches(t) for t in patch.targets)
            call()  # warm-up outside the finder: imports, lazily built tables
            with finder:
                for _ in range(calls):
                    with finder.call():
                        call()
    return dict(report, patch_active=active, calls=finder.calls, rows=finder.report(), excluded=len(finder.excluded))


def render(report: dict) -> str:
    """Text: one block per call site."""
    arm = ("patched" if report["patch_active"] else f"patched requested, but {report['patch_note']}") \
        if report["patched"] else "unpatched"
    if "unavailable" in report:
        return f"find-copies {report['path']}: {report['describe']}\nnot run: {report['unavailable']}"
    lines = [f"find-copies {report['path']}: {report['describe']}",
             f"sglang {report['sglang']}, {arm}, {report['calls']} calls on {report['device']}; "
             f"{len(report['rows'])} call site(s) with a redundant copy"
             + (f"; {report['excluded']} copy(ies) not redundant (overwritten later in the call)" if report["excluded"] else "")]
    for r in report["rows"]:
        where = r["site"] if r["in_upstream"] else f"{r['site']} (not in sglang)"
        lines += ["", f"{r['kind']}: {r['op']} {r['dtype']}{r['shape']} ({r['bytes']} B), {r['per_call']:g} per call",
                  f"  at {where}", f"  {'output equals' if r['kind'] == 'duplicate' else 'relays out'}: {r['twin']}"]
        lines += [f"    {frame}" for frame in r["stack"][:-1][-4:]]
    return "\n".join(lines)

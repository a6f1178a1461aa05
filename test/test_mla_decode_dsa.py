"""The MLA decode harness of sglang 0.5.13+ (``sglang_hip_decode.testing.mla_decode_dsa``): the real
upstream decode core, dispatched as a ROCm server dispatches it, against an independent fp64 reference.

Claims checked, for find-copies' two cases (``nsa``: DSA / TileLang, fused RoPE; ``mxfp4``: Kimi-K2 on
the aiter MLA backend with MXFP4 ``w_vc``):
* upstream's dispatch picks ``forward_absorb_core`` (0.5.13-0.5.17) or ``forward_absorb_rocm_core``
  (0.5.18+, ``forward_mla_rocm.py`` present) for every layer, and that core ran: the fused RoPE/cache
  kernel, the attention kernel (and the MXFP4 v-bmm) recorded one call per layer;
* with ``SGLANG_ROCM_FUSED_DECODE_MLA`` on, these backends still do not reach the fused-RoPE ROCm core;
* outputs: right shape, finite, equal to a fp64 reference of RoPE -> sparse attention over the top-k
  slots -> v-bmm -> o_proj (within bf16 / MXFP4 rounding); the new token's KV-cache row is written;
* DSA decode hands the kernel the fused kernel's q_cat itself (upstream's cat-skip: no copy).
"""

from __future__ import annotations

import pytest
import torch

from sglang_hip_decode.declare import format_release
from sglang_hip_decode.patching import installed_release

RELEASE = installed_release()
if RELEASE is None or RELEASE < (0, 5, 13, 0):
    pytest.skip(f"mla_decode_dsa drives sglang >= 0.5.13 (the dsa_backend rename); installed: "
                f"{format_release(RELEASE) if RELEASE else 'unknown'} (mla_decode covers it)", allow_module_level=True)

from sgl_hip_kernels.standins.mxfp4_ref import mxfp4_dequant_ref, mxfp4_quant_ref  # noqa: E402

from sglang_hip_decode.testing.mla_decode_dsa import (  # noqa: E402
    MlaDecodeCase, MlaDsaDecodePath, import_sglang, make_inputs,
)

CASES = {
    "nsa": dict(),
    "mxfp4": dict(attention="aiter", w_vc="mxfp4", o_proj="bf16"),
}


@pytest.fixture(scope="module")
def sg():
    return import_sglang()


def build(kind, sg, seed=1):
    case = MlaDecodeCase(batch=3, heads=4, topk=32, context=64, hidden=64, layers=2, **CASES[kind])
    gen = torch.Generator().manual_seed(seed)
    path = MlaDsaDecodePath(case, gen, sg)
    return path, make_inputs(case, gen)


def _rope(t, cos, sin):
    """GPT-J (interleaved pairs) RoPE in fp64: cos/sin (B, D/2)."""
    t = t.double()
    a, b = t[..., 0::2], t[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.empty_like(t)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
    return out


def reference(path, x):
    """Per layer: (output (B, hidden), the new token's KV-cache row (B, 576)), in fp64."""
    case, pos = path.case, x.positions.long()
    n_slots = x.kv_caches[0].shape[0]
    results = []
    for layer, cache in zip(path.layers, x.kv_caches):
        cos = layer.rotary_emb.cos_cache.reshape(layer.rotary_emb.cos_cache.shape[0], -1)[pos].double()
        sin = layer.rotary_emb.sin_cache.reshape(layer.rotary_emb.sin_cache.shape[0], -1)[pos].double()
        q = torch.cat([x.q_nope_out.double(), _rope(x.q_pe, cos, sin)], -1)  # (B, H, 576)
        new_row = torch.cat([x.k_nope.double(), _rope(x.k_pe, cos, sin)], -1)[:, 0]  # (B, 576)
        kv = cache.double().reshape(n_slots, -1)
        attn = torch.zeros(case.batch, case.heads, case.kv_lora_rank, dtype=torch.float64)
        for b in range(case.batch):
            idx = x.topk_indices[b].long()
            rows = kv[idx[idx >= 0]]
            weights = torch.softmax(q[b] @ rows.T * layer.attn_mqa.scaling, -1)
            attn[b] = weights @ rows[:, : case.kv_lora_rank]
        if case.w_vc == "mxfp4":
            w = mxfp4_dequant_ref(layer.w_vc.transpose(1, 2), layer.w_scale_v.transpose(1, 2)).double()  # (H, V, K)
            a = mxfp4_dequant_ref(*mxfp4_quant_ref(attn.to(torch.bfloat16))).double()  # the GEMM's activation quant
            y = torch.einsum("bhk,hvk->bhv", a, w)
        else:
            y = torch.einsum("bhk,hkv->bhv", attn, layer.w_vc.double())
        results.append((y.reshape(case.batch, -1) @ layer.o_proj.dense.double().T, new_row))
    return results


def run_twice(path, x):
    with path.hip():
        return [(xi, path.step(xi)) for xi in (x.clone(), x.clone())]


@pytest.mark.parametrize("kind", list(CASES))
def test_the_real_core_runs_and_matches_the_reference(sg, kind):
    path, x = build(kind, sg)
    runs = run_twice(path, x)
    layers = path.case.layers
    core = "forward_absorb_rocm_core" if sg.fmr is not None else "forward_absorb_core"
    method = "MLA_ROCM" if sg.fmr is not None else "MLA"
    assert path.methods == [(i, method, core) for _ in runs for i in range(layers)]
    impl = "tilelang" if kind == "nsa" else "aiter-mla"
    assert [k for k, _ in path.record.kernel_q] == [impl] * (2 * layers)
    assert len(path.record.q_cat_ptr) == 2 * layers and path.record.split_calls == []
    assert len(path.record.gemm_out) == (2 * layers if kind == "mxfp4" else 0)
    if kind == "nsa":  # decode hands the kernel q_cat itself, not a copy of it
        assert [q.data_ptr() for _, q in path.record.kernel_q] == path.record.q_cat_ptr
    ref = reference(path, x)
    for xi, outs in runs:
        assert len(outs) == layers
        for out, cache, (want, row) in zip(outs, xi.kv_caches, ref):
            assert out.shape == (path.case.batch, path.case.hidden) and out.dtype == torch.bfloat16
            assert torch.isfinite(out.float()).all()
            err = (out.double() - want).abs().max().item()
            assert err <= 0.03 * want.abs().max().item(), (kind, err, want.abs().max().item())
            written = cache.reshape(cache.shape[0], -1)[xi.out_cache_loc.long()].double()
            torch.testing.assert_close(written, row, rtol=1e-2, atol=1e-2)
    assert torch.equal(runs[0][1][0], runs[1][1][0])  # deterministic, and no state left between calls


@pytest.mark.parametrize("kind", list(CASES))
def test_fused_decode_mla_env_does_not_reach_the_fused_rope_core(sg, kind):
    path, x = build(kind, sg)
    for layer in path.layers:  # what SGLANG_ROCM_FUSED_DECODE_MLA=1 sets at __init__
        layer.rocm_fused_decode_mla = True
    with path.hip():
        path.step(x.clone())
    assert {m for _, m, _ in path.methods} == {"MLA_ROCM" if sg.fmr is not None else "MLA"}

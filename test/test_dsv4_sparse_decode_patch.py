"""dsv4-sparse-decode on the installed release's real DSV4 HIP backend (test_releases runs this file on
0.5.13.post1 and 0.5.23; on 0.5.11 / 0.5.12.post1 it skips: no DeepSeek-V4 there).

The patch is a kernel swap (accuracy-equivalent, not bit-identical: its header), so parity is
against references, through ``DeepseekV4HipRadixBackend.forward`` (``sglang_hip_decode.testing.dsv4_attention``):

* CPU (interpreter, fp32): upstream's method hands its FlashMLA call to an fp64 reference of the
  contract (the entrypoint answered by ``reference_call``): that equals the case's own fp64
  reference (so the recorded call is the case); patched, the method calls ours and never the
  entrypoint, and ours is within 2x torch's own fp32 error of the fp64 reference; SWA only, ratio 4
  and ratio 128, batch 1 / 3 / 8.
* What ours does not implement keeps upstream's call, once, with what upstream hands it: prefill
  (extend), and from 0.5.22 a compressed cache that is not the 584 B/token layout; the guard
  declines every input the kernel itself refuses (dtypes, strides, shapes of indices, lengths, sink,
  cache pages), so a decode step never meets an error of ours. From 0.5.22, an
  ``inv_rope`` runs upstream's standalone inverse RoPE on our output.
* GPU (bf16): patched vs upstream's own Triton kernel (``SGLANG_HACK_FLASHMLA_BACKEND=triton``) on the
  same inputs: ours within 2x torch's bf16 error of fp64 and no farther from it than upstream, in
  the max and in the mean error (10% slack for the order of bf16 roundings).
"""

from __future__ import annotations

import pytest
import torch

from patch_fixtures import edits_here
from sglang_hip_decode import patching
from sglang_hip_decode.patches.dsv4_sparse_decode import PATCH

_APPLIES, _WHY = edits_here(PATCH)
if not _APPLIES:
    pytest.skip(_WHY, allow_module_level=True)

from sglang_hip_decode.testing.dsv4_attention import (  # noqa: E402
    Dsv4AttentionCase, Dsv4AttentionPath, import_sglang, make_inputs,
)

NEW_LAYOUT = patching.installed_release() >= (0, 5, 22, 0)


@pytest.fixture(scope="module")
def sg():
    return import_sglang()


def build(sg, seed=0, device="cpu", **kw):
    case = Dsv4AttentionCase(**kw)
    x = make_inputs(case, torch.Generator().manual_seed(seed), device)
    return Dsv4AttentionPath(case, x, sg)


def err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_patched_decode_within_twice_torchs_error_and_upstream_call_is_the_case(sg, ratio, batch):
    path = build(sg, seed=batch, ratio=ratio, batch=batch)
    ref = path.reference()
    with path.kernel("reference"):
        upstream = path.run()
        assert len(path.calls) == 1
        with patching.applied(PATCH):
            assert patching.is_applied(PATCH)
            ours = path.run()
        assert len(path.calls) == 1, "patched, the decode must not reach upstream's entrypoint"
    assert ours.shape == upstream.shape == (batch, path.case.heads, 512) and ours.dtype == upstream.dtype
    assert torch.equal(upstream, ref.to(upstream.dtype))  # the call upstream made is the case the reference computes
    torch_err = err(path.reference(torch.float32), ref)
    assert 0 < err(ours, ref) <= 2 * torch_err, (err(ours, ref), torch_err)


@pytest.mark.parametrize("ratio", [0, 4])
def test_prefill_keeps_upstreams_call(sg, ratio):
    path = build(sg, ratio=ratio, mode="extend")
    with path.kernel("reference"):
        upstream = path.run()
        with patching.applied(PATCH):
            patched = path.run()
    assert len(path.calls) == 2  # once unpatched, once patched: ours declined the extend batch
    assert torch.equal(upstream, patched)
    assert all(c["q"].shape == (path.case.batch, 1, path.case.heads, 512) for c in path.calls)


def recorded_call(sg):
    """A ratio-4 decode whose FlashMLA call upstream's method made (unpatched): (path, call, forward batch)."""
    path = build(sg, ratio=4, batch=3)
    with path.kernel("reference"):
        path.run()
    (call,) = path.calls
    return path, call, path.forward_batch()


def _kernel_args(call):
    k, x = call["k_cache"], call.get("extra_k_cache")
    return dict(q=call["q"], k_cache=k, indices=call["indices"], block_size=k.shape[1],
                sm_scale=call["softmax_scale"], topk_length=call.get("topk_length"), attn_sink=call.get("attn_sink"),
                extra_k_cache=x, extra_indices=call.get("extra_indices_in_kvcache"),
                extra_block_size=x.shape[1], extra_topk_length=call.get("extra_topk_length"))


_OFF_CONTRACT = {  # one input the kernel refuses, as the call could carry it
    "indices int64": lambda c: c.update(indices=c["indices"].long()),
    "indices with a strided last dim": lambda c: c.update(indices=c["indices"].repeat_interleave(2, -1)[..., ::2]),
    "indices of another batch": lambda c: c.update(indices=c["indices"][:1]),
    "lengths int64": lambda c: c.update(topk_length=c["topk_length"].long()),
    "extra lengths strided": lambda c: c.update(
        extra_topk_length=c["extra_topk_length"].repeat_interleave(2)[::2]),
    "extra indices int64": lambda c: c.update(extra_indices_in_kvcache=c["extra_indices_in_kvcache"].long()),
    "sink bf16": lambda c: c.update(attn_sink=c["attn_sink"].bfloat16()),
    "sink for other heads": lambda c: c.update(attn_sink=c["attn_sink"][:-1]),
    "cache pages with a gap between tokens": lambda c: c.update(
        k_cache=c["k_cache"].repeat_interleave(2, 1)[:, ::2]),
    "cache as int16": lambda c: c.update(k_cache=c["k_cache"].view(torch.int16).repeat_interleave(2, -1)),
}


def test_calls_off_the_kernels_contract_keep_upstreams_call(sg):
    """The patch's guard declines every call its kernel would refuse (never an error of ours in a
    decode step): each variant below is first shown to be refused by ``sparse_decode`` itself."""
    from sglang_hip_decode.dsv4_calls import sparse_decode_applies
    from sgl_hip_kernels.dsv4 import sparse_decode

    _, call, fb = recorded_call(sg)
    assert sparse_decode_applies(fb, call) and call["attn_sink"] is not None and call["topk_length"] is not None
    assert call["extra_topk_length"] is not None
    sparse_decode(**_kernel_args(call))  # the recorded call as it is: accepted
    for what, change in _OFF_CONTRACT.items():
        bad = dict(call)
        change(bad)
        with pytest.raises(ValueError):
            sparse_decode(**_kernel_args(bad))
        assert not sparse_decode_applies(fb, bad), what
    assert len(_OFF_CONTRACT) == 10


def test_fnuz_gpus_debug_backends_pinned_splits_keep_upstreams_call(sg, monkeypatch):
    """What the kernel's numbers would not match keeps upstream's kernel: gfx942's e4m3fnuz cache (the
    kernel reads e4m3fn), upstream's ``torch`` / ``comparison`` debugging backends, 0.5.22+'s pinned
    split count (deterministic inference), a softmax scale that is not a number."""
    import types

    from sglang_hip_decode import dsv4_calls

    path, call, fb = recorded_call(sg)
    assert dsv4_calls.sparse_decode_applies(fb, call, "tilelang") and dsv4_calls.sparse_decode_applies(fb, call, "auto")
    for debug in ("torch", "comparison"):
        assert not dsv4_calls.sparse_decode_applies(fb, call, debug)
    assert not dsv4_calls.sparse_decode_applies(fb, dict(call, softmax_scale=None))
    # The FP8 flavour, from the arch name as HIP reports it (gfx942 fnuz; gfx950 and CUDA OCP).
    for arch, hip, fnuz in (("gfx942:sramecc+:xnack-", "6.4", True), ("gfx950:sramecc+:xnack-", "6.4", False),
                            ("", None, False)):
        dsv4_calls._fp8_is_fnuz.cache_clear()
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, a=arch: types.SimpleNamespace(gcnArchName=a))
        assert dsv4_calls._kernel_reads_this_fp8(types.SimpleNamespace(device=torch.device("cuda", 0))) is not fnuz
    dsv4_calls._fp8_is_fnuz.cache_clear()
    monkeypatch.undo()
    # Deterministic inference (0.5.22+): upstream pins 4 splits; the patched backend then calls upstream.
    monkeypatch.setattr(sg.flash, "hip_attn_kv_splits", lambda: 4, raising=False)
    assert not dsv4_calls.sparse_decode_applies(fb, call)
    path.calls.clear()
    with path.kernel("reference"):
        with patching.applied(PATCH):
            path.run()
    assert len(path.calls) == 1, "pinned splits: the patched decode must make upstream's call"
    monkeypatch.setattr(sg.flash, "hip_attn_kv_splits", lambda: 0, raising=False)
    assert dsv4_calls.sparse_decode_applies(fb, call)


@pytest.mark.skipif(not NEW_LAYOUT, reason="aiter_sparse reaches the backend from 0.5.22")
def test_aiter_sparse_folded_indices_reach_ours(sg, monkeypatch):
    """gfx950's default on 0.5.22+ (``aiter_sparse``): upstream folds the lengths into the index lists
    (positions past a row's length become -1) before the call; ours gets those lists, with the
    lengths, and computes the same attention (32 heads: past upstream's swapab branch)."""
    monkeypatch.setattr(sg.hip, "resolve_hip_flashmla_backend", lambda *a, **k: "aiter_sparse")
    path = build(sg, seed=7, ratio=4, batch=3, heads=32)
    ref = path.reference()
    with path.kernel("reference"):
        upstream = path.run()
        (call,) = path.calls
        with patching.applied(PATCH):
            ours = path.run()
        assert len(path.calls) == 1, "patched, the decode must not reach upstream's entrypoint"
    lengths, idx = call["topk_length"].long(), call["indices"]
    past = torch.arange(idx.shape[-1]) >= lengths[:, None, None]
    assert past.any() and (idx[past] == -1).all(), "upstream did not fold the lengths (not the aiter_sparse path)"
    assert torch.equal(upstream, ref.to(upstream.dtype))
    torch_err = err(path.reference(torch.float32), ref)
    assert 0 < err(ours, ref) <= 2 * torch_err, (err(ours, ref), torch_err)


@pytest.mark.skipif(not NEW_LAYOUT, reason="the compressed cache has one layout before 0.5.22")
def test_another_compressed_layout_keeps_upstreams_call(sg):
    path = build(sg, ratio=4, extra_bytes=600)  # a stand-in for a V4.1 layout: not 584 B/token
    with path.kernel("zeros"):
        with patching.applied(PATCH):
            out = path.run()
    assert len(path.calls) == 1 and path.calls[0]["extra_k_cache"].shape[-1] == 600
    assert not out.any()


@pytest.mark.skipif(not NEW_LAYOUT, reason="inv_rope reaches the backend from 0.5.22")
def test_inv_rope_runs_upstreams_standalone_inverse_rope_on_our_output(sg, monkeypatch):
    path = build(sg, ratio=4)
    seen = []

    def inverse(out, inv_rope):
        seen.append((out, inv_rope))
        out[..., -64:] = 0  # observable: the returned output is the one it was handed

    monkeypatch.setattr(sg.flash, "_apply_inverse_rope", inverse)
    inv_rope = (torch.zeros(8, 64), torch.zeros(path.case.batch, dtype=torch.int64))
    with path.kernel("reference"):
        with patching.applied(PATCH):
            out = path.run(inv_rope=inv_rope)
    assert not path.calls and len(seen) == 1 and seen[0][1] is inv_rope
    assert seen[0][0].shape == (path.case.batch, 1, path.case.heads, 512)
    ref = path.reference()
    assert not out[..., -64:].any() and err(out[..., :-64], ref[..., :-64]) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("batch", [1, 16, 64])
@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_gpu_patched_vs_upstreams_triton_kernel(sg, ratio, batch):
    path = build(sg, seed=batch, device="cuda", ratio=ratio, batch=batch, heads=64, dtype=torch.bfloat16,
                 swa_topk=128, extra_topk=512 if ratio == 4 else 64, swa_pages=8, extra_pages=16)
    ref = path.reference()
    with path.kernel("triton"):
        upstream = path.run()
        with patching.applied(PATCH):
            ours = path.run()
    assert len(path.calls) == 1
    torch_err = err(path.reference(torch.bfloat16), ref)
    e_ours, e_up = err(ours, ref), err(upstream, ref)
    # The max is mostly the output's last bf16 rounding (often equal for both): the mean error sees
    # a small systematic difference the max hides.
    m_ours, m_up = ((t.double() - ref).abs().mean().item() for t in (ours, upstream))
    print(f"ratio {ratio} batch {batch}: max err ours {e_ours:.3e} upstream {e_up:.3e} torch bf16 {torch_err:.3e}; "
          f"mean err ours {m_ours:.3e} upstream {m_up:.3e}")
    assert e_ours <= 2 * torch_err and e_ours <= 1.1 * e_up, (e_ours, e_up, torch_err)
    assert m_ours <= 1.1 * m_up, (m_ours, m_up)


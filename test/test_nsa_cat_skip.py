"""nsa-cat-skip parity: the real 0.5.11 forward_absorb_core -> RadixAttention -> forward_decode,
unpatched then patched, on identical inputs (``sglang_hip_decode.testing.mla_decode``; kernels from the provider table).

Claims checked:
* decode (tilelang, aiter): attention output and KV-cache contents bit-identical; the patched run
  hands the kernel a q_all sharing storage with the fused kernel's q_cat (the unpatched one a fresh
  copy); the copy audit shows exactly one cat fewer per layer (B*H*576 elements) and no cat left;
* idle, extend and target-verify: unchanged (split form kept, same copies);
* flashmla_sparse, flashmla_kv, fa3 and trtllm: handed exactly the same tensors as before;
* forward_decode called with a split q on HIP still concatenates (q_all is only reused when whole);
* inputs are not modified; not applied off HIP unless forced.
"""

from __future__ import annotations

import pytest
import torch

from sgl_hip_kernels.testing.checks import assert_bits_equal
from sglang_hip_decode import patching
from sglang_hip_decode.testing.audit import CopyAudit
from sglang_hip_decode.testing.mla_decode import MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs
from sglang_hip_decode.patches.nsa_cat_skip import PATCH

from patch_fixtures import edits_here

if not edits_here(PATCH)[0]:  # the per-release runs (test_releases) count this skip
    pytest.skip(edits_here(PATCH)[1], allow_module_level=True)

SMALL = dict(heads=4, topk=32, context=64, hidden=64)  # heads not a multiple of 16


@pytest.fixture(scope="module")
def sg():
    return import_sglang()


def run_ab(case, rng, sg):
    """Run the path unpatched, then patched, from identical inputs. Returns both runs' results."""
    path = MlaDecodePath(case, rng, sg)
    x = make_inputs(case, rng)
    pristine = {k: getattr(x, k).clone() for k in ("q_pe", "k_pe", "q_nope_out", "k_nope", "positions", "topk_indices")}
    runs = {}
    with path.hip():
        for arm, patches in (("unpatched", ()), ("patched", (PATCH,))):
            with patching.applied(*patches):
                xi = x.clone()
                start_q, start_split = len(path.record.kernel_q), len(path.record.split_calls)
                start_cat = len(path.record.q_cat_ptr)
                with CopyAudit() as audit:
                    out = path.step(xi)
                runs[arm] = dict(
                    out=out, caches=xi.kv_caches, audit=audit, active=patching.active_patches(PATCH.targets[1]),
                    kernel_q=path.record.kernel_q[start_q:], split=path.record.split_calls[start_split:],
                    q_cat_ptr=path.record.q_cat_ptr[start_cat:],
                )
    assert runs["patched"]["active"] == ("nsa-cat-skip",) and runs["unpatched"]["active"] == ()
    for name, before in pristine.items():  # inputs not modified
        assert torch.equal(getattr(x, name), before), f"{name} was modified"
    return runs


def assert_bit_identical(a, b):
    assert len(a["out"]) == len(b["out"]) > 0 and len(a["caches"]) == len(b["caches"]) == len(a["out"])
    for x, y in zip(a["out"], b["out"]):
        assert_bits_equal(x, y, "attention output")
    for x, y in zip(a["caches"], b["caches"]):
        assert_bits_equal(x, y, "KV cache")


DECODE_CASES = [
    pytest.param(impl, kv, llama, k_scale, batch, id=f"{impl}-{kv}-{'llama' if llama else 'nollama'}-ks{k_scale}-b{batch}")
    for impl in ("tilelang", "aiter")
    for kv, llama in (("bf16", False), ("bf16", True), ("fp8_e4m3", False))
    for k_scale, batch in ((None, 1), (0.5, 5))
]


@pytest.mark.parametrize("impl, kv, llama, k_scale, batch", DECODE_CASES)
def test_decode_bit_identical_zero_copy_one_cat_fewer(rng, sg, impl, kv, llama, k_scale, batch):
    case = MlaDecodeCase(batch=batch, kv_dtype=kv, impl=impl, llama_4_scaling=llama, k_scale=k_scale, layers=2, **SMALL)
    runs = run_ab(case, rng, sg)
    before, after = runs["unpatched"], runs["patched"]
    assert_bit_identical(before, after)

    q_bytes = batch * case.heads * 576 * (1 if kv == "fp8_e4m3" else 2)
    # Unpatched: the kernel gets a fresh concatenation. Patched: q_cat itself, zero-copy.
    for arm in (before, after):
        assert len(arm["kernel_q"]) == len(arm["q_cat_ptr"]) == case.layers
    for (impl_seen, q), cat_ptr in zip(before["kernel_q"], before["q_cat_ptr"]):
        assert impl_seen == impl and q.data_ptr() != cat_ptr
    for (impl_seen, q), cat_ptr in zip(after["kernel_q"], after["q_cat_ptr"]):
        assert impl_seen == impl and q.data_ptr() == cat_ptr and q.is_contiguous()
    assert len(after["kernel_q"]) == case.layers

    removed = before["audit"].counts - after["audit"].counts
    assert removed == {"cat": case.layers}, f"{before['audit'].summary()} -> {after['audit'].summary()}"
    assert after["audit"].counts["cat"] == 0
    assert before["audit"].bytes["cat"] == case.layers * q_bytes
    assert after["audit"].total_bytes == before["audit"].total_bytes - case.layers * q_bytes
    assert not (after["audit"].counts - before["audit"].counts)  # nothing added
    assert before["audit"].kernels == after["audit"].kernels  # the same kernels, once per layer


def test_fp8_with_llama_4_scaling_is_not_an_input_0_5_11_accepts(rng, sg):
    # 0.5.11 scales the fp8 q_cat in place (q_nope_fused *= llama_4_scaling, an fp32 tensor); torch
    # refuses to promote float8 with float32 (on every device), so the original raises and there is
    # nothing to be bit-identical to. Documented, not hidden: the patch must raise the same way.
    case = MlaDecodeCase(batch=2, kv_dtype="fp8_e4m3", llama_4_scaling=True, **SMALL)
    path = MlaDecodePath(case, rng, sg)
    x = make_inputs(case, rng)
    with path.hip():
        with pytest.raises(RuntimeError, match="Float8"):
            path.step(x.clone())
        with patching.applied(PATCH):
            with pytest.raises(RuntimeError, match="Float8"):
                path.step(x.clone())


def test_idle_zero_tokens(rng, sg):
    case = MlaDecodeCase(batch=0, mode="IDLE", **SMALL)
    runs = run_ab(case, rng, sg)
    assert_bit_identical(runs["unpatched"], runs["patched"])
    for arm in runs.values():
        assert arm["out"][0].shape == (0, case.hidden)
        assert arm["kernel_q"] == []  # the base backend returns before forward_decode
        assert arm["audit"].counts["cat"] == 0


@pytest.mark.parametrize("mode", ["EXTEND", "TARGET_VERIFY"])
def test_extend_and_target_verify_keep_the_split_form(rng, sg, mode):
    case = MlaDecodeCase(batch=3, mode=mode, **SMALL)
    runs = run_ab(case, rng, sg)
    before, after = runs["unpatched"], runs["patched"]
    assert_bit_identical(before, after)
    for arm in (before, after):
        assert [c[0] for c in arm["split"]] == ["extend"]
        impl, q, q_rope = arm["split"][0]
        assert q_rope is not None and q.shape[-1] == 512 and q_rope.shape[-1] == 64
    (_, qa, ra), (_, qb, rb) = before["split"][0], after["split"][0]
    assert (qa.stride(), ra.stride()) == (qb.stride(), rb.stride())
    assert before["audit"].counts == after["audit"].counts


@pytest.mark.parametrize("impl", ["flashmla_sparse", "flashmla_kv", "fa3", "trtllm"])
def test_other_impls_are_handed_exactly_what_they_were_before(rng, sg, impl):
    case = MlaDecodeCase(batch=3, impl=impl, **SMALL)
    runs = run_ab(case, rng, sg)
    before, after = runs["unpatched"], runs["patched"]
    assert_bit_identical(before, after)
    assert before["audit"].counts == after["audit"].counts
    assert before["audit"].bytes == after["audit"].bytes
    if impl in ("fa3", "trtllm"):  # split-form consumers: same views, same strides
        (_, qa, ra), (_, qb, rb) = before["split"][0], after["split"][0]
        assert qa.shape == qb.shape and qa.stride() == qb.stride() and torch.equal(qa, qb)
        assert ra.shape == rb.shape and ra.stride() == rb.stride() and torch.equal(ra, rb)
    else:  # flashmla: still concatenated (CUDA-only impls keep the cat, as upstream 0.5.12 does)
        assert before["audit"].counts["cat"] == after["audit"].counts["cat"] == 1
        assert len(before["kernel_q"]) == len(after["kernel_q"]) == case.layers
        for (_, qa), (_, qb) in zip(before["kernel_q"], after["kernel_q"]):
            assert qa.shape == qb.shape and qa.stride() == qb.stride() and torch.equal(qa, qb)


@pytest.mark.parametrize("wrapper", ["hybrid", "tbo"])
def test_behind_hybrid_and_tbo_backends(rng, sg, wrapper):
    # forward_batch.attn_backend is SGLang's HybridAttnBackend / TboAttnBackend around the NSA
    # backend; the wrapper has no nsa_decode_impl, and the patch must still see what decodes.
    trtllm = MlaDecodeCase(batch=3, impl="trtllm", wrapper=wrapper, **SMALL)
    path = MlaDecodePath(trtllm, rng, sg)
    assert type(path.attn_backend).__name__ == {"hybrid": "HybridAttnBackend", "tbo": "TboAttnBackend"}[wrapper]
    x = make_inputs(trtllm, rng)
    handed = {}
    with path.hip():
        for arm, patches in (("unpatched", ()), ("patched", (PATCH,))):
            with patching.applied(*patches):
                start = len(path.record.trtllm_args)
                out = path.step(x.clone())
                handed[arm] = (out, path.record.trtllm_args[start:])
    (out_a, [(qa, ra)]), (out_b, [(qb, rb)]) = handed["unpatched"], handed["patched"]
    assert ra is not None and rb is not None, "trtllm must get the split form (q_rope), as in 0.5.11"
    assert qa.shape == qb.shape and qa.stride() == qb.stride() and ra.stride() == rb.stride()
    assert torch.equal(qa, qb) and torch.equal(ra, rb) and torch.equal(out_a[0], out_b[0])
    # tilelang behind the same wrapper: still the zero-copy q_cat, one cat fewer per layer.
    case = MlaDecodeCase(batch=3, impl="tilelang", wrapper=wrapper, layers=2, **SMALL)
    runs = run_ab(case, rng, sg)
    assert_bit_identical(runs["unpatched"], runs["patched"])
    assert (runs["unpatched"]["audit"].counts - runs["patched"]["audit"].counts) == {"cat": case.layers}
    assert len(runs["patched"]["kernel_q"]) == len(runs["patched"]["q_cat_ptr"]) == case.layers
    for (_, q), ptr in zip(runs["patched"]["kernel_q"], runs["patched"]["q_cat_ptr"]):
        assert q.data_ptr() == ptr


def test_the_decode_impl_is_the_server_arg(sg):
    # The patch reads get_global_server_args().nsa_decode_backend for the backend's impl: that holds
    # while NativeSparseAttnBackend sets nsa_decode_impl once, from server_args.nsa_decode_backend.
    import inspect
    import re

    source = inspect.getsource(sg.nb)
    assignments = re.findall(r"^\s*self\.nsa_decode_impl\b(?:\s*:[^=\n]+)?\s*=(?!=)\s*(.+)$", source, re.MULTILINE)
    assert assignments == ["model_runner.server_args.nsa_decode_backend"], assignments


def test_forward_decode_with_a_split_q_still_concatenates_on_hip(rng, sg):
    # A caller that passes q_rope (the non-fused path, or anyone else) must see 0.5.11's behaviour.
    case = MlaDecodeCase(batch=2, **SMALL)
    path = MlaDecodePath(case, rng, sg)
    x = make_inputs(case, rng)
    q = torch.randn(2, case.heads, 576, generator=rng).to(torch.bfloat16)
    layer = path.layers[0].attn_mqa
    results = []
    with path.hip():
        for patches in ((), (PATCH,)):
            with patching.applied(*patches):
                with CopyAudit() as audit:
                    out = path.backend.forward_decode(q[..., :512], None, None, layer, path.forward_batch(x),
                                                      save_kv_cache=False, q_rope=q[..., 512:], topk_indices=x.topk_indices)
                results.append((out, audit.counts["cat"], path.record.kernel_q[-1][1]))
    (out_a, cats_a, qa), (out_b, cats_b, qb) = results
    assert torch.equal(out_a, out_b) and cats_a == cats_b == 1
    assert qb.data_ptr() != q.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["tilelang", "aiter"])
@pytest.mark.parametrize("kv", ["bf16", "fp8_e4m3"])
def test_gpu_decode_bit_identical_with_triton_kernels(rng, sg, impl, kv):
    # Production-like: GLM-5 TP8 per-rank heads, top-k 2048, the portable Triton kernels.
    case = MlaDecodeCase(batch=64, heads=8, topk=2048, context=4096, kv_dtype=kv, impl=impl, layers=2, device="cuda")
    runs = run_ab(case, rng, sg)
    assert_bit_identical(runs["unpatched"], runs["patched"])
    assert runs["unpatched"]["audit"].counts["cat"] - runs["patched"]["audit"].counts["cat"] == case.layers
    assert len(runs["patched"]["kernel_q"]) == len(runs["patched"]["q_cat_ptr"]) == case.layers
    for (_, q), ptr in zip(runs["patched"]["kernel_q"], runs["patched"]["q_cat_ptr"]):
        assert q.data_ptr() == ptr

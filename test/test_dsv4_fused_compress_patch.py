"""dsv4-fused-compress on the installed release's real DSV4 compressor method (test_releases runs this
file on 0.5.13.post1 and 0.5.23; on 0.5.11 / 0.5.12.post1 it skips: no DeepSeek-V4 there).

The patch is a kernel swap (accuracy-equivalent, not bit-identical: its header). Through
``CompressorBackendMixin._forward_compress_all_in_one`` (``sglang_hip_decode.testing.dsv4_compress``;
upstream's JIT kernels are CUDA/HIP only, so on the CPU upstream's path runs the harness's torch
stand-ins of them, and both paths store with upstream's real HIP Triton store), one decode step
over a mixed batch (requests that emit a block, ones that do not, one on its first block, a padded
slot), ratio 4 and 128, attention (d 512) and indexer (d 128, rotated):

* patched, upstream's two kernels are not called and neither is its store: ours stores in its own
  launch; run again with our rows handed to upstream's store instead (``rows_to_upstreams_store``),
  the in-launch store's bytes equal upstream's real Triton store's for our rows (also in the
  preshuffled indexer layout of 0.5.17+), and upstream's store gets upstream's out_loc;
* the state after the step equals upstream's bit for bit (the plan's pages read in place: every
  row where upstream stores it, nothing else touched);
* each emitted vector is within 2x torch's own fp32 error of the fp64 contract (torch's own: the
  stand-in's fp32 computation of the same block), and the stored row reads back as that vector
  within one FP8 rounding; no cache slot but those changes (upstream's store of our rows also
  writes the dummy slot 0);
* a score channel that is -inf on every row: ours stores a finite row where upstream's pooling
  (as its kernels compute it) gives NaN, upstream's documented defect;
* prefill (dsv4-fused-compress-prefill, the other half): two chunks, the state after each equal to
  upstream's bit for bit, each block within 2x torch's error at its slot, the in-launch store's bytes
  equal to upstream's store's for our rows; each half runs only its own steps, and the two compose;
* what ours does not implement (the FP4 indexer, a later release's new argument) runs
  upstream's kernels, unchanged, as does a step whose cache our store cannot write (gfx94x's FP8,
  an unknown store kernel, a page too small).

GPU (``@gpu``): the same step against upstream's real JIT kernels (its planner, ``compress_forward``
and ``compress_norm_rope_store``, compiled for the GPU at first use): the state bit for bit, ours
within 2x torch's fp32 error, the in-launch store's bytes equal to upstream's Triton store's for our
rows, each stored row no farther from the fp64 contract than upstream's stored row plus one FP8
step; and the -inf channel: ours finite, upstream's real ratio-4 kernels store NaN rows.
"""

from __future__ import annotations

import pytest
import torch

from patch_fixtures import edits_here
from sglang_hip_decode import patching
from sglang_hip_decode.patches.dsv4_fused_compress import PATCH
from sglang_hip_decode.patches.dsv4_fused_compress_prefill import PATCH as PREFILL_PATCH

_APPLIES, _WHY = edits_here(PATCH)
if not _APPLIES:
    pytest.skip(_WHY, allow_module_level=True)

from sglang_hip_decode.testing.dsv4_compress import (Dsv4CompressCase, Dsv4CompressStep, Dsv4PrefillCase,  # noqa: E402
                                                     Dsv4PrefillChunks, import_sglang)


@pytest.fixture(scope="module")
def sg():
    return import_sglang()


CASES = {  # (ratio, head_dim, lengths after the step): emitting, not emitting, the first block, a padded slot (0)
    "c4 attention": (4, 512, (4, 7, 8, 1, 12, 0)),
    "c4 indexer": (4, 128, (4, 6, 16, 0, 13)),
    "c128 attention": (128, 512, (128, 127, 256, 0, 5)),
    "c128 indexer": (128, 128, (256, 130, 128)),
}


def step(sg, name, seed=0, device="cpu", **kw):
    ratio, d, lens = CASES[name]
    swa_page = 16 if ratio == 4 else 128
    return Dsv4CompressStep(Dsv4CompressCase(ratio=ratio, head_dim=d, lens=lens, swa_page=swa_page, **kw), sg, seed,
                            device)


def err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def within_torch_error(s, b, got, ref):
    """``got`` (fp32, or bf16 for the attention rows) within 2x torch's own fp32 error of the fp64
    contract plus one rounding of it to ``got``'s dtype: (ok, error, bound)."""
    torch_err = err(s.reference(b, torch.float32), ref)
    bound = 2 * torch_err + (ref.to(got.dtype).double() - ref).abs().max().item()
    return err(got, ref) <= bound, err(got, ref), bound


def fp8_half_step(v: torch.Tensor, indexer: bool) -> torch.Tensor:
    """Per element, half an e4m3 step of ``v`` at the store's scale (64-wide tiles with a power-of-two
    scale; the indexer: one fp32 scale per row): the most a round-to-nearest-even quantisation errs
    (a truncating one errs up to twice that); the V4 layout's last 64 (RoPE) are stored as bf16, exact
    from bf16 rows."""
    v = v.float()
    if indexer:
        scale = v.abs().amax().clamp(min=1e-8) / 448
        return torch.exp2(torch.floor(torch.log2((v.abs() / scale).clamp(min=2 ** -6)))) * scale / 16
    tiles = v[:448].reshape(7, 64)
    scale = torch.exp2(torch.ceil(torch.log2(tiles.abs().amax(1, keepdim=True).clamp(min=1e-8) / 448)))
    nope = (torch.exp2(torch.floor(torch.log2((tiles.abs() / scale).clamp(min=2 ** -6)))) * scale / 16).reshape(-1)
    return torch.cat([nope, torch.zeros(64)])


def assert_near_upstreams_row(s, ref, back, up_back, what):
    """CPU: our stored row reads back within two FP8 steps of upstream's (plus 2^-7 relative)."""
    assert ((back - up_back).abs() <= 2 * fp8_half_step(ref, s.indexer) + 2 ** -7 * ref.abs().float()).all(), what


def assert_no_farther_than_upstreams(s, ref, mine, theirs, what):
    """GPU: our stored row no farther from the fp64 contract than upstream's stored row, plus one FP8
    step (and 2^-8 relative)."""
    slack = 2 * fp8_half_step(ref, s.indexer) + 2 ** -8 * ref.abs().float()
    assert ((mine - ref.float()).abs() <= (theirs - ref.float()).abs() + slack + 1e-6).all(), what


def patched_twice(s, upstream="standin", patch=PATCH):
    """``s.run`` with ``patch`` applied, twice: storing in our launch, and handing our rows to
    upstream's store -> (what each run gave, the store calls of the second). Asserts upstream's
    kernels ran in neither and the first called no store."""
    with s.fresh_calls() as calls:
        with patching.applied(patch):
            assert patching.is_applied(patch)
            fused = s.run(upstream)
        assert not calls["compress_forward"] and not calls["norm_rope_store"], "patched: upstream's kernels ran"
        assert not calls["store"], "the store should ride in our launch"
    with s.fresh_calls() as calls:
        with patching.applied(patch), s.rows_to_upstreams_store():
            separate = s.run(upstream)
        assert not calls["compress_forward"] and not calls["norm_rope_store"]
        stores = list(calls["store"])
    return fused, separate, stores


def patched_both_ways(s, upstream="standin"):
    """The patched decode step both ways (``patched_twice``) -> (state, cache) of each and our rows."""
    fused, separate, (stored,) = patched_twice(s, upstream)
    assert torch.equal(stored["loc"].cpu(), s.out_loc) and stored["type"] == ("indexer" if s.indexer else "flashmla")
    return fused, separate, stored["rows"].cpu()


def assert_same_store(s, fused_cache, separate_cache):
    """Our in-launch store wrote, byte for byte, what upstream's store writes for our rows, at the
    emitting requests' slots, and nothing else (upstream's store also writes the zero rows of the
    requests that emit nothing to the dummy slot 0)."""
    emitted = {int(s.out_loc[b]) for b in s.emitting}
    for loc in range(s.slots):
        mine = s.slot_bytes(fused_cache, loc)
        assert torch.equal(mine, s.slot_bytes(separate_cache if loc in emitted else s.cache0, loc)), loc
    assert 0 not in emitted and len(emitted) == len(s.emitting) >= 1


@pytest.mark.parametrize("name", list(CASES))
def test_decode_step_state_equal_vectors_within_twice_torchs_error(sg, name):
    s = step(sg, name, seed=len(name))
    assert len(s.emitting) >= 2 and len(s.emitting) < len(s.case.lens)  # a mixed batch
    with s.fresh_calls() as calls:
        up_state, up_cache = s.run()
        assert len(calls["compress_forward"]) == 1 and len(calls["norm_rope_store"]) == 1 and not calls["store"]
    upstream_rows = s.upstream_rows
    (state, fused_cache), (state2, cache), ours = patched_both_ways(s)
    for st in (state, state2):
        assert torch.equal(st.view(torch.int32), up_state.view(torch.int32)), "state after the step differs from upstream's"
    assert not torch.equal(state.view(torch.int32), s.state0.view(torch.int32))  # the step did store its rows
    assert_same_store(s, fused_cache, cache)
    for i, b in enumerate(s.emitting):
        ref = s.reference(b)
        ok, e, bound = within_torch_error(s, b, ours[b], ref)
        assert ok and e > 0, (name, b, e, bound)
        assert within_torch_error(s, b, upstream_rows[i], ref)[0]  # the stand-in meets the same bound
        back = s.stored_row(cache, int(s.out_loc[b]))
        assert ((back - ours[b].float()).abs() <= fp8_half_step(ours[b], s.indexer)).all(), f"{name}: row {b}"
        up_back = s.stored_row(up_cache, int(s.out_loc[b]))
        assert_near_upstreams_row(s, ref, back, up_back, (name, b))
    idle = [b for b in range(len(s.case.lens)) if b not in s.emitting]
    assert idle and all(not ours[b].any() for b in idle), "a request that emits nothing must hand over a zero row"
    touched = {int(s.out_loc[b]) for b in s.emitting} | {0}
    changed = [loc for loc in range(s.slots) if not torch.equal(s.slot_bytes(cache, loc), s.slot_bytes(s.cache0, loc))]
    assert set(changed) <= touched and set(changed) >= touched - {0}, (changed, touched)
    assert all(torch.equal(s.slot_bytes(up_cache, loc), s.slot_bytes(s.cache0, loc))
               for loc in range(s.slots) if loc not in touched)


def test_preshuffled_indexer_cache_where_upstreams_store_uses_it(sg, monkeypatch):
    """Where upstream's store lays the indexer cache out in aiter's preshuffled tiles (its own
    ``aiter_can_use_preshuffle_paged_mqa``, here answered True; 0.5.17+), the in-launch store lays
    it out the same: every request emits, so the whole cache equals upstream's store of our rows."""
    from sglang_hip_decode import dsv4_calls

    module = dsv4_calls._triton_store_module()
    if not hasattr(module, "aiter_can_use_preshuffle_paged_mqa"):
        pytest.skip("this release's store has no preshuffled indexer layout")
    lens = tuple(4 * (1 + i % 5) for i in range(24))  # every request emits; slots up to 49 of a 64-slot page
    case = Dsv4CompressCase(ratio=4, head_dim=128, lens=lens, swa_page=16, page_size=64)
    s = Dsv4CompressStep(case, sg, seed=9)
    assert len(s.emitting) == 24 and max(int(x) % 64 for x in s.out_loc) >= 32  # past the first 16-token tiles
    with patching.applied(PATCH):
        _, plain_cache = s.run()
    monkeypatch.setattr(module, "aiter_can_use_preshuffle_paged_mqa", lambda: True)
    assert dsv4_calls.cache_store(dict(s.prepare(), head_dim=128)).preshuffle == module.INDEXER_K_CACHE_PRESHUFFLE_TILE
    (_, fused_cache), (_, cache), _ = patched_both_ways(s)
    assert torch.equal(fused_cache, cache), "the preshuffled bytes differ from upstream's store of our rows"
    assert not torch.equal(fused_cache, plain_cache)  # the layout did change


@pytest.mark.parametrize("name", ["c4 attention", "c128 indexer"])
def test_neg_inf_channel_finite_where_upstream_gives_nan(sg, name):
    """The stand-ins pool an all -inf channel as upstream's kernels compute it (0/0: NaN); ours is finite."""
    s = step(sg, name, seed=3, neg_inf_channel=True)
    with s.fresh_calls():
        s.run()
    upstream_rows = s.upstream_rows
    assert upstream_rows.isnan().any(), "upstream's pooling of an all -inf channel is 0/0 (its documented defect)"
    (_, fused_cache), (_, cache), ours = patched_both_ways(s)
    assert_same_store(s, fused_cache, cache)
    for b in s.emitting:
        ref = s.reference(b)
        assert ours[b].isfinite().all() and ref.isfinite().all()
        assert within_torch_error(s, b, ours[b], ref)[0]
        assert s.stored_row(fused_cache, int(s.out_loc[b])).isfinite().all()


PREFILL = {  # (ratio, head_dim, first chunks, second chunks, SWA page): a request that joins in the second
    # chunk, chunks over two SWA pages, a block read from the ring chunk 0 left, a second chunk without a block
    "c4 attention": (4, 512, (10, 0, 2, 13, 5), (6, 13, 21, 3, 1), 16),
    "c4 indexer": (4, 128, (10, 0, 2, 13, 5), (6, 13, 21, 3, 1), 16),
    "c128 attention": (128, 512, (100, 0, 130), (60, 129, 3), 128),
    "c128 indexer": (128, 128, (100, 0, 130), (60, 129, 3), 128),
}


def chunks(sg, name, seed=0, device="cpu", **kw):
    ratio, d, prefix, extend, swa_page = PREFILL[name]
    case = Dsv4PrefillCase(ratio=ratio, head_dim=d, prefix=prefix, extend=extend, swa_page=swa_page, **kw)
    return Dsv4PrefillChunks(case, sg, seed, device)


def block_within_torch_error(s, block, got):
    ref = s.block_reference(*block)
    torch_err = err(s.block_reference(*block, work=torch.float32), ref)
    bound = 2 * torch_err + (ref.to(got.dtype).double() - ref).abs().max().item()
    return err(got, ref) <= bound, err(got, ref), bound


def patched_chunks_both_ways(s, upstream="standin"):
    """Both chunks patched both ways (``patched_twice``) -> (after each chunk, as run gives it) of
    each, and per chunk our rows and their slots."""
    fused, separate, stores = patched_twice(s, upstream, PREFILL_PATCH)
    assert len(stores) == 2 and all(st["type"] == ("indexer" if s.indexer else "flashmla") for st in stores)
    return fused, separate, [(st["rows"].cpu(), st["loc"].cpu()) for st in stores]


@pytest.mark.parametrize("name", list(PREFILL))
def test_chunked_prefill_state_equal_blocks_within_twice_torchs_error(sg, name):
    """Two prefill chunks (SGLang's plan; the state starts NaN): after each, the state equals
    upstream's bit for bit (the blocks read the ring as it was, the kept rows land where upstream puts
    them); each block within 2x torch's fp32 error of the fp64 contract, at its own slot; the
    in-launch store writes upstream's store's bytes for our rows and nothing else; each stored row
    within one FP8 step of upstream's."""
    s = chunks(sg, name, seed=len(name))
    with s.fresh_calls() as calls:
        upstream = s.run()
        assert [c["decode"] for c in calls["compress_forward"]] == [False, False] and len(calls["norm_rope_store"]) == 2
        assert not calls["store"]
    upstream_rows = s.upstream_chunk_rows
    fused, separate, ours = patched_chunks_both_ways(s)
    stored_so_far = set()
    for c in (0, 1):
        blocks = s.chunk_blocks(c)
        assert len(blocks) >= 1 and len(ours[c][0]) == len(blocks) == len(upstream_rows[c])
        for state in (fused[c][0], separate[c][0]):
            assert torch.equal(state.view(torch.int32), upstream[c][0].view(torch.int32)), f"chunk {c}: the state differs"
        rows, loc = ours[c]
        assert loc.tolist() == [s.block_slot[b] for b in blocks]
        for j, block in enumerate(blocks):
            ok, e, bound = block_within_torch_error(s, block, rows[j])
            assert ok and e > 0, (name, c, block, e, bound)
            assert block_within_torch_error(s, block, upstream_rows[c][j])[0]  # the stand-in meets it too
            back, up_back = (s.stored_row(cache, s.block_slot[block]) for cache in (fused[c][1], upstream[c][1]))
            assert ((back - rows[j].float()).abs() <= fp8_half_step(rows[j], s.indexer)).all(), (name, block)
            ref = s.block_reference(*block)
            assert_near_upstreams_row(s, ref, back, up_back, (name, block))
        stored_so_far |= {s.block_slot[b] for b in blocks}
        for slot in range(s.slots):
            mine = s.slot_bytes(fused[c][1], slot)
            assert torch.equal(mine, s.slot_bytes(separate[c][1] if slot in stored_so_far else s.cache0, slot)), (c, slot)
    assert not torch.equal(fused[0][0].view(torch.int32), s.state0.view(torch.int32))


def test_chunked_prefill_neg_inf_channel_finite_where_upstream_gives_nan(sg):
    s = chunks(sg, "c4 indexer", seed=3, neg_inf_channel=True)
    with s.fresh_calls():
        upstream = s.run()
    assert any(rows.isnan().any() for rows in s.upstream_chunk_rows), "upstream's pooling of an all -inf channel is 0/0"
    fused, _, ours = patched_chunks_both_ways(s)
    for c in (0, 1):
        assert torch.equal(fused[c][0].view(torch.int32), upstream[c][0].view(torch.int32))
        assert len(s.chunk_blocks(c)) == len(ours[c][0]) >= 1
        for j, block in enumerate(s.chunk_blocks(c)):
            assert ours[c][0][j].isfinite().all() and block_within_torch_error(s, block, ours[c][0][j])[0]
            assert s.stored_row(fused[c][1], s.block_slot[block]).isfinite().all()


def test_each_half_runs_only_its_own_steps_and_both_compose(sg):
    """dsv4-fused-compress alone: a prefill chunk runs upstream's kernels; dsv4-fused-compress-prefill
    alone: a decode step does; both applied (one method edited in two places): both are ours."""
    chunked, decode = chunks(sg, "c4 indexer", seed=1), step(sg, "c4 indexer", seed=1)
    seen = []
    for patches, prefill_ours, decode_ours in (((PATCH,), False, True), ((PREFILL_PATCH,), True, False),
                                               ((PATCH, PREFILL_PATCH), True, True)):
        with patching.applied(*patches):
            assert all(patching.is_applied(p) for p in patches)
            for s, ours, upstream_calls in ((chunked, prefill_ours, 2), (decode, decode_ours, 1)):
                with s.fresh_calls() as calls:
                    s.run()
                assert len(calls["compress_forward"]) == (0 if ours else upstream_calls), ([p.name for p in patches], s)
                seen.append(ours)
    assert seen == [False, True, True, False, True, True]


def test_what_ours_does_not_implement_runs_upstreams_kernels(sg, monkeypatch):
    from sglang_hip_decode import dsv4_calls

    s = step(sg, "c4 indexer", seed=5)
    seen = []
    real = dsv4_calls.fused_compress_applies
    monkeypatch.setattr(dsv4_calls, "fused_compress_applies", lambda env: seen.append(dict(env)) or real(env))
    with s.fresh_calls() as calls:
        with patching.applied(PATCH):
            s.run()
        assert not calls["compress_forward"] and not calls["store"]
    (env,) = seen
    assert real(env) and dsv4_calls.cache_store(env) is not None
    # Where ours cannot store into that cache, cache_store says so and the step keeps upstream's kernels.
    cache = env["kv_cache"]
    no_store = {"a page too small": dict(kv_cache=cache[:, :-4]), "a bigger page size": dict(page_size=4 * env["page_size"]),
                "an int16 out_loc": dict(out_loc=env["out_loc"].to(torch.int16))}
    for what, change in no_store.items():
        assert dsv4_calls.cache_store(dict(env, **change)) is None, what
    assert len(no_store) == 3
    with monkeypatch.context() as m:  # gfx94x: e4m3fnuz caches
        m.setattr(dsv4_calls, "_kernel_reads_this_fp8", lambda t: False)
        assert dsv4_calls.cache_store(env) is None
    module = dsv4_calls._triton_store_module()
    with monkeypatch.context() as m:  # an indexer store kernel we do not know: its layout cannot be told
        m.setattr(module, "_triton_fused_store_indexer_kernel", object())
        assert dsv4_calls.cache_store(env) is None
    with monkeypatch.context() as m, s.fresh_calls() as calls:
        m.setattr(dsv4_calls, "cache_store", lambda env: None)
        with patching.applied(PATCH):
            s.run()
        assert len(calls["compress_forward"]) == 1 and len(calls["norm_rope_store"]) == 1 and not calls["store"]
    declined = {
        "a plan of another type": dict(plan=type("CompressorOnlinePlan", (), {"is_decode": True})()),
        "a prefill plan without its tables": dict(plan=type("CompressorPrefillPlan", (), {"is_decode": False})()),
        "the FP4 indexer": dict(use_fp4_indexer=True),
        "online ratio 128": dict(is_online=True),
        "a bf16 store": dict(bf16_store=True),
        "another layout": dict(kv_layout="v41"),
        "an argument a later release adds": dict(new_argument=1),
        "a bf16 state": dict(kv_score_buffer=env["kv_score_buffer"].bfloat16()),
        "bf16 rows": dict(kv_score_input=env["kv_score_input"].bfloat16()),
        "an external scale cache": dict(kv_scale_cache=torch.zeros(1)),
        "a rope cache": dict(rope_cache=(torch.zeros(1), torch.zeros(1))),
        "ratio 2": dict(compress_ratio=2),
        "a strided ape": dict(ape=env["ape"].repeat_interleave(2, -1)[..., ::2]),
        "rotation off for the indexer": dict(rotate=False),
        "an infinite eps": dict(norm=type("Norm", (), {"weight": env["norm"].weight, "variance_epsilon": float("inf")})()),
        "an empty batch": dict(kv_score_input=env["kv_score_input"][:0]),
    }
    for what, change in declined.items():
        assert not real(dict(env, **change)), what
    assert len(declined) == 16
    # Through the patched method: a declined step runs upstream's kernels, once, and stores nothing of ours.
    monkeypatch.setattr(dsv4_calls, "fused_compress_applies", lambda env: False)
    with s.fresh_calls() as calls:
        with patching.applied(PATCH):
            s.run()
        assert len(calls["compress_forward"]) == 1 and len(calls["norm_rope_store"]) == 1 and not calls["store"]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_patched_vs_upstreams_jit_kernels(sg, name):
    s = step(sg, name, seed=len(name), device="cuda")
    up_state, up_cache = s.run("real")
    (state, fused_cache), (state2, cache), ours = patched_both_ways(s, "real")
    for st in (state, state2):
        assert torch.equal(st.view(torch.int32), up_state.view(torch.int32)), "state after the step differs"
    assert_same_store(s, fused_cache, cache)  # bf16 rows on the GPU: the in-launch store = the Triton store
    for b in s.emitting:
        ref = s.reference(b)
        ok, e, bound = within_torch_error(s, b, ours[b], ref)
        assert ok, (name, b, e, bound)
        loc = int(s.out_loc[b])
        mine, theirs = s.stored_row(fused_cache, loc), s.stored_row(up_cache, loc)
        assert_no_farther_than_upstreams(s, ref, mine, theirs, (name, b))
        print(f"{name} row {b}: stored max err ours {err(mine, ref):.3e} upstream {err(theirs, ref):.3e}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["c4 attention", "c128 indexer"])
def test_gpu_neg_inf_channel(sg, name):
    """Ours stores finite rows within the bound. Upstream's real kernels: ratio 4 stores NaN rows (its
    documented defect); ratio 128 (indexer) stored finite rows on the H200 at 0.5.23, though its
    pooling computes 0/0 there too (printed, not asserted: where the NaN goes is not established)."""
    s = step(sg, name, seed=3, device="cuda", neg_inf_channel=True)
    _, up_cache = s.run("real")
    (_, fused_cache), _, ours = patched_both_ways(s, "real")
    nan_rows = [b for b in s.emitting if s.stored_row(up_cache, int(s.out_loc[b])).isnan().any()]
    print(f"{name}: upstream stored NaN in rows {nan_rows} of {s.emitting}")
    if s.case.ratio == 4:
        assert nan_rows, "upstream's real kernels pool an all -inf channel to 0/0 (its documented defect)"
    for b in s.emitting:
        assert s.stored_row(fused_cache, int(s.out_loc[b])).isfinite().all()
        assert within_torch_error(s, b, ours[b], s.reference(b))[0]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", list(PREFILL))
def test_gpu_chunked_prefill_vs_upstreams_jit_kernels(sg, name):
    """Two prefill chunks against upstream's real planner and JIT kernels: the stand-in planner's
    plan equals the real one byte for byte; after each chunk the state equals upstream's bit for bit;
    ours within 2x torch's fp32 error; the in-launch store's bytes equal upstream's Triton store's
    for our rows; each stored row no farther from the fp64 contract than upstream's stored row plus
    one FP8 step."""
    s = chunks(sg, name, seed=len(name), device="cuda")
    for c in (0, 1):
        mine, real = s.plan(c), s.real_plan(c)
        assert torch.equal(mine.plan_c.cpu(), real.plan_c.cpu()) and torch.equal(mine.plan_w.cpu(), real.plan_w.cpu()), c
    upstream = s.run("real")
    fused, separate, ours = patched_chunks_both_ways(s, "real")
    stored_so_far = set()
    for c in (0, 1):
        for state in (fused[c][0], separate[c][0]):
            assert torch.equal(state.view(torch.int32), upstream[c][0].view(torch.int32)), f"chunk {c}: the state differs"
        blocks = s.chunk_blocks(c)
        assert len(blocks) == len(ours[c][0]) >= 1
        stored_so_far |= {s.block_slot[b] for b in blocks}
        for slot in range(s.slots):  # our rows' bytes where stored, nothing anywhere else
            assert torch.equal(s.slot_bytes(fused[c][1], slot),
                               s.slot_bytes(separate[c][1] if slot in stored_so_far else s.cache0, slot)), (c, slot)
        for j, block in enumerate(blocks):
            ok, e, bound = block_within_torch_error(s, block, ours[c][0][j])
            assert ok, (name, c, block, e, bound)
            ref = s.block_reference(*block)
            mine, theirs = (s.stored_row(cache, s.block_slot[block]) for cache in (fused[c][1], upstream[c][1]))
            assert_no_farther_than_upstreams(s, ref, mine, theirs, (name, block))
            print(f"{name} chunk {c} block {block}: stored max err ours {err(mine, ref):.3e} upstream {err(theirs, ref):.3e}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["c4 attention", "c128 indexer"])
def test_gpu_chunked_prefill_with_the_planners_gpu_path(sg, name):
    """The planner's GPU-input path (lengths on the device, ``use_cuda_graph``: what prefill CUDA graphs
    and MTP use), the plan's rows in any order and padded to the chunk's tokens with invalid rows:
    after each chunk the state equals upstream's bit for bit, each block's stored row is no farther
    from the fp64 contract than upstream's plus one FP8 step, and no other cache slot changes."""
    s = chunks(sg, name, seed=7, device="cuda", gpu_planner=True)
    padded = s.real_plan(1)
    assert padded.plan_c.shape[0] == s.rows(1).shape[0] > len(s.chunk_blocks(1))  # padding rows present
    upstream = s.run("real")
    with patching.applied(PREFILL_PATCH), s.fresh_calls() as calls:
        fused = s.run("real")
        assert not calls["compress_forward"] and not calls["norm_rope_store"] and not calls["store"]
    stored, checked = set(), 0
    for c in (0, 1):
        assert torch.equal(fused[c][0].view(torch.int32), upstream[c][0].view(torch.int32)), f"chunk {c}: the state differs"
        for block in s.chunk_blocks(c):
            ref = s.block_reference(*block)
            mine, theirs = (s.stored_row(cache, s.block_slot[block]) for cache in (fused[c][1], upstream[c][1]))
            assert_no_farther_than_upstreams(s, ref, mine, theirs, (name, block))
            checked += 1
        stored |= {s.block_slot[b] for b in s.chunk_blocks(c)}
        for slot in set(range(s.slots)) - stored:
            assert torch.equal(s.slot_bytes(fused[c][1], slot), s.slot_bytes(s.cache0, slot)), (c, slot)
    assert checked == len(s.chunk_blocks(0)) + len(s.chunk_blocks(1)) >= 3

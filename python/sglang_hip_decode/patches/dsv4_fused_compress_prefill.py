"""dsv4-fused-compress-prefill: the DeepSeek-V4 KV compressor's prefill chunks on HIP run this project's fused compressor.

Kind: **a kernel swap, accuracy-equivalent, not bit-identical**, the prefill half of
``dsv4-fused-compress`` (whose header says what that means, how the layouts map and how the parity
tests check it), switched on its own because it measured slower: on the H200, one 8192-token chunk
per layer through SGLang's method, 0.70-0.90x upstream's JIT kernels (README, file
``benchmark/results/dsv4_fused_compress_prefill.h200.json``). Upstream's three launches of a chunk
(its prefill pool, its kept-row copy into the state ring, its norm-RoPE-store) become two of
``sgl_hip_kernels.dsv4.compress.compress_prefill_paged``, SGLang's own ``CompressorPrefillPlan`` read
in place: every block of the chunk pooled, normalised, rotated and stored into the compressed cache
at ``out_loc[ragged row]``, then the kept rows copied into the ring (after the blocks: a kept row
may land on a ring slot a block of the same chunk reads, which upstream's order also respects).

Where it acts (``sglang_hip_decode.dsv4_calls.fused_compress_prefill_call``): prefill plans of
compressor v2's ``_forward_compress_all_in_one`` on the paged (not online) state, with the same
conditions as the decode half (ratio 4 and 128, attention and indexer, fp32 rows and state, the V4
and indexer caches its in-launch store knows; a chunk of at most 65536 tokens: the plan's ragged
rows are 16-bit); anything else, and every decode step, runs upstream's kernels (or
``dsv4-fused-compress``'s, where that is on). Both halves edit the same method at different places
and compose.

Per release: one hunk, the same text on 0.5.13 ... 0.5.23, placed by the FP4 indexer's assert
(0.5.13+) and ending in the branch that views the paged state (the online branch never reaches it).
Opt-in, and not in the A/B runner's ``dsv4`` preset's default set (name it with ``--patches`` to
measure it).
"""

from ..declare import Edit, Hunk, Patch, Releases

MIXIN = "sglang.srt.layers.attention.dsv4.compressor_v2:CompressorBackendMixin"

# From the FP4 indexer's assert (0.5.13+; 0.5.12's method has the same paged branch without it, and no
# HIP path of ours) to the paged view of the state.
_PLACE = """
            assert head_dim == 128

        plan = self._get_paged_compress_metadata(compress_ratio)
        is_online = _use_online_compress(compress_ratio)
        if is_online:
            kv_score_buffer = kv_score_buffer.view(-1, 1, head_dim * 3)
        else:
            coff = 2 if is_overlap_compress(compress_ratio) else 1
            last_dim = 2 * head_dim * coff
            assert kv_score_buffer.shape[-1] == last_dim
            kv_score_buffer = kv_score_buffer.view(-1, compress_ratio, last_dim)
"""
_CALL = """
            # sglang-hip-decode dsv4-fused-compress-prefill: ours where it implements the chunk, else upstream's
            from sglang_hip_decode.dsv4_calls import fused_compress_prefill_call as _shd_fused_compress_prefill_call

            if _shd_fused_compress_prefill_call(dict(locals())):
                return
"""
_CHUNK = Hunk(before=_PLACE, after=_PLACE.rstrip("\n") + _CALL)  # the call goes after the view, in its branch


PATCH = Patch(
    name="dsv4-fused-compress-prefill",
    summary="DSV4 HIP compressor prefill chunks run this project's fused compressor over SGLang's plan, storing into "
            "the cache in its launch (accuracy-equivalent; slower on the H200)",
    gate="hip",
    default=False,
    releases=(
        Releases("0.5.11", "0.5.12.post1", not_applicable="no DeepSeek-V4 before 0.5.13"),
        Releases("0.5.13", None, edits=(Edit(f"{MIXIN}._forward_compress_all_in_one", (_CHUNK,)),)),
    ),
)

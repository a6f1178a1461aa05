"""dsv4-fused-compress: the DeepSeek-V4 KV compressor's decode step on HIP runs this project's fused compressor.

Kind: **a kernel swap, accuracy-equivalent, not bit-identical.** In decode, upstream's
``compress_forward`` (store the token's raw row in the state ring; pool an emitting request's
block) and ``compress_norm_rope_store`` (RMSNorm, RoPE, the indexer's Hadamard rotation, FP8
quantisation and the paged store) become one launch of ``sgl_hip_kernels.dsv4.compress_decode``:
the ring store, APE bias, pooling, RMSNorm, RoPE and rotation, then the FP8 quantisation and paged
store of the emitted rows into SGLang's compressed cache (``store=CacheStore(...)``). Prefill chunks
are the separate, opt-in ``dsv4-fused-compress-prefill`` (its header; it measured slower), through the
same call and store: ``compress_prefill_paged`` over SGLang's prefill plan. Stored rows are laid out and
rounded as upstream's HIP cache store ``fused_store_cache`` (the Triton kernel of ROCm) writes them:
the V4 layout (attention rows rounded to bf16 first, UE8M0 scales by ``ceil(log2)``, floor 1e-8) and
the indexer's (fp32 scale; preshuffled in aiter's 16 x 16 tiles exactly where upstream's store asks
``aiter_can_use_preshuffle_paged_mqa`` and gets yes, read from the store kernel's own parameters).
Where that in-launch store does not apply (``dsv4_calls.cache_store``: gfx94x, whose FP8 is
e4m3fnuz and whose fallback Triton store addresses in int32 up to 0.5.20; a release whose store
module or indexer store kernel is not one we know; a cache or slot dtype the ``CacheStore``
refuses), the step keeps upstream's kernels. Upstream's default path stores inside its JIT
norm-RoPE kernel with the same layout but a scale floor of 1e-4 on the tile's amax (the Triton
store's: 1e-8), which only a tile whose amax is below 1e-4 can tell, and an exactly rounded UE8M0
exponent where the Triton store's ``ceil(log2)`` may round a scale just above a power of two down
to it. Ours and upstream's compute in fp32 from the same rows, in another
order (other tiles and reductions), so the compressed vectors differ in the last bits and, through
the bf16 and FP8 roundings, the stored bytes may differ by one step. What that means, as the parity
test (``test/test_dsv4_fused_compress_patch.py``) checks it: on the real method of each release, the
state ring after the step equals upstream's bit for bit; the vector ours computes is within 2x
torch's own fp32 error of an fp64 reference of the compressor's contract; our in-launch store writes
the very bytes upstream's real Triton store writes for that vector (CPU and H200), which read back
as the vector within one FP8 rounding; no other cache slot changes. Prefill (the other patch): the
same, after each of two chunks (the second's blocks reading the ring the first left).

Layouts, mapped without a copy: SGLang's state pool is fp32 rows ``[kv_A | kv_B | s_A | s_B]``
(ratio 4; ``[kv | s]`` ratio 128), one ring of ``ring_size`` rows per SWA page; its decode plan
(``CompressorDecodePlan.plan_d``, 16 bytes a request) holds int32 seq_len, the new row's slot and
the pages of the previous and current block, read in place by ``page_order="prev_cur"``; its prefill
plan (``CompressorPrefillPlan``) is read in place too: ``plan_c`` (16 bytes a block: seq_len, the
block's last token's ragged row | its rows still in the ring << 16, the state pages of the previous
block and of its own; seq_len -1 pads) and ``plan_w`` (8 bytes a kept row: ragged row, state row;
-1 pads), with the block stored at ``out_loc[ragged row]`` as upstream's norm-RoPE-store does; the ape
parameter after SGLang's hot-fix is the (K, d) bias our kernel reads; ``freqs_cis`` (complex64) is
read in place as the two halves of ``view_as_real``.

Where it acts (``sglang_hip_decode.dsv4_calls.fused_compress_call``): decode steps (prefill: the
other patch, same conditions) of the compressor v2 method ``_forward_compress_all_in_one`` (SGLang's
HIP default; ``_forward_unified_hip``, taken with ``SGLANG_OPT_USE_JIT_NORM=0``, is not edited),
ratio 4 and 128, attention (d 512) and indexer (d 128), fp32 rows and state (the only dtype
upstream's kernels run with; a prefill chunk of at most 65536 tokens, the plan's 16-bit ragged
rows). The online ratio-128 compressor, the FP4 indexer, 0.5.14+'s bf16 store, 0.5.20+'s two-buffer
FP8 and external scale/rope caches, 0.5.21+'s non-V4 layouts, and any argument a later release adds
keep upstream's kernels. In decode a request
that emits nothing stores nothing, as upstream's default path skips it (where the rows go to
upstream's store, its zero row lands on its out_loc, 0: the metadata's dummy slot, as upstream's
``_forward_unified_hip`` does). The state ring's layout is the planner's, read from the plan: per
SWA page (0.5.13 ... 0.5.19), per request for ratio 128 from 0.5.20 (and ratio 4 under 0.5.20+'s
unified KV); in decode the kernel stores the new row at its page's slot ``pos % ratio``, which is
the plan's write_loc under the invariant upstream's own pooling relies on (a ring's slots follow
positions); in prefill the kept rows go to the plan's state rows, and a block's ring rows are read
from the plan's pages at slot ``pos % ratio``, as upstream's kernels read them.

The indexer K cache (#31563): the layout is upstream's store's (0.5.13 ... 0.5.16: token-major; 0.5.17+:
preshuffled where upstream's own gate says so, asked at each call as its store asks it), so the
indexer cache is what upstream would have written: this patch neither fixes nor adds to that bug.

Per release: one hunk, the same text on 0.5.13 ... 0.5.23, handing the method's locals to the call
(the arguments differ by release; a name the call does not know declines). Opt-in (not a default):
the A/B runner's ``dsv4`` preset measures it.
"""

from ..declare import Edit, Hunk, Patch, Releases

MIXIN = "sglang.srt.layers.attention.dsv4.compressor_v2:CompressorBackendMixin"

_STEP = Hunk(
    before="""
    # Step 1: compress_forward
    """,
    after="""
    # sglang-hip-decode dsv4-fused-compress: ours where it implements the step, else upstream's
    from sglang_hip_decode.dsv4_calls import fused_compress_call as _shd_fused_compress_call

    if _shd_fused_compress_call(dict(locals())):
        return

    # Step 1: compress_forward
    """,
)

PATCH = Patch(
    name="dsv4-fused-compress",
    summary="DSV4 HIP compressor decode runs this project's fused compressor and cache store in one launch "
            "(accuracy-equivalent)",
    gate="hip",
    default=False,
    releases=(
        Releases("0.5.11", "0.5.12.post1", not_applicable="no DeepSeek-V4 before 0.5.13"),
        Releases("0.5.13", None, edits=(Edit(f"{MIXIN}._forward_compress_all_in_one", (_STEP,)),)),
    ),
)

"""dsv4-sparse-decode: the HIP DeepSeek-V4 attention backend's decode calls this project's sparse decode.

Kind: **a kernel swap, accuracy-equivalent, not bit-identical.** The edit replaces the backend's
FlashMLA-format call (``flash_mla_with_kvcache_entrypoint``: TileLang, Triton or aiter, by
``SGLANG_HACK_FLASHMLA_BACKEND``) with ``sgl_hip_kernels.dsv4.sparse_decode`` (portable Triton, one
launch plus a split-K combine) on the same inputs: SGLang's SWA and compressed FP8 caches as they
are (its ``(pages, page_size, 1, 584)`` byte views), its top-k page indices and lengths, the sink.
Both compute softmax attention over the same selected keys in fp32 from the same bf16 q and FP8 K,
but in another order (other tiles, splits and combine), so outputs differ in the last bits of bf16.
What that means, as the parity test (``test/test_dsv4_sparse_decode_patch.py``) checks it: on the real
backend method of each release, ours is within 2x torch's own bf16 error of an fp64 reference of the
FlashMLA contract, and no farther from it than upstream's own kernel on the same inputs (GPU).

Where it acts (``sglang_hip_decode.dsv4_calls.sparse_decode_call``): decode batches whose q is bf16
(tokens, 1, heads, 512) over 584 B/token caches, on GPUs whose FP8 is OCP e4m3 (gfx950; gfx942
stores e4m3fnuz and keeps upstream's kernel); anything else (prefill, target-verify, the V4.1
layouts of 0.5.22+, fp8 q, 0.5.22+'s deterministic inference with its pinned split count, upstream's
``torch`` / ``comparison`` debugging backends) keeps upstream's call, unchanged. On 0.5.22+ a decode
with few enough tokens on gfx950 with ``aiter_sparse`` takes upstream's ``swapab_attention`` branch
before this call and is not reached; where upstream passes ``inv_rope`` (its aiter kernel's fused
inverse RoPE), ours runs upstream's standalone inverse RoPE on its output.

The indexer K cache (#31563): 0.5.13's HIP writer stores the indexer keys row-major while its aiter
reader (``dsv4/indexer.py``) reads them preshuffled; this patch does not touch the indexer (it reads
the attention caches, whose writer and reader agree), so it neither fixes nor depends on that bug.
0.5.23 gates both sides on ``aiter_can_use_preshuffle_paged_mqa()``.

Per release: one hunk, the same text on 0.5.13 ... 0.5.23 (``forward`` up to 0.5.21,
``_forward_attention`` from 0.5.22). Opt-in (not a default): the A/B runner's ``dsv4`` preset
measures it.
"""

from ..declare import Edit, Hunk, Patch, Releases

BACKEND = "sglang.srt.layers.attention.deepseek_v4_backend_hip_radix:DeepseekV4HipRadixBackend"

_CALL = Hunk(
    before="""
    o = flash_mla_with_kvcache_entrypoint(**input_dict, backend=backend)[0]
    """,
    after="""
    # sglang-hip-decode dsv4-sparse-decode: ours where it implements the call, else upstream's
    from sglang_hip_decode.dsv4_calls import sparse_decode_call as _shd_sparse_decode_call

    o = _shd_sparse_decode_call(forward_batch, input_dict, backend)
    if o is None:
        o = flash_mla_with_kvcache_entrypoint(**input_dict, backend=backend)[0]
    """,
)

PATCH = Patch(
    name="dsv4-sparse-decode",
    summary="DSV4 HIP decode attention calls this project's sparse_decode (accuracy-equivalent kernel swap)",
    gate="hip",
    default=False,
    releases=(
        Releases("0.5.11", "0.5.12.post1", not_applicable="no DeepSeek-V4 before 0.5.13"),
        Releases("0.5.13", "0.5.21", edits=(Edit(f"{BACKEND}.forward", (_CALL,)),)),
        Releases("0.5.22", None, edits=(Edit(f"{BACKEND}._forward_attention", (_CALL,)),)),
    ),
)

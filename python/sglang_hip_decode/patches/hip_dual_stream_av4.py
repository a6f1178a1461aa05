"""hip-dual-stream-av4 (opt-in): the "A_v4" stream layout of ``forward_absorb_prepare``'s decode fork.

What it changes: with an alt stream (hip-alt-stream, or ``SGLANG_ROCM_USE_MULTI_STREAM=1`` on
0.5.12.x), in CUDA-graph capture, on decode/idle, with the NSA indexer, upstream forks
``forward_absorb_prepare`` as: the alt stream waits for the current one, runs ``k_nope.unsqueeze`` and
``q_b_proj``; the current stream runs the indexer; the current stream joins before the w_kc absorb.
A_v4 swaps the branches and moves the join: the current stream runs ``q_b_proj``, then the w_kc
absorb, the RoPE gate and, on the gfx95 NSA TileLang fused path, aiter's fused RoPE + cat + KV-cache
kernel (which ``forward_absorb_core`` would run next); the alt stream runs the indexer; the join comes
after all of that, just before ``prepare`` returns, so the indexer overlaps the whole gap. The fused
kernel's result is handed to ``forward_absorb_core`` (a new last argument, ``fused_qk_kv_cache``,
default None), which uses it instead of running the kernel again; core computes it itself whenever
prepare did not (no fork, another backend or mode, or an unpatched prepare).

Why it is bit-identical to the serial order and to upstream's fork: the same ops run on the same
inputs, once each; only which stream issues them and where the join is differ. The fused kernel reads
q_nope_out / q_pe / k_nope / k_pe after their last writer (the absorb, the rope gate and the
context-parallel rebuild all come before it on the same stream), writes the MLA KV cache, which the
indexer neither reads nor writes (it keeps its own index-K cache), and is followed by the join, so
core and the attention see its results and the indexer's.

Measured by its author as a regression (+15% TPOT on MI355X for GLM-5, upstream never took it), so
opt-in and kept for future ROCm releases. ``benchmark/decode/bench_streams.py`` times it beside the
serial order and upstream's fork (on an H200: 14-18 µs saved per layer against the serial order,
the fork 8-11; README says what those are made of).

Per release: 0.5.11 and 0.5.12 ... 0.5.12.post1 (the fork's reuse-of-previous-indices branch differs:
0.5.12 mirrors them into the layer's capture slot; the edit keeps each release's); from 0.5.13 not
applicable, not ported: 0.5.13 changes the fork's gate (``not self.skip_topk or (self.is_nextn and
prev_topk_indices is None)``), from 0.5.18 the ROCm path is ``forward_absorb_rocm_prepare`` in
``forward_mla_rocm.py``, which 0.5.23 reshapes around a fused BMM+RoPE+cat+cache kernel.
"""

from ..declare import Edit, Hunk, Patch, Releases

FORWARD_MLA = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"

_SKIP_0511 = """
topk_indices = prev_topk_indices
"""
_SKIP_0512 = """
# skip_topk reuses prev layer's indices; mirror into this
# layer's slot so the captured buffer matches what's used.
topk_indices = maybe_capture_indexer_topk(
    self.layer_id, prev_topk_indices
)
"""


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line if line else line for line in text.strip("\n").splitlines(True))


_Q_B_PROJ = """
k_nope = k_nope.unsqueeze(1)
q = self.q_b_proj(q)[0].view(
    -1, self.num_local_heads, self.qk_head_dim
)
"""


def _indexer(skip: str) -> str:
    """Upstream's indexer call, or the previous layer's indices (``skip``: that release's branch)."""
    return f"""
if not self.skip_topk or prev_topk_indices is None:
    topk_indices = self.indexer(
        x=hidden_states,
        q_lora=q_lora,
        positions=positions,
        forward_batch=forward_batch,
        layer_id=self.layer_id,
    )
else:
{_indent(skip, 4)}
"""


def _fork(skip: str) -> Hunk:
    """The fork, whose reuse-of-previous-indices branch differs between 0.5.11 and 0.5.12; the same
    q_b_proj and indexer code, on the other streams."""
    return Hunk(
        before=f"""
current_stream = torch.cuda.current_stream()
self.alt_stream.wait_stream(current_stream)
with torch.cuda.stream(self.alt_stream):
{_indent(_Q_B_PROJ, 4)}
{_indent(_indexer(skip), 0)}
current_stream.wait_stream(self.alt_stream)
""",
        after=f"""
# sglang-hip-decode hip-dual-stream-av4: q_b_proj (then the absorb, RoPE and the fused
# RoPE+cat+cache kernel) on the current stream, the indexer on the alt stream, joined below.
current_stream = torch.cuda.current_stream()
self.alt_stream.wait_stream(current_stream)
{_indent(_Q_B_PROJ, 0)}
with torch.cuda.stream(self.alt_stream):
{_indent(_indexer(skip), 4)}
_av4_join = current_stream
""",
    )


_JOIN_VARIABLE = Hunk(
    before="""
    q_lora = None
    topk_indices = None
    """,
    after="""
    q_lora = None
    topk_indices = None
    _av4_join = None  # sglang-hip-decode hip-dual-stream-av4: the stream to join before returning
    """,
)

_RETURN = Hunk(
    before="""
    return (
        q_pe,
        k_pe,
        q_nope_out,
        k_nope,
        forward_batch,
        zero_allocator,
        positions,
        topk_indices,
        llama_4_scaling,
    )
    """,
    after="""
    fused_qk_kv_cache = None
    if _av4_join is not None:
        # sglang-hip-decode hip-dual-stream-av4: the fused kernel core would run next, run
        # here while the indexer runs on the alt stream; then join.
        if (
            self.current_attention_backend in FORWARD_ABSORB_CORE_ATTENTION_BACKENDS
            and skip_rope_for_nsa_tilelang_fused
            and self.rotary_emb is not None
        ):
            fused_qk_kv_cache = fused_qk_rope_cat_and_cache_mla(
                q_nope_out,
                q_pe,
                k_nope,
                k_pe,
                forward_batch.token_to_kv_pool.get_key_buffer(
                    self.attn_mqa.layer_id
                ),
                forward_batch.out_cache_loc,
                positions,
                self.rotary_emb.cos_cache,
                self.rotary_emb.sin_cache,
                self.attn_mqa.k_scale,
                self.rotary_emb.is_neox_style,
                q_out_dtype=(
                    fp8_dtype if self.kv_cache_dtype == "fp8_e4m3" else q_nope_out.dtype
                ),
            )
        _av4_join.wait_stream(self.alt_stream)
    return (
        q_pe,
        k_pe,
        q_nope_out,
        k_nope,
        forward_batch,
        zero_allocator,
        positions,
        topk_indices,
        llama_4_scaling,
        fused_qk_kv_cache,
    )
    """,
)



def _prepare(skip: str) -> Edit:
    return Edit(f"{FORWARD_MLA}:DeepseekMLAForwardMixin.forward_absorb_prepare", (_JOIN_VARIABLE, _fork(skip), _RETURN))


# Core's fused-kernel call (kept as it is, behind "prepare did not run it").
_CORE_FUSED_CALL = """
q_cat, _, k_pe_fused, _ = fused_qk_rope_cat_and_cache_mla(
    q_nope_out,
    q_pe,
    k_nope,
    k_pe,
    forward_batch.token_to_kv_pool.get_key_buffer(
        self.attn_mqa.layer_id
    ),
    forward_batch.out_cache_loc,
    positions,
    cos,
    sin,
    self.attn_mqa.k_scale,
    self.rotary_emb.is_neox_style,
    q_out_dtype=kv_cache_dtype,
)
"""

_CORE = Edit(f"{FORWARD_MLA}:DeepseekMLAForwardMixin.forward_absorb_core", (
    Hunk(
        before="""
            llama_4_scaling,
        ):
            save_kv_cache = True
        """,
        after="""
            llama_4_scaling,
            fused_qk_kv_cache=None,  # sglang-hip-decode hip-dual-stream-av4: prepare's fused kernel result
        ):
            save_kv_cache = True
        """,
    ),
    Hunk(
        before=_CORE_FUSED_CALL,
        after=f"""
if fused_qk_kv_cache is not None:  # sglang-hip-decode hip-dual-stream-av4: prepare ran it
    q_cat, _, k_pe_fused, _ = fused_qk_kv_cache
else:
{_indent(_CORE_FUSED_CALL, 4)}
""",
    ),
))

PATCH = Patch(
    name="hip-dual-stream-av4",
    summary="decode prepare fork as A_v4: q_b_proj..fused RoPE+cache on the current stream, the indexer on alt",
    gate="hip",
    default=False,
    upstream="never (up to 0.5.23)",
    releases=(
        Releases("0.5.11", "0.5.11", edits=(_prepare(_SKIP_0511), _CORE)),
        Releases("0.5.12", "0.5.12.post1", edits=(_prepare(_SKIP_0512), _CORE)),
        Releases("0.5.13", None, not_applicable="not ported past 0.5.12.post1 (from 0.5.18 ROCm decodes in forward_mla_rocm.py)"),
    ),
)

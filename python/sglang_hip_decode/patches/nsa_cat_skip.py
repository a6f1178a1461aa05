"""nsa-cat-skip: hand NSA decode the q_cat the fused RoPE kernel already built.

Removes: one ``CatArrayBatchedCopy`` per layer per decode step in GLM-5 / DeepSeek-V3.2 NSA decode
on ROCm (TileLang or aiter decode impl). On gfx950 ``forward_absorb_core`` runs aiter's
``fused_qk_rope_cat_and_cache_mla``, which returns ``q_cat = [q_nope | rope(q_pe)]`` (B, H, 576),
contiguous; it then slices q_cat into two views and ``NativeSparseAttnBackend.forward_decode``
concatenates them again, byte for byte (``concat_mla_absorb_q_general`` is ``torch.cat`` on HIP).
In 0.5.11 ``forward_decode`` already has a zero-copy branch for ``q_rope=None``, but it rebinds
``q_rope`` to a view, so every impl branch concatenates anyway.

Edit:
* ``forward_absorb_core``, fused-rope branch: on decode and idle, after llama-4 scaling (applied in
  place on the ``q_cat[..., :kv_lora_rank]`` view, so q_cat carries it), pass ``q_cat`` with
  ``q_rope=None``. Extend and target-verify keep the split form (``forward_extend`` asserts
  ``q_rope is not None``), and so does the trtllm decode impl, which reads the split form before
  ``forward_decode`` builds ``q_all`` (its fp8 path asserts ``q_rope is not None``). Which impl
  decodes is read from ``get_global_server_args().nsa_decode_backend`` (what ``NativeSparseAttnBackend``
  sets its ``nsa_decode_impl`` from, in its ``__init__``, and never changes), not from
  ``forward_batch.attn_backend``: behind ``HybridAttnBackend`` or ``TboAttnBackend`` that object is
  the wrapper, which has no ``nsa_decode_impl``.
* ``forward_decode``: remember ``q_all`` (None when the caller split q); the tilelang and aiter
  branches reuse it on HIP instead of concatenating. Every other branch is unchanged.

Why it is bit-identical: the reused ``q_all`` is ``q.contiguous().view(...)``, whose two halves are
exactly what the cat would copy, in the same dtype; neither kernel writes its q. Off HIP the cat
stays (on CUDA ``concat_mla_absorb_q_general`` may cast, so it is not skipped there).

Upstream: sglang#24125, in sglang 0.5.12 (decode/idle; 0.5.23 extends it to target-verify and extend).
Delete this patch when the pinned sglang moves to 0.5.12 or later.
"""

from ..declare import Edit, Hunk, Patch

FORWARD_MLA = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"
NSA_BACKEND = "sglang.srt.layers.attention.nsa_backend"

PATCH = Patch(
    name="nsa-cat-skip",
    summary="NSA decode reuses q_cat from the fused RoPE kernel instead of re-concatenating it",
    gate="hip",
    default=True,
    upstream="sglang#24125, sglang 0.5.12",
    edits=(
        Edit(
            f"{FORWARD_MLA}:DeepseekMLAForwardMixin.forward_absorb_core",
            (
                Hunk(
                    before="""
                    if llama_4_scaling is not None:
                        q_nope_fused *= llama_4_scaling
                    attn_output = self.attn_mqa(
                        q_nope_fused,
                        None,
                        None,
                        forward_batch,
                        q_rope=q_pe_fused,
                    """,
                    after="""
                    if llama_4_scaling is not None:
                        q_nope_fused *= llama_4_scaling
                    if forward_batch.forward_mode.is_decode_or_idle() and (
                        get_global_server_args().nsa_decode_backend != "trtllm"
                    ):
                        # sglang-hip-decode nsa-cat-skip: q_cat (scaled in place through the
                        # view above) goes whole; forward_decode reuses it as q_all. trtllm
                        # consumes the split form before q_all exists, so it keeps it (the
                        # NSA backend's nsa_decode_impl is this server arg, whatever wraps it).
                        q_nope_fused, q_pe_fused = q_cat, None
                    attn_output = self.attn_mqa(
                        q_nope_fused,
                        None,
                        None,
                        forward_batch,
                        q_rope=q_pe_fused,
                    """,
                ),
            ),
        ),
        Edit(
            f"{NSA_BACKEND}:NativeSparseAttnBackend.forward_decode",
            (
                Hunk(
                    before="""
                    if q_rope is not None:
                        q_nope = q.view(-1, layer.tp_q_head_num, layer.v_head_dim)
                    """,
                    after="""
                    if q_rope is not None:
                        q_all = None  # sglang-hip-decode nsa-cat-skip: the caller split q
                        q_nope = q.view(-1, layer.tp_q_head_num, layer.v_head_dim)
                    """,
                ),
                Hunk(
                    before="""
                    elif self.nsa_decode_impl == "tilelang":
                        if q_rope is not None:
                            q_all = concat_mla_absorb_q_general(q_nope, q_rope)
                    """,
                    after="""
                    elif self.nsa_decode_impl == "tilelang":
                        if q_all is None or not _is_hip:  # sglang-hip-decode nsa-cat-skip
                            q_all = concat_mla_absorb_q_general(q_nope, q_rope)
                    """,
                ),
                Hunk(
                    before="""
                    elif self.nsa_decode_impl == "aiter":
                        if q_rope is not None:
                            q_all = torch.cat([q_nope, q_rope], dim=-1)
                    """,
                    after="""
                    elif self.nsa_decode_impl == "aiter":
                        if q_all is None or not _is_hip:  # sglang-hip-decode nsa-cat-skip
                            q_all = torch.cat([q_nope, q_rope], dim=-1)
                    """,
                ),
            ),
        ),
    ),
)

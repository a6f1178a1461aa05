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

Per release: the edit on 0.5.11 only; upstream from 0.5.12 (sglang#24125: decode and idle, from
0.5.18 in ``forward_absorb_rocm_core`` of ``forward_mla_rocm.py``, target-verify too from 0.5.20).
Upstream's form differs from ours in one way: it hands q_cat over whole to every decode impl,
trtllm included. That has no effect where the branch runs: the fused-RoPE branch needs gfx95 with
aiter, where trtllm (FlashInfer's TRT-LLM kernels) does not exist; and trtllm takes the whole q
anyway in bf16 (``q.view``) and fails either way in fp8 on this branch (no ``k``/``cos_sin_cache``
is passed). So there is nothing to test on those releases. Delete this patch when the oldest
supported release is 0.5.12.
"""

from ..declare import Edit, Hunk, Patch, Releases, Upstream

FORWARD_MLA = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"
NSA_BACKEND = "sglang.srt.layers.attention.nsa_backend"

EDITS = (
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
    )

_MLA_DIR = "sglang/srt/models/deepseek_common/attention_forward_methods"

PATCH = Patch(
    name="nsa-cat-skip",
    summary="NSA decode reuses q_cat from the fused RoPE kernel instead of re-concatenating it",
    gate="hip",
    default=True,
    upstream="sglang#24125, sglang 0.5.12",
    releases=(
        Releases("0.5.11", "0.5.11", edits=EDITS),
        Releases("0.5.12", "0.5.17", upstream=Upstream("0.5.12", "sglang#24125", (
            (f"{_MLA_DIR}/forward_mla.py", "q_rope=None,"),))),
        Releases("0.5.18", None, upstream=Upstream("0.5.12", "sglang#24125", (
            (f"{_MLA_DIR}/forward_mla_rocm.py", "q_rope=None,"),))),
    ),
)

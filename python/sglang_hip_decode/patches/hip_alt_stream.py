"""hip-alt-stream (opt-in): the alt CUDA/HIP stream on ROCm, and the routed-scaling guard it needs.

Restores: on ROCm, 0.5.11 creates no ``alt_stream`` (``DeepseekV2Model.__init__`` lists CUDA, MUSA
and the NPU switch, not HIP: a merge dropped ``_is_hip``), so every dual-stream path of the
DeepSeek-V2 family (DeepSeek-V3.x, GLM-5, Kimi-K2) is dead there: the MoE's shared experts beside the
routed ones (``forward_normal_dual_stream``), the MLA q/kv RMSNorm split and ``forward_absorb_prepare``'s
q_b_proj / indexer fork. With the stream, ``forward_normal_dual_stream`` runs in CUDA-graph capture
(the decode graphs) and multiplies the routed output by ``routed_scaling_factor``, although on HIP
with aiter the biased grouped top-k (``noaux_tc``: DeepSeek-V3.x, GLM-5, Kimi-K2) already folded the
factor into the expert weights: ``forward_normal`` skips that multiply ``and not _use_aiter``, the
dual-stream path lacks the test, so the routed part comes out scaled twice (factor² instead of
factor: wrong logits, not a crash). The dual-stream MoE runs only where the shared expert is not
fused into the MoE kernel: on MI3xx SGLang fuses it for 256 routed + 1 shared experts (DeepSeek-V3.x,
GLM-5) unless ``--disable-shared-experts-fusion``; Kimi-K2 (384 experts) takes it. For those the
stream still acts through the MLA q/kv RMSNorm split and the prepare fork.

Edits:
* ``DeepseekV2Model.__init__``: ``or _is_hip`` in the condition that creates ``alt_stream``.
* ``DeepseekV2MoE.forward_normal_dual_stream``: ``_use_aiter`` beside ``_is_cuda or _is_musa`` in the
  condition of the ``*= routed_scaling_factor`` (the same test ``forward_normal`` makes), so the
  dual-stream output is ``forward_normal``'s, bit for bit (the same ops on the same values; only the
  stream the routed part runs on differs).

Not bit-identical to the unpatched HIP server, by design, hence opt-in: with the stream, capture mode
takes the plain q/kv RMSNorm split instead of gfx95's fused RMSNorm+quant (upstream's own choice
wherever the stream exists, as on CUDA), and the MoE output is the corrected one. Upstream measured
its multi-stream mode as needing ``GPU_MAX_HW_QUEUES`` >= 5 on ROCm.

Per release:
* 0.5.11: both edits.
* 0.5.12, 0.5.12.post1: the guard only. These create the stream themselves when
  ``SGLANG_ROCM_USE_MULTI_STREAM=1`` (default off) but still scale twice in the dual-stream path.
* 0.5.13 ... 0.5.22: upstream (the same ``not _use_aiter`` test in the dual-stream path; the stream
  behind ``SGLANG_ROCM_USE_MULTI_STREAM``).
* 0.5.23 and later: upstream, narrowed to ``not (_use_aiter and self.routed_scaling_factor_fused_in_topk)``:
  it scales unless aiter's top-k really folded the factor in. Ours copies ``forward_normal``'s test
  instead, so the dual-stream output is ``forward_normal``'s bit for bit; for a model whose top-k does
  not fold it (DeepSeek-V2's unbiased ``group_limited_greedy``) ``forward_normal`` itself skips the
  factor on HIP with aiter upstream, and the patched dual stream does the same (0.5.23's narrower
  test fixes both); nothing of ours runs there.
DeepSeek's MTP draft model (``deepseek_nextn``) creates its own stream, CUDA/NPU only: not edited.
"""

from ..declare import Edit, Hunk, Patch, Releases, Upstream

DV2 = "sglang.srt.models.deepseek_v2"
DUAL = f"{DV2}:DeepseekV2MoE.forward_normal_dual_stream"

_GUARD = Edit(DUAL, (Hunk(
    before="""
    if not (_is_cuda or _is_musa) or isinstance(
        self.experts.quant_method, KTEPWrapperMethod
    ):
        final_hidden_states *= self.routed_scaling_factor
    """,
    after="""
    # sglang-hip-decode hip-alt-stream: aiter's grouped top-k already applied the factor (as in
    # forward_normal), so the dual-stream path must not multiply again.
    if not (_is_cuda or _is_musa or _use_aiter) or isinstance(
        self.experts.quant_method, KTEPWrapperMethod
    ):
        final_hidden_states *= self.routed_scaling_factor
    """,
),))

_STREAM = Edit(f"{DV2}:DeepseekV2Model.__init__", (Hunk(
    before="""
    if _is_cuda or _is_musa or envs.SGLANG_NPU_USE_MULTI_STREAM.get()
    """,
    after="""
    if _is_cuda or _is_musa or _is_hip or envs.SGLANG_NPU_USE_MULTI_STREAM.get()  # sglang-hip-decode hip-alt-stream
    """,
),))

_UPSTREAM = "the dual-stream `not _use_aiter` guard; SGLANG_ROCM_USE_MULTI_STREAM=1 for the stream"

PATCH = Patch(
    name="hip-alt-stream",
    summary="creates the alt stream on HIP (MoE / MLA dual stream) and stops the MoE dual stream scaling twice",
    gate="hip",
    default=False,
    upstream="0.5.12 (stream behind SGLANG_ROCM_USE_MULTI_STREAM) / 0.5.13 (guard)",
    releases=(
        Releases("0.5.11", "0.5.11", edits=(_STREAM, _GUARD)),
        Releases("0.5.12", "0.5.12.post1", edits=(_GUARD,)),
        Releases("0.5.13", "0.5.22", upstream=Upstream("0.5.13", _UPSTREAM, ((DUAL, "and not _use_aiter\n"),))),
        Releases("0.5.23", None, upstream=Upstream("0.5.13", _UPSTREAM, (
            (DUAL, "not (_use_aiter and self.routed_scaling_factor_fused_in_topk)"),))),
    ),
)

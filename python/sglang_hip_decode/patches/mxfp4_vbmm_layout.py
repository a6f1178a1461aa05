"""mxfp4-vbmm-layout: the MXFP4 v-bmm writes straight into the (batch, heads, v_dim) layout o_proj reads.

Removes: on gfx950 with MXFP4 MLA weights (Kimi-K2.x-MXFP4 via quark), ``forward_absorb_core``
allocates the v-bmm output as (heads, batch, v_dim) and hands ``.transpose(0, 1)`` of it to the o_proj
quantisation. With a bf16 o_proj, ``.flatten(1, 2)`` of that transposed view is a real copy
(``direct_copy_kernel`` in a ROCm trace, ~4 µs per layer upstream); with an MXFP4 or FP8 o_proj the
fused flatten-quant kernels read it strided (uncoalesced) but copy nothing.

Edit (the ``_use_aiter_gfx95 and w_vc.dtype == torch.uint8`` branch only): allocate ``_bmm_buf``
(batch, heads, v_dim) contiguous and pass its transposed view as the GEMM's output
(``batched_gemm_afp4wfp4_pre_quant`` honours output strides); the o_proj branches then take
``_bmm_buf`` itself: MXFP4 -> ``fused_flatten_mxfp4_quant(_bmm_buf)``, FP8 ->
``fused_flatten_fp8_group_quant(_bmm_buf, 128)``, bf16 -> ``_bmm_buf.flatten(1, 2)`` (a view). The
fp8 / bf16 v-bmm branches set ``_bmm_buf = None`` and keep the old transpose.

Why it is bit-identical: the GEMM computes the same values into the same logical (h, b, v)
positions, only the memory order differs; the quant kernels see the same logical (B, H, V) tensor
(they take strides), and the bf16 flatten produces the same values.

Per release: the edit on 0.5.11 ... 0.5.12.post1 (the same text in all three); upstream from 0.5.13
(sglang#25463: ``_bmm_buf`` in ``forward_absorb_core``), from 0.5.18 in the module-level
``rocm_absorb_v_bmm`` of ``forward_mla_rocm.py`` (0.5.23 extends it to the fp8 and bf16 v-bmm).
Upstream's form is ours (the same buffer, the same o_proj branches). Delete this patch when the
oldest supported release is 0.5.13.
"""

from ..declare import Edit, Hunk, Patch, Releases, Upstream

FORWARD_MLA = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"

_TRANSPOSE = "attn_bmm_output = attn_bmm_output.transpose(0, 1)"
_FROM_BUF = "attn_bmm_output = _bmm_buf if _bmm_buf is not None else attn_bmm_output.transpose(0, 1)"

EDITS = (
        Edit(
            f"{FORWARD_MLA}:DeepseekMLAForwardMixin.forward_absorb_core",
            (
                Hunk(
                    before="""
                    x = attn_output.transpose(0, 1)
                    attn_bmm_output = torch.empty(
                        x.shape[0],
                        x.shape[1],
                        self.w_vc.shape[2],
                        device=x.device,
                        dtype=torch.bfloat16,
                    )
                    """,
                    after="""
                    x = attn_output.transpose(0, 1)
                    # sglang-hip-decode mxfp4-vbmm-layout: (B, H, V) contiguous, written by the
                    # GEMM through its (H, B, V) view, read by o_proj as it is.
                    _bmm_buf = torch.empty(
                        x.shape[1],
                        x.shape[0],
                        self.w_vc.shape[2],
                        device=x.device,
                        dtype=torch.bfloat16,
                    )
                    attn_bmm_output = _bmm_buf.transpose(0, 1)
                    """,
                ),
                Hunk(
                    before="""
                    else:
                        if _use_aiter_gfx95 and self.w_kc.dtype == torch.float8_e4m3fn:
                    """,
                    after="""
                    else:
                        _bmm_buf = None  # sglang-hip-decode mxfp4-vbmm-layout
                        if _use_aiter_gfx95 and self.w_kc.dtype == torch.float8_e4m3fn:
                    """,
                ),
                Hunk(
                    before=f"""
                    if self.o_proj.weight.dtype == torch.uint8:
                        {_TRANSPOSE}
                        attn_bmm_output = fused_flatten_mxfp4_quant(attn_bmm_output)
                    elif self.o_proj.weight.dtype == torch.float8_e4m3fn:
                        {_TRANSPOSE}
                    """,
                    after=f"""
                    if self.o_proj.weight.dtype == torch.uint8:
                        {_FROM_BUF}
                        attn_bmm_output = fused_flatten_mxfp4_quant(attn_bmm_output)
                    elif self.o_proj.weight.dtype == torch.float8_e4m3fn:
                        {_FROM_BUF}
                    """,
                ),
                Hunk(
                    before="""
                    else:
                        attn_bmm_output = attn_bmm_output.transpose(0, 1).flatten(1, 2)

                elif self.w_vc.dtype == torch.float8_e4m3fn:
                    """,
                    after="""
                    else:
                        attn_bmm_output = (
                            _bmm_buf if _bmm_buf is not None else attn_bmm_output.transpose(0, 1)
                        ).flatten(1, 2)

                elif self.w_vc.dtype == torch.float8_e4m3fn:
                    """,
                ),
            ),
        ),
    )

_MLA_DIR = "sglang/srt/models/deepseek_common/attention_forward_methods"

PATCH = Patch(
    name="mxfp4-vbmm-layout",
    summary="MXFP4 v-bmm writes a (B,H,V) buffer through a transposed view; o_proj reads it without a copy",
    gate="hip",
    default=True,
    upstream="sglang#25463, sglang 0.5.13",
    releases=(
        Releases("0.5.11", "0.5.12.post1", edits=EDITS),
        Releases("0.5.13", "0.5.17", upstream=Upstream("0.5.13", "sglang#25463", (
            (f"{_MLA_DIR}/forward_mla.py", "_bmm_buf = torch.empty("),))),
        Releases("0.5.18", None, upstream=Upstream("0.5.13", "sglang#25463", (
            (f"{_MLA_DIR}/forward_mla_rocm.py", "def rocm_absorb_v_bmm("),
            (f"{_MLA_DIR}/forward_mla_rocm.py", "_bmm_buf = torch.empty("),))),
    ),
)

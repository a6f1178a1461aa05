"""The MLA decode path of sglang 0.5.13+ (the DSA rename) and 0.5.18+ (the ROCm absorb path), assembled
from its real pieces: the same interface and inputs as ``mla_decode`` (0.5.11 / 0.5.12), for the
releases that harness cannot import.

What moved upstream, and what this drives instead:

* 0.5.13: ``nsa_backend`` became ``dsa_backend`` (class ``DeepseekSparseAttnBackend``; the old module
  is a re-export shim), the ``nsa_*`` server args and backend attributes became ``dsa_*``, and
  ``forward_absorb_core`` no longer reads ``forward_batch.token_to_kv_pool`` / ``.attn_backend``: it
  reads the published ``ForwardContext`` (``get_token_to_kv_pool()`` = ``attn_backend.token_to_kv_pool``),
  and so does ``RadixAttention.forward``. :meth:`MlaDsaDecodePath.step` publishes one, as
  ``ModelRunner._forward_raw`` does.
* 0.5.18: on ROCm the absorbed path lives in ``forward_mla_rocm.py``
  (``DeepseekMLARocmForwardMixin.forward_absorb_rocm_core``), reading ``get_exec().kernel.dsa_*_backend``.

Which core a ROCm (gfx950, aiter) server runs on decode, by upstream's own dispatch
(``DeepseekV2AttentionMLA.dispatch_attn_forward_method``, which :meth:`MlaDsaDecodePath.step` calls
for every layer, with the HIP flag forced, and follows):

* 0.5.13.post1: the ``dsa`` handler returns ``MLA`` on decode (``backend.use_mha`` is only set for
  prefill) and the ``aiter`` handler returns ``MLA`` for every non-extend batch without going through
  ``_dispatch_mla_subtype``, the only place ``MLA_FUSED_ROPE_ROCM`` is chosen (and only with
  ``SGLANG_ROCM_FUSED_DECODE_MLA=1``). So both cases run ``forward_absorb_core`` (forward_mla.py): the
  fused-RoPE branch (``_skip_rope_for_dsa_tilelang_fused``: gfx95 + dsa + tilelang) for ``nsa``, the
  non-core ``_use_aiter_gfx95`` branch (``fused_qk_rope_cat_and_cache_mla``) for ``mxfp4``.
* 0.5.23: same handlers, then ``resolve_rocm_forward_method`` maps ``MLA`` to ``MLA_ROCM`` on HIP, so
  both cases run ``forward_absorb_rocm_core`` (forward_mla_rocm.py): the same two branches (the
  ``q_nope_unabsorbed`` fused-BMM form needs an FP8 ``w_kc``; these cases have bf16 ``w_kc``, so prepare
  hands it None), then ``rocm_absorb_v_bmm``. ``forward_absorb_fused_mla_rope_core``
  (forward_mla_fused_rope_rocm.py) is not reached: ``_dispatch_mla_subtype`` now also requires
  ``current_attention_backend == "aiter"``, whose handler never calls it.

The kernels, stand-in backends and recorders are ``mla_decode``'s (``MlaDecodePath``, which this
subclasses): the HIP flags are forced on the imported modules, the ROCm kernels come from the provider
table, the DSA backend is a real ``DeepseekSparseAttnBackend`` made without ``__init__`` whose impls are
the recorders. Cases: ``attention="nsa"`` runs as SGLang's ``dsa`` backend (its canonical name since
0.5.13) with ``case.impl`` as ``--dsa-decode-backend``; ``attention="aiter"`` as the aiter MLA backend.
``prepare_step`` (forward_absorb_prepare) is not driven here.
"""

from __future__ import annotations

import contextlib
import types

import torch

from . import mla_decode
from .audit import opaque
from .fake_backends import aiter_mla_backend, nsa_backend
from .mla_decode import MlaDecodeCase, MlaDecodeInputs, make_inputs  # noqa: F401 (the shared interface)
from .sglang_import import import_modules, swap_attrs

FM = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"
FMR = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla_rocm"  # 0.5.18+
DB = "sglang.srt.layers.attention.dsa_backend"

# The upstream core each dispatched method runs (forward_methods.AttnForwardMethod names).
CORES = {"MLA": "forward_absorb_core", "MLA_ROCM": "forward_absorb_rocm_core",
         "MLA_FUSED_ROPE_ROCM": "forward_absorb_fused_mla_rope_core"}


def import_sglang() -> types.SimpleNamespace:
    """The sglang modules the path needs (CUDA hidden during the import: ``sglang_import``);
    ``fmr`` is None before 0.5.18 (no ROCm absorb module), ``HybridAttnBackend`` None where its module
    does not import here."""
    fm, db, fbi, ra, dv2, tbo, fc, abh, methods, topk = import_modules(
        FM, DB, "sglang.srt.model_executor.forward_batch_info", "sglang.srt.layers.radix_attention",
        "sglang.srt.models.deepseek_v2", "sglang.srt.layers.attention.tbo_backend",
        "sglang.srt.model_executor.forward_context",
        "sglang.srt.models.deepseek_common.attention_backend_handler",
        "sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods",
        "sglang.srt.layers.attention.dsa.dsa_topk_backend")
    try:
        (fmr,) = import_modules(FMR)
    except ModuleNotFoundError as exc:
        if exc.name != FMR:
            raise
        fmr = None
    try:  # 0.5.23's imports ModelRunner, hence the HTTP server's packages (uvicorn): only for wrapper="hybrid"
        (hybrid,) = import_modules("sglang.srt.layers.attention.hybrid_attn_backend")
    except ModuleNotFoundError:
        hybrid = types.SimpleNamespace(HybridAttnBackend=None)  # MlaDsaDecodePath says so when asked for it
    return types.SimpleNamespace(
        fm=fm, fmr=fmr, db=db, nb=db, ForwardMode=fbi.ForwardMode, RadixAttention=ra.RadixAttention,
        AttentionMLA=dv2.DeepseekV2AttentionMLA, Backend=db.DeepseekSparseAttnBackend, dv2=dv2,
        HybridAttnBackend=hybrid.HybridAttnBackend, TboAttnBackend=tbo.TboAttnBackend, fc=fc, abh=abh,
        AttnForwardMethod=methods.AttnForwardMethod, DSATopKBackend=topk.DSATopKBackend,
    )


def _backend_name(case: MlaDecodeCase) -> str:
    return "dsa" if case.attention == "nsa" else case.attention


class MlaDsaDecodePath(mla_decode.MlaDecodePath):
    """One model's attention layers on the MLA decode path of sglang 0.5.13+, ready for :meth:`step`."""

    def __init__(self, case: MlaDecodeCase, gen: torch.Generator, sg: types.SimpleNamespace | None = None,
                 prefer: str | None = None):
        sg = sg or import_sglang()
        if sg.fmr is not None and case.o_proj == "fp8":
            # rocm_absorb_v_bmm picks the FP8 quant by the o_proj's block-scale weight_scale (and the
            # bpreshuffle scale helpers), which the o_proj stand-in does not model.
            raise NotImplementedError("an FP8 o_proj is not modelled on the ROCm absorb path (0.5.18+)")
        if case.wrapper == "hybrid" and sg.HybridAttnBackend is None:
            raise ImportError("sglang's hybrid_attn_backend does not import here (it imports ModelRunner, which "
                              "needs the HTTP server's packages)")
        self.methods: list[tuple[int, str, str]] = []  # (layer_id, dispatched method, core called) per call
        super().__init__(case, gen, sg, prefer)

    # -- upstream objects ----------------------------------------------------------------------
    def _make_layer(self, layer_id: int, gen: torch.Generator):
        layer = super()._make_layer(layer_id, gen)
        layer.current_attention_backend = _backend_name(self.case)  # dispatch sets it again, per batch
        layer.use_dsa = self.case.attention == "nsa"
        layer.dcp_size = 1  # no decode context parallelism
        layer.init_mla_fused_rope_rocm_forward()  # rocm_fused_decode_mla from SGLANG_ROCM_FUSED_DECODE_MLA
        return layer

    def _make_backend(self):
        name = _backend_name(self.case)
        if self.case.attention == "aiter":
            backend = aiter_mla_backend(self._attention)
        else:
            backend = nsa_backend(self.sg, self.case.impl, mla_decode._kv_torch_dtype(self.case), self.case.heads,
                                  self.case.kv_lora_rank, self._attention, self.record)
            backend.dsa_decode_impl = self.case.impl
            backend.hisparse_coordinator = None
            backend.dsa_topk_backend = self.sg.DSATopKBackend("sgl-kernel")  # --dsa-topk-backend's default
            backend.use_fused_topk = True  # SGLANG_DSA_FUSE_TOPK (default): the page table is topk_indices
            backend.dsa_index_kpool = 1
            backend.use_mha = False  # set_dsa_prefill_impl's decision; decode never uses MHA
            meta = vars(backend.forward_metadata)
            backend.forward_metadata = types.SimpleNamespace(
                **meta, **{k.replace("nsa_", "dsa_"): v for k, v in meta.items() if k.startswith("nsa_")})
            backend._forward_triton_decode = self._split_recorder("triton")
        # The pool of each call's inputs is set by step(); TboAttnBackend copies these refs at __init__.
        backend.token_to_kv_pool = backend.req_to_token_pool = backend.kv_index_translator = None
        # ModelRunner stamps the resolved backend names on the backend (0.5.23 reads them).
        backend.prefill_attention_backend_str = backend.decode_attention_backend_str = name
        return backend

    def _split_recorder(self, impl: str):
        split = opaque(impl, lambda q_nope, q_rope, kv_cache, page_table_1, sm_scale: self._attention(
            impl, torch.cat([q_nope, q_rope], -1), kv_cache, page_table_1, sm_scale))

        def consume(q_nope, q_rope, kv_cache, v_head_dim, page_table_1, sm_scale):
            self.record.split_calls.append((impl, q_nope, q_rope))
            return split(q_nope, q_rope, kv_cache, page_table_1, sm_scale)

        return consume

    # -- running -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hip(self):
        """Force the HIP flags and inject the kernels on the imported modules; restore afterwards."""
        sg, case = self.sg, self.case
        name = _backend_name(case)
        kernels = [("fused_qk_rope_cat_and_cache_mla", self._fused)] + list(self._mxfp4.items())
        flags = [("_is_hip", True), ("_use_aiter", True), ("_use_aiter_gfx95", True)]
        changes = [(sg.fm, k, v) for k, v in flags if hasattr(sg.fm, k)] + [(sg.db, "_is_hip", True),
                                                                             (sg.abh, "_is_hip", True)]
        if sg.fmr is None:  # 0.5.13-0.5.17: forward_absorb_core reads the server args
            server_args = types.SimpleNamespace(
                dsa_decode_backend=case.impl, dsa_prefill_backend="tilelang", decode_attention_backend=name,
                prefill_attention_backend=name, speculative_attention_mode="prefill",
                enable_deterministic_inference=False)
            changes += [(sg.fm, k, v) for k, v in kernels]
            changes += [(sg.fm, "get_global_server_args", lambda: server_args),
                        (sg.dv2, "get_global_server_args", lambda: server_args)]
        else:  # 0.5.18+: forward_absorb_rocm_core reads the exec context
            kernel_args = types.SimpleNamespace(dsa_decode_backend=case.impl, dsa_prefill_backend="tilelang")
            changes += [(sg.fmr, k, v) for k, v in flags[1:]] + [(sg.fmr, k, v) for k, v in kernels]
            changes += [(sg.fmr, "get_exec", lambda: types.SimpleNamespace(kernel=kernel_args)),
                        (sg.dv2, "attention_backends", lambda: (name, name))]
        with swap_attrs(*changes):
            yield self

    def forward_batch(self, x: MlaDecodeInputs, layer_index: int = 0):
        fb = super().forward_batch(x, layer_index)
        fb.req_pool_indices = fb.seq_lens = None  # read by the hisparse coordinator only (none here)
        return fb

    def _core(self, layer, fb):
        """The core upstream's dispatch picks for ``layer`` on ``fb`` (call inside the forward context)."""
        method = layer.dispatch_attn_forward_method(fb).name
        core = CORES.get(method)
        if core is None or core == "forward_absorb_fused_mla_rope_core":
            raise NotImplementedError(f"upstream dispatches layer {layer.attn_mqa.layer_id} to {method}, "
                                      "which this harness does not drive")
        self.methods.append((layer.attn_mqa.layer_id, method, core))
        return getattr(layer, core)

    def step(self, x: MlaDecodeInputs, fb=None) -> list[torch.Tensor]:
        """The dispatched core (``forward_absorb_core`` / ``forward_absorb_rocm_core``) of every layer on
        ``x``, with a ``ForwardContext`` published for the call (call inside :meth:`hip`)."""
        fb = fb or self.forward_batch(x)
        for backend in {id(b): b for b in (self.backend, self.attn_backend)}.values():
            backend.token_to_kv_pool = fb.token_to_kv_pool  # what get_token_to_kv_pool() returns
        topk = x.topk_indices if self.case.attention == "nsa" else None  # MLA has no indexer
        fc = self.sg.fc
        outs = []
        with fc.forward_context(fc.ForwardContext(attn_backend=self.attn_backend)):
            for layer in self.layers:
                core = self._core(layer, fb)
                outs.append(core(x.q_pe, x.k_pe, x.q_nope_out, x.k_nope, fb, None, x.positions, topk,
                                 x.llama_4_scaling))
        return outs

    def prepare_step(self, *args, **kwargs):
        raise NotImplementedError("forward_absorb_prepare of 0.5.13+ is not driven by this harness")


MlaDecodePath = MlaDsaDecodePath  # the name mla_decode's callers use

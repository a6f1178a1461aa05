"""The MLA decode path of sglang 0.5.11 (``forward_absorb_core``), assembled from its real pieces,
for parity tests and decode benchmarks alike.

What runs is upstream's own code: ``DeepseekMLAForwardMixin.forward_absorb_core`` (on a real
``DeepseekV2AttentionMLA`` made without ``__init__``) -> a real ``RadixAttention`` -> the base
backend's ``forward`` -> ``forward_decode`` of either
* ``NativeSparseAttnBackend`` (made without ``__init__``; ``attention="nsa"``, GLM-5 / DeepSeek-V3.2:
  the core fused-RoPE branch), or
* a stand-in for aiter's MLA backend (``attention="aiter"``, Kimi-K2: the non-core branch, where
  the fused kernel hands back the whole KV cache), attending over the same top-k slots;
then the v-bmm (bf16 or MXFP4 ``w_vc``) and o_proj (bf16, FP8 or MXFP4 weight) of the HIP branch.
The HIP flags are forced on the imported modules and the ROCm kernels come from the provider table
(``fused_qk_rope_cat_and_cache_mla``, the sparse decode behind ``_forward_tilelang`` /
``_forward_aiter``, ``batched_gemm_afp4wfp4_pre_quant``, ``fused_flatten_mxfp4_quant``,
``fused_flatten_fp8_group_quant``). Kernels are wrapped with ``audit.opaque`` so a copy audit counts
the upstream code's copies, not the reference kernels' internals. The CUDA-only impls
(flashmla_sparse, flashmla_kv, fa3, trtllm) and ``forward_extend`` are recorders that compute the same
attention from what they were handed, so their inputs and outputs can be compared too.

The stand-in backends and o_proj are in ``fake_backends``, the model shapes in ``shapes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Callable, Optional

import torch

from . import providers
from .audit import opaque
from .fake_backends import OProj, aiter_mla_backend, nsa_backend, wrap_backend
from .shapes import GLM5, KIMI_K2, model_shapes  # noqa: F401 (the shapes the benchmarks name)
from .sglang_import import import_modules, swap_attrs

FM = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"
NB = "sglang.srt.layers.attention.nsa_backend"


def import_sglang() -> types.SimpleNamespace:
    """The sglang modules the path needs (CUDA hidden during the import: ``sglang_import``)."""
    fm, nb, fbi, ra, dv2, hybrid, tbo = import_modules(
        FM, NB, "sglang.srt.model_executor.forward_batch_info", "sglang.srt.layers.radix_attention",
        "sglang.srt.models.deepseek_v2", "sglang.srt.layers.attention.hybrid_attn_backend",
        "sglang.srt.layers.attention.tbo_backend")
    return types.SimpleNamespace(
        fm=fm, nb=nb, ForwardMode=fbi.ForwardMode, RadixAttention=ra.RadixAttention,
        AttentionMLA=dv2.DeepseekV2AttentionMLA, Backend=nb.NativeSparseAttnBackend,
        HybridAttnBackend=hybrid.HybridAttnBackend, TboAttnBackend=tbo.TboAttnBackend,
    )


@dataclasses.dataclass(frozen=True)
class MlaDecodeCase:
    batch: int
    heads: int = 8
    topk: int = 2048
    context: int = 8192  # tokens of KV per request the top-k indices choose from
    kv_dtype: str = "bf16"  # "bf16" or "fp8_e4m3" (the server's --kv-cache-dtype)
    impl: str = "tilelang"  # nsa_decode_backend
    mode: str = "DECODE"  # ForwardMode name
    llama_4_scaling: bool = False
    k_scale: Optional[float] = None
    kv_lora_rank: int = 512
    rope_dim: int = 64
    v_head_dim: int = 128
    hidden: int = 256  # o_proj output width: identical work in both arms, kept small
    layers: int = 1
    device: str = "cpu"
    attention: str = "nsa"  # "nsa" (core fused branch) or "aiter" (Kimi's MLA backend, non-core branch)
    wrapper: str = "none"  # what forward_batch.attn_backend is: the backend itself, or SGLang's "hybrid" / "tbo" around it
    w_vc: str = "bf16"  # "bf16" or "mxfp4" (uint8 packed e2m1 + e8m0 scales, quark layout)
    o_proj: str = "bf16"  # "bf16", "fp8" or "mxfp4": the o_proj weight's dtype picks the quant branch


@dataclasses.dataclass
class Record:
    """What the patched seam handed to the kernels during one call."""

    q_cat_ptr: list = dataclasses.field(default_factory=list)
    kernel_q: list = dataclasses.field(default_factory=list)  # (impl, q tensor handed over)
    split_calls: list = dataclasses.field(default_factory=list)  # (impl, q, q_rope) for split-form consumers
    gemm_out: list = dataclasses.field(default_factory=list)  # the y tensor the MXFP4 v-bmm wrote
    quant_in: list = dataclasses.field(default_factory=list)  # (kernel, x) handed to the o_proj quant
    trtllm_args: list = dataclasses.field(default_factory=list)  # (q, q_rope) exactly as _forward_trtllm got them


def _kv_torch_dtype(case: MlaDecodeCase) -> torch.dtype:
    return torch.float8_e4m3fn if case.kv_dtype == "fp8_e4m3" else torch.bfloat16


@dataclasses.dataclass
class MlaDecodeInputs:
    q_pe: torch.Tensor
    k_pe: torch.Tensor
    q_nope_out: torch.Tensor
    k_nope: torch.Tensor
    positions: torch.Tensor
    topk_indices: torch.Tensor
    llama_4_scaling: Optional[torch.Tensor]
    kv_caches: list  # one per layer
    out_cache_loc: torch.Tensor

    def clone(self) -> "MlaDecodeInputs":
        return dataclasses.replace(self, kv_caches=[c.clone() for c in self.kv_caches])


def make_inputs(case: MlaDecodeCase, gen: torch.Generator) -> MlaDecodeInputs:
    """Fresh random inputs (CPU generator, then moved), bf16 like the real activations."""
    b, h, dev = case.batch, case.heads, case.device
    r = lambda *s: torch.randn(*s, generator=gen).to(torch.bfloat16).to(dev)  # noqa: E731
    slots = max(case.batch, 1) * case.context
    caches = []
    for _ in range(case.layers):
        cache = (torch.randn(slots, 1, case.kv_lora_rank + case.rope_dim, generator=gen) * 0.5).to(_kv_torch_dtype(case))
        caches.append(cache.to(dev))
    # Each token attends to top-k slots of its own request; the last slot is the new token's.
    base = torch.arange(b) * case.context
    if b:
        offsets = torch.stack([torch.randperm(case.context - 1, generator=gen)[: case.topk] for _ in range(b)])
    else:
        offsets = torch.zeros(0, case.topk, dtype=torch.long)
    topk = (base[:, None] + offsets).to(torch.int32)
    if b > 1:
        topk[b // 2, case.topk // 2 :] = -1  # a short request: ragged
    out_cache_loc = base + case.context - 1
    positions = torch.randint(case.topk, 4096, (b,), generator=gen)
    llama = None
    if case.llama_4_scaling:
        llama = (1 + 0.1 * torch.log1p(torch.floor(positions / 1024.0)))[:, None, None].float().to(dev)
    return MlaDecodeInputs(
        q_pe=r(b, h, case.rope_dim),
        k_pe=r(b, 1, case.rope_dim),
        q_nope_out=r(h, b, case.kv_lora_rank).transpose(0, 1),  # the q-absorb bmm's (H,B,D) output, transposed
        k_nope=r(b, 1, case.kv_lora_rank),
        positions=positions.to(dev),
        topk_indices=topk.to(dev),
        llama_4_scaling=llama,
        kv_caches=caches,
        out_cache_loc=out_cache_loc.to(dev),
    )


def _mxfp4_quantise(x: torch.Tensor):
    from sgl_hip_kernels.standins.mxfp4_ref import mxfp4_quant_ref

    return mxfp4_quant_ref(x)


class MlaDecodePath:
    """One model's attention layers on the NSA decode path, ready to call ``forward_absorb_core``."""

    def __init__(self, case: MlaDecodeCase, gen: torch.Generator, sg: types.SimpleNamespace | None = None,
                 prefer: str | None = None):
        self.case, self.sg = case, sg or import_sglang()
        self.record = Record()
        self.streams = None  # a moe_streams.StreamLog while prepare() runs: kernels log their stream
        self.providers = {}
        fused = providers.resolve("fused_qk_rope_cat_and_cache_mla", device=case.device, prefer=prefer)
        sparse = providers.resolve("tilelang_sparse_fwd", device=case.device, prefer=prefer)
        if fused.fn is None or sparse.fn is None:
            raise providers.ProviderUnavailable(f"no provider for the NSA decode kernels here: {fused} {sparse}")
        self.providers = {"fused_qk_rope_cat_and_cache_mla": fused.kind, "tilelang_sparse_fwd": sparse.kind}
        self._fused = opaque("fused_qk_rope_cat_and_cache_mla", self._recording_fused(fused.fn))
        self._sparse = opaque("sparse_mla_decode", sparse.fn)
        self._mxfp4 = {}
        if case.w_vc == "mxfp4" or case.o_proj != "bf16":
            for name in ("batched_gemm_afp4wfp4_pre_quant", "fused_flatten_mxfp4_quant", "fused_flatten_fp8_group_quant"):
                res = providers.resolve(name, device=case.device, prefer=prefer)
                if res.fn is None:
                    raise providers.ProviderUnavailable(f"no provider for {name} here: {res.reasons}")
                self.providers[name] = res.kind
                self._mxfp4[name] = opaque(name, self._recording_quant(name, res.fn))
        self.layers = [self._make_layer(i, gen) for i in range(case.layers)]
        self.backend = self._make_backend()
        self.attn_backend = wrap_backend(self.sg, self.backend, case.wrapper)

    # -- kernels -----------------------------------------------------------------------------
    def _recording_fused(self, fn: Callable) -> Callable:
        def fused(*args, **kwargs):
            if self.streams is not None:
                self.streams.op("fused_rope_cat_cache")
            out = fn(*args, **kwargs)
            self.record.q_cat_ptr.append(out[0].data_ptr())
            return out

        return fused

    def _recording_quant(self, name: str, fn: Callable) -> Callable:
        def kernel(*args, **kwargs):
            if name == "batched_gemm_afp4wfp4_pre_quant":
                self.record.gemm_out.append(args[4] if len(args) > 4 else kwargs["y"])
            else:
                self.record.quant_in.append((name, args[0]))
            return fn(*args, **kwargs)

        return kernel

    def _attention(self, impl: str, q_all: torch.Tensor, kv_cache: torch.Tensor, page_table_1: torch.Tensor, sm_scale: float):
        if self.streams is not None:
            self.streams.op("attention")
        self.record.kernel_q.append((impl, q_all))
        n = q_all.shape[0]
        return self._sparse(q_all.reshape(n, self.case.heads, -1), kv_cache, page_table_1.unsqueeze(1), sm_scale, 512)

    # -- upstream objects ----------------------------------------------------------------------
    def _make_layer(self, layer_id: int, gen: torch.Generator):
        case, sg = self.case, self.sg
        layer = sg.AttentionMLA.__new__(sg.AttentionMLA)
        torch.nn.Module.__init__(layer)
        h, dev = case.heads, case.device
        angle = torch.rand(8192, 1, 1, case.rope_dim // 2, generator=gen) * 6.283
        layer.rotary_emb = types.SimpleNamespace(cos_cache=angle.cos().to(dev), sin_cache=angle.sin().to(dev),
                                                 is_neox_style=False)
        layer.current_attention_backend = case.attention
        layer.kv_cache_dtype = case.kv_dtype
        layer.attn_mqa = sg.RadixAttention(h, case.kv_lora_rank + case.rope_dim, (case.kv_lora_rank + case.rope_dim) ** -0.5,
                                            num_kv_heads=1, layer_id=layer_id, v_head_dim=case.kv_lora_rank)
        layer.attn_mqa.k_scale = None if case.k_scale is None else torch.tensor([case.k_scale], device=dev)
        layer.kv_lora_rank = case.kv_lora_rank
        layer.num_local_heads = h
        layer.v_head_dim = case.v_head_dim
        layer.use_deep_gemm_bmm = False
        layer.next_skip_topk = None
        layer.kv_b_proj = types.SimpleNamespace()  # 0.5.12+ asks it whether a LoRA adapter is wrapped (none is)
        w = lambda *s: (torch.randn(*s, generator=gen) * s[-2] ** -0.5).to(torch.bfloat16).to(dev)  # noqa: E731
        layer.w_kc = w(h, 128, case.kv_lora_rank)
        layer.w_scale = 1.0
        if case.w_vc == "mxfp4":
            # quark layout: w_vc (H, K/2, V) uint8 and w_scale_v (H, K/32, V); the GEMM reads their
            # (H, V, K/2) / (H, V, K/32) transposes.
            packed, scales = _mxfp4_quantise(torch.randn(h, case.v_head_dim, case.kv_lora_rank, generator=gen) * 0.05)
            layer.w_vc = packed.transpose(1, 2).contiguous().to(dev)
            layer.w_scale_v = scales.transpose(1, 2).contiguous().to(dev)
        else:
            layer.w_vc = w(h, case.kv_lora_rank, case.v_head_dim)
        o_weight = torch.randn(case.hidden, h * case.v_head_dim, generator=gen) * (h * case.v_head_dim) ** -0.5
        layer.o_proj = OProj(case.o_proj, o_weight, dev)
        return layer

    def _make_backend(self):
        if self.case.attention == "aiter":
            return aiter_mla_backend(self._attention)
        return nsa_backend(self.sg, self.case.impl, _kv_torch_dtype(self.case), self.case.heads, self.case.kv_lora_rank,
                           self._attention, self.record)

    # -- running -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hip(self):
        """Force the HIP flags and inject the kernels on the imported modules; restore afterwards."""
        fm, nb = self.sg.fm, self.sg.nb
        server_args = types.SimpleNamespace(nsa_decode_backend=self.case.impl, nsa_prefill_backend="tilelang")
        changes = [
            (fm, "_is_hip", True), (fm, "_use_aiter", True), (fm, "_use_aiter_gfx95", True),
            (fm, "fused_qk_rope_cat_and_cache_mla", self._fused), (fm, "get_global_server_args", lambda: server_args),
            (nb, "_is_hip", True),
        ] + [(fm, name, fn) for name, fn in self._mxfp4.items()]
        with swap_attrs(*changes):
            yield self

    # -- forward_absorb_prepare (then core): the decode fork and its streams ------------------------
    Q_LORA = 64  # q_lora_rank of the prepare path (small: only its layout matters)
    NOPE = 128  # qk_nope_head_dim (w_kc's middle dimension)

    def _add_prepare_parts(self, gen: torch.Generator) -> None:
        """What ``forward_absorb_prepare`` reads on each layer (once): the q/kv RMSNorms, q_b_proj and
        the indexer (stand-ins that log their stream), the head dims."""
        if getattr(self, "_prepare_parts", False):
            return
        case, dev = self.case, self.case.device
        for layer_id, layer in enumerate(self.layers):
            layer.q_lora_rank, layer.qk_rope_head_dim, layer.qk_nope_head_dim = self.Q_LORA, case.rope_dim, self.NOPE
            layer.qk_head_dim = self.NOPE + case.rope_dim
            layer.use_nsa, layer.skip_topk, layer.layer_id = case.attention == "nsa", False, layer_id
            layer.q_a_layernorm = _Rms(torch.rand(self.Q_LORA, generator=gen) + 0.5, "q_a_layernorm", self, dev)
            layer.kv_a_layernorm = _Rms(torch.rand(case.kv_lora_rank, generator=gen) + 0.5, "kv_a_layernorm", self, dev)
            weight = (torch.randn(case.heads * layer.qk_head_dim, self.Q_LORA, generator=gen) * self.Q_LORA**-0.5)
            layer.q_b_proj = _Proj(weight.to(torch.bfloat16).to(dev), "q_b_proj", self)
            layer.indexer = _Indexer(self)
        self._prepare_parts = True

    def prepare_inputs(self, x: MlaDecodeInputs, gen: torch.Generator):
        """``(hidden_states, qkv latent)``: the latent holds q_a (q_lora), then k_nope and k_pe (x's)."""
        t, dev = x.k_pe.shape[0], self.case.device
        q_a = torch.randn(t, self.Q_LORA, generator=gen).to(torch.bfloat16).to(dev)
        latent = torch.cat([q_a, x.k_nope.reshape(t, self.case.kv_lora_rank), x.k_pe.reshape(t, self.case.rope_dim)], dim=-1)
        return torch.randn(t, 16, generator=gen).to(torch.bfloat16).to(dev), latent

    def prepare_step(self, x: MlaDecodeInputs, hidden: torch.Tensor, latent: torch.Tensor, alt_stream, streams,
                     prev_topk_indices: torch.Tensor | None = None):
        """``forward_absorb_prepare`` then ``forward_absorb_core`` of every layer, in CUDA-graph capture
        mode, with ``alt_stream`` on the layers (None: upstream's serial order) and the kernels logging
        to ``streams`` (a moe_streams.StreamLog, installed by the caller). With ``prev_topk_indices``
        the layers reuse them (``skip_topk``: the index-cache path, no indexer call). Call inside :meth:`hip`."""
        from sglang.srt.model_executor import cuda_graph_runner

        self._add_prepare_parts(torch.Generator().manual_seed(0))
        self._topk_for_indexer = x.topk_indices
        fm = self.sg.fm
        context = types.SimpleNamespace(fetch_qkv_latent=lambda: latent)
        fb = self.forward_batch(x)
        outs = []
        self.streams = streams
        try:
            with swap_attrs((fm, "get_attn_tp_context", lambda: context), (fm, "nsa_use_prefill_cp", lambda fb: False),
                            (fm, "fused_qk_rmsnorm_bf16", _fused_qk_rmsnorm_stand_in),
                            (cuda_graph_runner, "get_is_capture_mode", lambda: True)):
                for layer in self.layers:
                    layer.alt_stream = alt_stream
                    layer.skip_topk = prev_topk_indices is not None
                    state = layer.forward_absorb_prepare(x.positions, hidden, fb, None, x.llama_4_scaling,
                                                         prev_topk_indices)
                    outs.append(layer.forward_absorb_core(*state))
        finally:
            self.streams = None
        return outs

    def forward_batch(self, x: MlaDecodeInputs, layer_index: int = 0):
        pool = types.SimpleNamespace(get_key_buffer=lambda layer_id: x.kv_caches[layer_id])
        return types.SimpleNamespace(
            forward_mode=getattr(self.sg.ForwardMode, self.case.mode), attn_backend=self.attn_backend,
            token_to_kv_pool=pool, out_cache_loc=x.out_cache_loc, encoder_out_cache_loc=None,
            hisparse_coordinator=None, batch_size=self.case.batch,
            topk_for_stand_in=x.topk_indices,  # read by the aiter MLA stand-in only
        )

    def step(self, x: MlaDecodeInputs, fb=None) -> list[torch.Tensor]:
        """``forward_absorb_core`` of every layer on ``x`` (call inside :meth:`hip`)."""
        fb = fb or self.forward_batch(x)
        topk = x.topk_indices if self.case.attention == "nsa" else None  # MLA has no indexer
        return [
            layer.forward_absorb_core(x.q_pe, x.k_pe, x.q_nope_out, x.k_nope, fb, None, x.positions,
                                      topk, x.llama_4_scaling)
            for layer in self.layers
        ]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class _Rms(torch.nn.Module):
    """RMSNorm (fp32 math, rounded once), logging its stream."""

    def __init__(self, weight, name, path, device):
        super().__init__()
        self.weight, self.variance_epsilon, self.name, self.path = weight.to(torch.bfloat16).to(device), 1e-6, name, path

    def forward(self, x):
        if self.path.streams is not None:
            self.path.streams.op(self.name)
        return _rms(x, self.weight, self.variance_epsilon)


def _fused_qk_rmsnorm_stand_in(q, q_weight, q_eps, k, k_weight, k_eps):
    """aiter's fused q/k RMSNorm (the no-stream path): the same values the two RMSNorms give."""
    return _rms(q, q_weight, q_eps), _rms(k, k_weight, k_eps)


class _Proj(torch.nn.Module):
    def __init__(self, weight, name, path):
        super().__init__()
        self.weight, self.name, self.path = weight, name, path

    def forward(self, x):
        if self.path.streams is not None:
            self.path.streams.op(self.name)
        return x @ self.weight.t(), None


class _Indexer:
    """The NSA indexer's contract here: top-k indices for the tokens (the case's), on some stream."""

    def __init__(self, path):
        self.path = path

    def __call__(self, x, q_lora, positions, forward_batch, layer_id):
        if self.path.streams is not None:
            self.path.streams.op("indexer")
        return self.path._topk_for_indexer.clone()

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

Shapes (GLM-5, ``glm_moe_dsa``, from its published config, as SPEC records them): 78 layers, 64
attention heads (8 per rank at TP8, 64 with DP attention), kv_lora_rank 512, qk_rope 64, index_topk
2048. The post-attention v-bmm and o_proj only need consistent shapes: v_head_dim 128 (DeepSeek-V3.2's)
unless a config says otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import types
from typing import Callable, Optional

import torch

from .. import providers
from ..audit import opaque

GLM5 = dict(layers=78, heads=64, kv_lora_rank=512, rope_dim=64, topk=2048, v_head_dim=128)
# Kimi-K2 (published config): 61 layers, 64 heads, kv_lora_rank 512, qk_rope 64, v_head_dim 128.
KIMI_K2 = dict(layers=61, heads=64, kv_lora_rank=512, rope_dim=64, v_head_dim=128, hidden=7168)



def model_shapes(defaults: dict, config_path: str | None = None) -> dict:
    """``defaults`` overridden by a model's ``config.json`` where it names the same quantities."""
    import json

    shapes = dict(defaults)
    if config_path:
        with open(config_path) as fh:
            cfg = json.load(fh)
        for key, name in (("layers", "num_hidden_layers"), ("heads", "num_attention_heads"), ("kv_lora_rank", "kv_lora_rank"),
                          ("rope_dim", "qk_rope_head_dim"), ("topk", "index_topk"), ("v_head_dim", "v_head_dim"),
                          ("hidden", "hidden_size")):
            if name in cfg:
                shapes[key] = cfg[name]
    return shapes


FM = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"
NB = "sglang.srt.layers.attention.nsa_backend"


def import_sglang() -> types.SimpleNamespace:
    """Import the sglang modules the path needs. On CUDA, sglang would import sgl_kernel (absent
    here): hide CUDA during the import only, so module flags come out as on a CPU host."""
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        fm = importlib.import_module(FM)
        nb = importlib.import_module(NB)
        fbi = importlib.import_module("sglang.srt.model_executor.forward_batch_info")
        ra = importlib.import_module("sglang.srt.layers.radix_attention")
        dv2 = importlib.import_module("sglang.srt.models.deepseek_v2")
        hybrid = importlib.import_module("sglang.srt.layers.attention.hybrid_attn_backend")
        tbo = importlib.import_module("sglang.srt.layers.attention.tbo_backend")
    finally:
        torch.cuda.is_available = real
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
    offsets = torch.stack([torch.randperm(case.context - 1, generator=gen)[: case.topk] for _ in range(b)]) if b else torch.zeros(0, case.topk, dtype=torch.long)
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
    from sgl_hip_kernels.ref import mxfp4_quant_ref

    return mxfp4_quant_ref(x)


class _OProj(torch.nn.Module):
    """o_proj stand-in: ``weight.dtype`` picks forward_absorb_core's quant branch; the forward takes
    what that branch produces (bf16 (B, H*V), or the (values, scales) tuple of the FP8 / MXFP4 quant),
    dequantises it (fp32) and applies a bf16 weight. Identical work in both arms of an A/B."""

    def __init__(self, kind: str, weight: torch.Tensor, device):
        super().__init__()
        self.kind = kind
        self.dense = weight.to(torch.bfloat16).to(device)
        dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "mxfp4": torch.uint8}[kind]
        self.weight = types.SimpleNamespace(dtype=dtype)

    def forward(self, x):
        return _o_proj_kernel(self, x)

    def _apply(self, x):
        if self.kind == "bf16":
            return x @ self.dense.t(), None
        values, scales = x
        if self.kind == "fp8":
            deq = (values.float().unflatten(-1, (scales.shape[-1], -1)) * scales[..., None]).flatten(-2)
        else:
            from sgl_hip_kernels.ref import mxfp4_dequant_ref

            deq = mxfp4_dequant_ref(values, scales.contiguous())
        return (deq.to(torch.bfloat16) @ self.dense.t()), None


_o_proj_kernel = opaque("o_proj", lambda module, x: module._apply(x))


class MlaDecodePath:
    """One model's attention layers on the NSA decode path, ready to call ``forward_absorb_core``."""

    def __init__(self, case: MlaDecodeCase, gen: torch.Generator, sg: types.SimpleNamespace | None = None,
                 prefer: str | None = None):
        self.case, self.sg = case, sg or import_sglang()
        self.record = Record()
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
        self.attn_backend = self._wrap(self.backend)

    # -- kernels -----------------------------------------------------------------------------
    def _recording_fused(self, fn: Callable) -> Callable:
        def fused(*args, **kwargs):
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
        layer.rotary_emb = types.SimpleNamespace(cos_cache=angle.cos().to(dev), sin_cache=angle.sin().to(dev), is_neox_style=False)
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
        layer.o_proj = _OProj(case.o_proj, torch.randn(case.hidden, h * case.v_head_dim, generator=gen) * (h * case.v_head_dim) ** -0.5, dev)
        return layer

    def _make_backend(self):
        if self.case.attention == "aiter":
            return self._make_mla_backend()
        return self._make_nsa_backend()

    def _wrap(self, backend):
        """``forward_batch.attn_backend`` as SGLang builds it: the backend, or a real
        ``HybridAttnBackend`` (decode and prefill backends differ) / ``TboAttnBackend`` (two-batch
        overlap) around it, made without ``__init__`` where that needs a model runner."""
        if self.case.wrapper == "none":
            return backend
        if self.case.wrapper == "hybrid":
            hybrid = self.sg.HybridAttnBackend.__new__(self.sg.HybridAttnBackend)
            hybrid.decode_backend = hybrid.prefill_backend = backend
            hybrid.model_runner = types.SimpleNamespace(server_args=types.SimpleNamespace(speculative_attention_mode="prefill"))
            return hybrid
        if self.case.wrapper == "tbo":
            return self.sg.TboAttnBackend(primary=backend, children=[backend, backend])
        raise ValueError(f"unknown backend wrapper {self.case.wrapper!r}")

    def _make_mla_backend(self):
        """A stand-in for aiter's MLA backend (``attention="aiter"``): the base backend's ``forward``
        (idle/decode dispatch) with a ``forward_decode`` that attends over each token's top-k slots."""
        path = self
        base = importlib.import_module("sglang.srt.layers.attention.base_attn_backend").AttentionBackend

        class AiterMlaStandIn(base):
            def init_forward_metadata(self, forward_batch):  # not used: no metadata to build
                pass

            def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
                kv = forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id)
                return path._attention("aiter-mla", q, kv, forward_batch.topk_for_stand_in, layer.scaling).reshape(q.shape[0], -1)

        backend = AiterMlaStandIn.__new__(AiterMlaStandIn)
        return backend

    def _make_nsa_backend(self):
        sg, case = self.sg, self.case
        backend = sg.Backend.__new__(sg.Backend)
        backend.nsa_decode_impl = case.impl
        backend.kv_cache_dtype = _kv_torch_dtype(case)
        # forward_decode reads these before calling the impls (SGLANG_NSA_FUSE_TOPK, the default,
        # takes the page table from topk_indices); the recorders ignore them.
        backend.forward_metadata = types.SimpleNamespace(
            page_table_1=None, cache_seqlens_int32=None, nsa_cache_seqlens_int32=None, nsa_cu_seqlens_q=None,
            nsa_cu_seqlens_k=None, nsa_max_seqlen_q=None, flashmla_metadata=None, cu_seqlens_q=None, max_seq_len_q=None,
        )
        backend._forward_tilelang = lambda q_all, kv_cache, page_table_1, sm_scale, v_head_dim: self._attention(
            "tilelang", q_all, kv_cache, page_table_1, sm_scale)
        backend._forward_aiter = lambda q_all, kv_cache, page_table_1, layer, metadata, bs: self._attention(
            "aiter", q_all, kv_cache, page_table_1, layer.scaling).reshape(q_all.shape[0], -1)
        backend._forward_flashmla_sparse = lambda q_all, kv_cache, page_table_1, sm_scale, v_head_dim: self._attention(
            "flashmla_sparse", q_all, kv_cache, page_table_1, sm_scale)
        backend._forward_flashmla_kv = lambda q_all, kv_cache, sm_scale, v_head_dim, layer, metadata, page_table_1: self._attention(
            "flashmla_kv", q_all, kv_cache, page_table_1, sm_scale)

        def split_consumer(impl):
            def consume(q_nope, q_rope, kv_cache, page_table_1, sm_scale):
                self.record.split_calls.append((impl, q_nope, q_rope))
                n = q_nope.shape[0]
                q_all = torch.cat([q_nope.reshape(n, case.heads, -1), q_rope.reshape(n, case.heads, -1)], -1)
                return self._attention(impl, q_all, kv_cache, page_table_1, sm_scale)

            return opaque(impl, consume)

        fa3 = split_consumer("fa3")
        backend._forward_fa3 = lambda q_rope, kv_cache, v_head_dim, q_nope, page_table, sm_scale, **_: fa3(
            q_nope, q_rope, kv_cache, page_table, sm_scale)
        trtllm = split_consumer("trtllm")

        def forward_trtllm(q, k, v, layer, forward_batch, seqlens, save_kv_cache, q_rope, k_rope, topk_indices, *rest):
            self.record.trtllm_args.append((q, q_rope))
            if q_rope is None:  # the full 576-wide q handed over whole
                q_rope = q.reshape(q.shape[0], case.heads, -1)[..., case.kv_lora_rank:]
                q = q.reshape(q.shape[0], case.heads, -1)[..., : case.kv_lora_rank]
            kv = forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id)
            return trtllm(q, q_rope, kv, topk_indices, layer.scaling)

        backend._forward_trtllm = forward_trtllm
        extend = split_consumer("extend")

        def forward_extend(q, k, v, layer, forward_batch, save_kv_cache=True, q_rope=None, k_rope=None, topk_indices=None, **_):
            assert q_rope is not None, "forward_extend needs the split form (nsa_backend asserts it)"
            kv = forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id)
            return extend(q, q_rope, kv, topk_indices, layer.scaling)

        backend.forward_extend = forward_extend
        return backend

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
        missing = object()
        saved = [(mod, name, getattr(mod, name, missing)) for mod, name, _ in changes]
        try:
            for mod, name, value in changes:
                setattr(mod, name, value)
            yield self
        finally:
            for mod, name, value in saved:
                if value is missing:
                    delattr(mod, name)
                else:
                    setattr(mod, name, value)

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

"""Stand-ins for the upstream objects around the MLA/NSA decode path: the attention backends (a real
``NativeSparseAttnBackend`` made without ``__init__``, whose impls are recorders; a stand-in for aiter's
MLA backend; SGLang's real ``HybridAttnBackend`` / ``TboAttnBackend`` around either) and the o_proj.

The recorders compute the same attention from what they were handed (through ``attend``, the path's
sparse decode kernel), so their inputs and outputs can be compared too; every one records its call.
"""

from __future__ import annotations

import importlib
import types
from typing import Callable

import torch

from .audit import opaque

# attend(impl, q_all, kv_cache, page_table_1, sm_scale) -> attention output: the path's kernel.
Attend = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def wrap_backend(sg: types.SimpleNamespace, backend, wrapper: str):
    """``forward_batch.attn_backend`` as SGLang builds it: the backend (``"none"``), or a real
    ``HybridAttnBackend`` (decode and prefill backends differ) / ``TboAttnBackend`` (two-batch
    overlap) around it, made without ``__init__`` where that needs a model runner."""
    if wrapper == "none":
        return backend
    if wrapper == "hybrid":
        hybrid = sg.HybridAttnBackend.__new__(sg.HybridAttnBackend)
        hybrid.decode_backend = hybrid.prefill_backend = backend
        hybrid.model_runner = types.SimpleNamespace(server_args=types.SimpleNamespace(speculative_attention_mode="prefill"))
        return hybrid
    if wrapper == "tbo":
        return sg.TboAttnBackend(primary=backend, children=[backend, backend])
    raise ValueError(f"unknown backend wrapper {wrapper!r}")


def aiter_mla_backend(attend: Attend):
    """A stand-in for aiter's MLA backend (Kimi-K2's path): the base backend's ``forward`` (idle/decode
    dispatch) with a ``forward_decode`` that attends over each token's top-k slots."""
    base = importlib.import_module("sglang.srt.layers.attention.base_attn_backend").AttentionBackend

    class AiterMlaStandIn(base):
        def init_forward_metadata(self, forward_batch):  # not used: no metadata to build
            pass

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            kv = forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id)
            return attend("aiter-mla", q, kv, forward_batch.topk_for_stand_in, layer.scaling).reshape(q.shape[0], -1)

    return AiterMlaStandIn.__new__(AiterMlaStandIn)


def nsa_backend(sg: types.SimpleNamespace, impl: str, kv_dtype: torch.dtype, heads: int, kv_lora_rank: int,
                attend: Attend, record) -> object:
    """The real ``NativeSparseAttnBackend`` (no ``__init__``) with ``nsa_decode_impl = impl`` and every
    impl a recorder: the whole-q consumers append ``(impl, q_all)`` to ``record.kernel_q`` (through
    ``attend``), the split-form ones (fa3, trtllm, extend) ``(impl, q, q_rope)`` to
    ``record.split_calls``; trtllm's raw arguments also go to ``record.trtllm_args``."""
    backend = sg.Backend.__new__(sg.Backend)
    backend.nsa_decode_impl = impl
    backend.kv_cache_dtype = kv_dtype
    # forward_decode reads these before calling the impls (SGLANG_NSA_FUSE_TOPK, the default,
    # takes the page table from topk_indices); the recorders ignore them.
    backend.forward_metadata = types.SimpleNamespace(
        page_table_1=None, cache_seqlens_int32=None, nsa_cache_seqlens_int32=None, nsa_cu_seqlens_q=None,
        nsa_cu_seqlens_k=None, nsa_max_seqlen_q=None, flashmla_metadata=None, cu_seqlens_q=None, max_seq_len_q=None,
    )
    backend._forward_tilelang = lambda q_all, kv_cache, page_table_1, sm_scale, v_head_dim: attend(
        "tilelang", q_all, kv_cache, page_table_1, sm_scale)
    backend._forward_aiter = lambda q_all, kv_cache, page_table_1, layer, metadata, bs: attend(
        "aiter", q_all, kv_cache, page_table_1, layer.scaling).reshape(q_all.shape[0], -1)
    backend._forward_flashmla_sparse = lambda q_all, kv_cache, page_table_1, sm_scale, v_head_dim: attend(
        "flashmla_sparse", q_all, kv_cache, page_table_1, sm_scale)
    backend._forward_flashmla_kv = lambda q_all, kv_cache, sm_scale, v_head_dim, layer, metadata, page_table_1: attend(
        "flashmla_kv", q_all, kv_cache, page_table_1, sm_scale)

    def split_consumer(name):
        def consume(q_nope, q_rope, kv_cache, page_table_1, sm_scale):
            record.split_calls.append((name, q_nope, q_rope))
            n = q_nope.shape[0]
            q_all = torch.cat([q_nope.reshape(n, heads, -1), q_rope.reshape(n, heads, -1)], -1)
            return attend(name, q_all, kv_cache, page_table_1, sm_scale)

        return opaque(name, consume)

    fa3 = split_consumer("fa3")
    backend._forward_fa3 = lambda q_rope, kv_cache, v_head_dim, q_nope, page_table, sm_scale, **_: fa3(
        q_nope, q_rope, kv_cache, page_table, sm_scale)
    trtllm = split_consumer("trtllm")

    def forward_trtllm(q, k, v, layer, forward_batch, seqlens, save_kv_cache, q_rope, k_rope, topk_indices, *rest):
        record.trtllm_args.append((q, q_rope))
        if q_rope is None:  # the full 576-wide q handed over whole
            q_rope = q.reshape(q.shape[0], heads, -1)[..., kv_lora_rank:]
            q = q.reshape(q.shape[0], heads, -1)[..., :kv_lora_rank]
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


class OProj(torch.nn.Module):
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
            from sgl_hip_kernels.standins.mxfp4_ref import mxfp4_dequant_ref

            deq = mxfp4_dequant_ref(values, scales.contiguous())
        return (deq.to(torch.bfloat16) @ self.dense.t()), None


_o_proj_kernel = opaque("o_proj", lambda module, x: module._apply(x))

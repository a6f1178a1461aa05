"""The DeepSeek-V4 attention decode of sglang 0.5.13+ on ROCm, driven through the real
``DeepseekV4HipRadixBackend.forward`` (``_forward_attention`` from 0.5.22) of the installed release.

The backend and its pool and metadata are real sglang classes made without ``__init__`` (what a
server's init would compute is set directly: the attributes ``forward`` reads, by release); the
caches are this project's writer of the 584 B/token FP8 layout (``sgl_hip_kernels.dsv4.quantize_kv``),
laid out as SGLang's pool lays them (one uint8 row of padded bytes per page, SWA pages of
``swa_page`` tokens, compressed pages of ``page // ratio``). The FlashMLA-format call at the end of
``forward`` is upstream's ``flash_mla_with_kvcache_entrypoint``; :meth:`Dsv4AttentionPath.kernel`
answers it with a chosen kernel (``"reference"``: the fp64 FlashMLA contract, ``"zeros"``: zeros, any other name: that
HIP backend of upstream's entrypoint, e.g. ``"triton"`` on a GPU) and records every call it gets.

Shapes follow the model: h_q heads of 512 (448 NoPE + 64 RoPE), the SWA scope's top-k a multiple of
64 (the backend asserts it), a sink per head; ``ratio`` 0 (SWA only), 4 (top-k over the C4 cache, per
token lengths) or 128 (every compressed token of the request, lengths clamped to >= 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types

import torch

from sgl_hip_kernels.dsv4 import quantize_kv
from sgl_hip_kernels.dsv4.sparse_decode_ref import sparse_decode_ref

from .sglang_import import import_modules, swap_attrs

HIP = "sglang.srt.layers.attention.deepseek_v4_backend_hip_radix"
FLASH = "sglang.srt.layers.attention.hip_flash_mla"
D = 512


def import_sglang() -> types.SimpleNamespace:
    hip, flash, pool, fbi = import_modules(HIP, FLASH, "sglang.srt.mem_cache.deepseek_v4_memory_pool",
                                           "sglang.srt.model_executor.forward_batch_info")
    return types.SimpleNamespace(hip=hip, flash=flash, pool=pool, fbi=fbi)


@dataclasses.dataclass(frozen=True)
class Dsv4AttentionCase:
    batch: int = 3
    heads: int = 16
    ratio: int = 4  # 0, 4 or 128
    swa_topk: int = 64
    extra_topk: int = 64  # ratio 4: the indexer's top-k; ratio 128: the compressed tokens per request
    page: int = 256  # the pool's page: SWA pages hold swa_page tokens, compressed pages page // ratio
    swa_page: int = 128
    swa_pages: int = 4
    extra_pages: int = 6
    dtype: torch.dtype = torch.float32  # q: bf16 on a GPU, fp32 under the interpreter
    mode: str = "decode"  # the ForwardMode: decode, or extend (the patch must leave it to upstream)
    extra_bytes: int = 584  # 584: the V4 layout; anything else stands for a layout ours does not read


@dataclasses.dataclass
class Dsv4AttentionInputs:
    q: torch.Tensor  # (batch, heads, 512)
    swa_cache: torch.Tensor  # (pages, page_bytes) uint8
    extra_cache: torch.Tensor | None
    swa_indices: torch.Tensor  # (batch, swa_topk) int32
    swa_lengths: torch.Tensor
    extra_indices: torch.Tensor | None
    extra_lengths: torch.Tensor | None
    sink: torch.Tensor  # (heads,) fp32


def _indices(gen, batch, topk, n_tokens, lengths, device):
    idx = torch.randint(0, n_tokens, (batch, topk), generator=gen, dtype=torch.int32)
    idx[torch.rand(batch, topk, generator=gen) < 0.1] = -1  # invalid entries inside the length
    past = torch.arange(topk)[None, :] >= lengths[:, None]
    idx[past & (torch.rand(batch, topk, generator=gen) < 0.5)] = -1
    return idx.to(device)


def make_inputs(case: Dsv4AttentionCase, gen: torch.Generator, device="cpu") -> Dsv4AttentionInputs:
    b, h = case.batch, case.heads
    q = (torch.randn(b, h, D, generator=gen) * 0.5).to(case.dtype).to(device)
    swa_kv = torch.randn(case.swa_pages, case.swa_page, D, generator=gen)
    swa_cache = quantize_kv(swa_kv, case.swa_page).to(device)
    swa_lengths = torch.randint(1, case.swa_topk + 1, (b,), generator=gen, dtype=torch.int32)
    swa_indices = _indices(gen, b, case.swa_topk, case.swa_pages * case.swa_page, swa_lengths, device)
    extra_cache = extra_indices = extra_lengths = None
    if case.ratio:
        block = case.page // case.ratio
        extra_cache = quantize_kv(torch.randn(case.extra_pages, block, D, generator=gen), block)
        if case.extra_bytes != 584:  # another layout's page size (its bytes are never read here)
            extra_cache = torch.zeros(case.extra_pages, block * case.extra_bytes, dtype=torch.uint8)
        extra_cache = extra_cache.to(device)
        extra_lengths = torch.randint(1, case.extra_topk + 1, (b,), generator=gen, dtype=torch.int32)
        extra_indices = _indices(gen, b, case.extra_topk, case.extra_pages * block, extra_lengths, device)
    sink = torch.randn(h, generator=gen, dtype=torch.float32).to(device)
    return Dsv4AttentionInputs(q, swa_cache, extra_cache, swa_indices, swa_lengths.to(device), extra_indices,
                               None if extra_lengths is None else extra_lengths.to(device), sink)


class Dsv4AttentionPath:
    """The real backend of the installed release over one set of inputs."""

    def __init__(self, case: Dsv4AttentionCase, x: Dsv4AttentionInputs, sg: types.SimpleNamespace):
        self.case, self.x, self.sg = case, x, sg
        self.calls: list[dict] = []  # what upstream's entrypoint was handed, in order
        self.backend = self._backend()

    def _pool(self):
        case, x = self.case, self.x
        pool = object.__new__(self.sg.pool.DeepSeekV4TokenToKVPool)
        fields = dict(page_size=case.page, swa_window_size=case.swa_page, swa_page_size=case.swa_page, request_window=None,
                      swa_kv_pool=types.SimpleNamespace(kv_cache_total_dim=584))
        getters = dict(get_swa_key_buffer_radix=lambda layer_id: x.swa_cache,
                       get_extra_key_buffer=lambda layer_id: x.extra_cache,
                       get_extra_key_page_size=lambda layer_id: case.page // case.ratio,
                       get_extra_key_bytes_per_token=lambda layer_id: case.extra_bytes)
        pool.__dict__.update(fields, **getters)  # instance attributes: the class's methods need a real init
        return pool

    def _metadata(self):
        x, meta = self.x, object.__new__(self.sg.hip.DSV4AttnMetadata)
        fields = dict(swa_page_indices=x.swa_indices, swa_topk_lengths=x.swa_lengths,
                      c4_sparse_page_indices=x.extra_indices, c4_sparse_topk_lengths=x.extra_lengths,
                      c128_page_indices=x.extra_indices, c128_topk_lengths_clamp1=x.extra_lengths,
                      _aiter_sparse_masked_indices=None,
                      sparse_page_indices=lambda ratio: x.extra_indices, sparse_topk_lengths=lambda ratio: x.extra_lengths,
                      get_flashmla_metadata=lambda ratio: None)
        meta.__dict__.update(fields)
        return meta

    def _backend(self):
        backend = object.__new__(self.sg.hip.DeepseekV4HipRadixBackend)
        backend.__dict__.update(mtp_enabled=False, is_draft_worker=False, is_dspark_draft=False, head_dim_v=D,
                                softmax_scale=D ** -0.5, token_to_kv_pool=self._pool(),
                                forward_metadata=types.SimpleNamespace(core_attn_metadata=self._metadata()))
        return backend

    def forward_batch(self):
        mode = getattr(self.sg.fbi.ForwardMode, self.case.mode.upper())
        return types.SimpleNamespace(forward_mode=mode)

    @contextlib.contextmanager
    def kernel(self, name: str = "reference"):
        """Upstream's entrypoint answered by ``name`` (module docstring), on HIP's code path."""
        real = self.sg.flash.flash_mla_with_kvcache_entrypoint

        def entrypoint(backend, **call):
            self.calls.append(call)
            if name == "reference":
                return reference_call(call)
            if name == "zeros":  # a call whose answer does not matter, only that it was made
                return torch.zeros_like(call["q"]), None
            with swap_attrs((os, "environ", {**os.environ, "SGLANG_HACK_FLASHMLA_BACKEND": name})):
                return real(name, **call)

        changes = [(self.sg.flash, "flash_mla_with_kvcache_entrypoint", entrypoint), (self.sg.flash, "is_hip", lambda: True)]
        if hasattr(self.sg.hip, "flash_mla_with_kvcache_entrypoint"):  # 0.5.22+: imported at module level
            changes.append((self.sg.hip, "flash_mla_with_kvcache_entrypoint", entrypoint))
        with swap_attrs(*changes):
            yield

    def run(self, **extra):
        """``backend.forward`` for one layer of the case's ratio: (batch, heads, 512)."""
        layer = types.SimpleNamespace(layer_id=0, v_head_dim=D)
        return self.backend.forward(self.x.q, self.x.q, self.x.q, layer, self.forward_batch(),
                                    compress_ratio=self.case.ratio, save_kv_cache=False, attn_sink=self.x.sink, **extra)

    def reference(self, work=torch.float64):
        """The FlashMLA contract over this case's inputs (not through upstream): (batch, heads, 512)."""
        x, case = self.x, self.case
        extra = {}
        if case.ratio:
            extra = dict(extra_k_cache=x.extra_cache, extra_indices=x.extra_indices[:, None],
                         extra_block_size=case.page // case.ratio, extra_topk_length=x.extra_lengths)
        out, _ = sparse_decode_ref(x.q[:, None], x.swa_cache, x.swa_indices[:, None], case.swa_page, D ** -0.5,
                                   topk_length=x.swa_lengths, attn_sink=x.sink, work=work, **extra)
        return out[:, 0]


def reference_call(call: dict, work=torch.float64):
    """The fp64 FlashMLA contract of one entrypoint call: (out, lse) as the kernels return them."""
    k, extra = call["k_cache"], call.get("extra_k_cache")
    kw = {}
    if extra is not None:
        kw = dict(extra_k_cache=extra, extra_indices=call["extra_indices_in_kvcache"], extra_block_size=extra.shape[1],
                  extra_topk_length=call.get("extra_topk_length"))
    out, lse = sparse_decode_ref(call["q"], k, call["indices"], k.shape[1], call["softmax_scale"],
                                 topk_length=call.get("topk_length"), attn_sink=call.get("attn_sink"), work=work, **kw)
    return out.to(call["q"].dtype), lse


__all__ = ["Dsv4AttentionCase", "Dsv4AttentionInputs", "Dsv4AttentionPath", "import_sglang", "make_inputs",
           "reference_call"]

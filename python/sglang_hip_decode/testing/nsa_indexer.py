"""The NSA indexer's q/k path (``Indexer._get_q_k_bf16`` / ``_get_k_bf16``) of the installed sglang,
on a real ``Indexer`` made without ``__init__``, for the indexer-rope-guard parity tests and benchmark:
``nsa/nsa_indexer.py`` up to 0.5.12.post1, ``dsa/dsa_indexer.py`` from 0.5.13 (the NSA -> DSA rename;
0.5.23 also returns the raw weights and drops ``_get_k_bf16``'s dual-stream argument).

Stand-ins: ``wq_b``/``wk`` are bf16 linears, ``k_norm`` a LayerNorm, ``rotate_activation`` a torch
Walsh-Hadamard transform (``scale = d^-1/2``, what sglang's hadamard kernel computes), and the
RoPE is either *in place* (rotates q/k where they lie and returns those same views, as the HIP
kernels do) or *out of place* (returns new tensors). Both RoPE stand-ins are opaque kernels for
the copy audit, so its counts are the write-back copies of the upstream code alone.

Shapes (GLM-5 / DeepSeek-V3.2 indexer): 64 index heads, head dim 128, rope 64, q_lora 2048
(GLM-5; 1536 for DeepSeek-V3.2), hidden 6144 (GLM-5); only the write-back depends on the heads,
head dim and rope.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types

import torch

from .audit import opaque
from .sglang_import import import_modules, swap_attrs

NI = "sglang.srt.layers.attention.nsa.nsa_indexer"  # 0.5.11 ... 0.5.12.post1
DI = "sglang.srt.layers.attention.dsa.dsa_indexer"  # 0.5.13 and later (nsa_indexer re-exports it)


def indexer_module_name() -> str:
    import importlib.util

    import_modules("sglang.srt.layers.attention")
    return DI if importlib.util.find_spec(DI.rsplit(".", 1)[0]) is not None else NI


def import_indexer():
    (module,) = import_modules(indexer_module_name())
    return module


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``rotate_activation``'s transform (scale d^-1/2) in fp32, returned in x's dtype."""
    from sgl_hip_kernels.rotations_ref import hadamard_ref

    return hadamard_ref(x.float()).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # GPT-J interleaved pairs in fp32, rounded once to x's dtype
    from sgl_hip_kernels.rotations_ref import rope_ref

    return rope_ref(x, cos, sin, is_neox=False).to(x.dtype)


class RopeStandIn:
    """``rotary_emb(positions, q, k) -> (q', k')``; in place returns the very views it was given."""

    def __init__(self, in_place: bool, rope_dim: int, max_pos: int, gen: torch.Generator, device):
        angle = torch.rand(max_pos, rope_dim // 2, generator=gen) * 6.283
        self.cos, self.sin = angle.cos().to(device), angle.sin().to(device)
        self.in_place = in_place
        self.kernel = opaque("rope_inplace" if in_place else "rope", self._apply)

    def _apply(self, positions, q, k):
        cos, sin = self.cos[positions], self.sin[positions]
        cq, sq = (cos[:, None, :], sin[:, None, :]) if q.dim() == 3 else (cos, sin)
        ck, sk = (cos[:, None, :], sin[:, None, :]) if k.dim() == 3 else (cos, sin)
        q_new, k_new = _rotate(q, cq, sq), _rotate(k, ck, sk)
        if not self.in_place:
            return q_new, k_new
        q.copy_(q_new)
        k.copy_(k_new)
        return q, k

    def __call__(self, positions, q, k):
        return self.kernel(positions, q, k)


class _Linear(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.t(), None


@dataclasses.dataclass(frozen=True)
class IndexerCase:
    tokens: int
    in_place_rope: bool = True
    heads: int = 64
    head_dim: int = 128
    rope_dim: int = 64
    q_lora_rank: int = 2048
    hidden: int = 6144
    device: str = "cpu"


class IndexerPath:
    def __init__(self, case: IndexerCase, gen: torch.Generator, ni=None):
        self.case, self.ni = case, ni or import_indexer()
        dev = case.device
        w = lambda *s: (torch.randn(*s, generator=gen) * s[-1] ** -0.5).to(torch.bfloat16).to(dev)  # noqa: E731
        idx = self.ni.Indexer.__new__(self.ni.Indexer)
        torch.nn.Module.__init__(idx)
        idx.head_dim, idx.rope_head_dim, idx.n_heads = case.head_dim, case.rope_dim, case.heads
        idx.wq_b = _Linear(w(case.heads * case.head_dim, case.q_lora_rank))
        idx.wk = _Linear(w(case.head_dim, case.hidden))
        idx.k_norm = torch.nn.LayerNorm(case.head_dim).to(torch.bfloat16).to(dev).requires_grad_(False)
        idx.rotary_emb = RopeStandIn(case.in_place_rope, case.rope_dim, 8192, gen, dev)
        idx.alt_stream = None
        idx.nsa_enable_prefill_cp = idx.dsa_enable_prefill_cp = False  # context parallel off (either name)
        idx.use_dsa_indexer_fusion = idx.use_aiter_fused_fp8_writer = False  # 0.5.23: the unfused path
        self.indexer = idx
        self.forward_batch = types.SimpleNamespace(attn_cp_metadata=None, forward_mode=None)
        import inspect

        self._k_takes_dual_stream = "enable_dual_stream" in inspect.signature(self.ni.Indexer._get_k_bf16).parameters

    def inputs(self, gen: torch.Generator):
        c, dev = self.case, self.case.device
        q_lora = torch.randn(c.tokens, c.q_lora_rank, generator=gen).to(torch.bfloat16).to(dev)
        x = torch.randn(c.tokens, c.hidden, generator=gen).to(torch.bfloat16).to(dev)
        positions = torch.randint(0, 8192, (c.tokens,), generator=gen).to(dev)
        return q_lora, x, positions

    @contextlib.contextmanager
    def rotate_stand_in(self):
        """``rotate_activation`` imports a CUDA JIT kernel; use the torch transform meanwhile."""
        with swap_attrs((self.ni, "rotate_activation", opaque("hadamard", hadamard))):
            yield self

    def q_k(self, q_lora, x, positions):
        """``(query, key)`` (0.5.23 returns the raw weights third: None on this path)."""
        out = self.indexer._get_q_k_bf16(q_lora, x, positions, False, self.forward_batch)
        assert len(out) == 2 or (len(out) == 3 and out[2] is None), len(out)
        return tuple(out[:2])

    def k(self, x, positions):
        if self._k_takes_dual_stream:
            return self.indexer._get_k_bf16(x, positions, False)
        return self.indexer._get_k_bf16(x, positions)

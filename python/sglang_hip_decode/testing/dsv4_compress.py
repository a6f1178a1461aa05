"""One decode step of the DeepSeek-V4 KV compressor of sglang 0.5.13+, driven through the real
``CompressorBackendMixin._forward_compress_all_in_one`` (``compressor_v2``) of the installed release:
the method ``forward_unified`` calls on ROCm with SGLang's defaults (compressor v2, JIT norm).

What is real and what stands in:

* real: the method (upstream's, or as the ``dsv4-fused-compress`` patch edits it), its plan type
  (``CompressorDecodePlan``), the metadata kernel that makes ``out_loc``, and upstream's HIP cache
  store (``fused_store_cache``: a Triton kernel on ROCm, run here with ``is_hip_runtime`` answered
  True) wherever rows are handed to it: the stand-ins' rows, and the patch's under
  :meth:`Dsv4CompressStep.rows_to_upstreams_store` (the patch itself stores in its own launch);
* made here, as SGLang lays them out: the state pool (fp32 rows of ``[kv | score]``, one ring of
  ``ring_size`` rows per SWA page: a token's row at ``swa_page * ring_size + swa_loc % ring_size``;
  from 0.5.20 ratio 128 has one ring per request, row ``rid * ring_size + pos % ring_size``),
  ``req_to_token`` / ``full_to_swa`` with SWA pages aligned to positions, the compressed cache
  (V4 584 B/token pages, or the indexer's 132 B/token) and ``out_loc`` (0 where a request emits
  nothing: the metadata's dummy slot; computed by the release's own metadata kernel, so its dtype too);
* stand-ins (torch, on the CPU only: upstream's versions are JIT C++ kernels, CUDA/HIP only),
  written from upstream's sources: the decode planner (``c_plan.cuh``'s ``plan_compress_decode``),
  ``compress_forward`` (``c4_v2.cuh`` / ``c128_v2.cuh``: store the new row, pool an emitting
  request's block; an ape-biased score that is -inf on every row of a channel gives NaN there, as
  their max-subtracting softmax does) and ``compress_norm_rope_store``'s norm, RoPE and indexer
  rotation (``fused_norm_rope_v2.cuh``, the attention rows rounded to bf16 as it rounds them), whose
  rows go to the same real store (upstream's own stores inside that kernel: the same layout and
  rounding, a scale floor of 1e-4 where the Triton store's is 1e-8). Each records its
  calls, so a test sees which path ran.

The rows a request's history holds, the ape and the RoPE table are drawn from ``seed``; the
reference of an emitted block is ``sgl_hip_kernels.dsv4.compress_ref.compress_sequence_ref`` over
the request's whole history (fp64, or fp32: torch's own error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import types

import torch

from sgl_hip_kernels.dsv4.compress_ref import compress_sequence_ref
from sgl_hip_kernels.dsv4.kv_cache import dequantize_kv, page_bytes
from sgl_hip_kernels.rotations_ref import hadamard_ref

from .. import patching
from .sglang_import import import_modules, swap_attrs

COMPRESSOR = "sglang.srt.layers.attention.dsv4.compressor_v2"
POOL = "sglang.srt.mem_cache.deepseek_v4_memory_pool"
# The metadata kernel moved in 0.5.16 (the first name exists from there, the second before).
METADATA = ("sglang.kernels.ops.attention.dsv4.metadata_kernel", "sglang.srt.layers.attention.dsv4.metadata_kernel")
EPS = 1e-6
MAX_POS = 1024


def import_sglang() -> types.SimpleNamespace:
    cv2, pool = import_modules(COMPRESSOR, POOL)
    store_module = sys.modules[pool.fused_store_cache.__module__]
    return types.SimpleNamespace(cv2=cv2, pool=pool, store=store_module, fused_store_cache=pool.fused_store_cache)


@dataclasses.dataclass(frozen=True)
class Dsv4CompressCase:
    ratio: int = 4  # 4 (with overlap) or 128
    head_dim: int = 512  # 512: the attention compressor; 128: the indexer's (rotated, 132 B/token cache)
    lens: tuple = (4, 7, 8, 1, 12)  # each request's length after this step; 0: a padded slot
    swa_page: int = 16  # SWA page (tokens); the ring (8 rows for ratio 4, 128 for ratio 128) divides it
    page_size: int = 2  # the compressed cache's page (compressed tokens)
    neg_inf_channel: bool = False  # one score channel -inf on every token of every request


def upstream_out_loc(seq_lens: torch.Tensor, raw_out_loc: torch.Tensor, ratio: int) -> torch.Tensor:
    """The compressor's ``out_loc`` as the release's own metadata kernel makes it
    (``_init_compressed_attn_metadata_triton``: the token's slot // ratio where the request closes a
    block, else 0; int32 up to 0.5.13.post1, int64 from 0.5.14), from the lengths after the step and
    each request's new-token slot. A Triton kernel: on the CPU it needs ``TRITON_INTERPRET=1``."""
    meta = None
    for name in METADATA:
        try:
            (meta,) = import_modules(name)
            break
        except ModuleNotFoundError as e:
            if not name.startswith(e.name or "\0"):
                raise  # the module is there and something it imports is not
    if meta is None:
        raise ModuleNotFoundError(f"the release has none of {METADATA}")
    out = meta._init_compressed_attn_metadata_triton(seq_lens.to(torch.int32), seq_lens.to(torch.int32) - 1,
                                                      raw_out_loc.to(torch.int64), compute_page_indices=False)
    return out[0] if ratio == 4 else out[4]  # (c4_out_loc, ..., c128_out_loc, ...) in both layouts


def ring_size(ratio: int) -> int:
    return 8 if ratio == 4 else 128  # get_compress_state_ring_size, without speculative decoding


class Dsv4CompressStep:
    """The pools, metadata and inputs of one decode step (``case``), and both ways to run it."""

    def __init__(self, case: Dsv4CompressCase, sg: types.SimpleNamespace, seed: int = 0, device="cpu"):
        self.case, self.sg, self.device = case, sg, device
        r, d = case.ratio, case.head_dim
        if case.swa_page % ring_size(r):
            raise ValueError(f"swa_page {case.swa_page} must be a multiple of the ring ({ring_size(r)})")
        gen = torch.Generator().manual_seed(seed)
        self.width = (4 if r == 4 else 2) * d
        self.k = 8 if r == 4 else 128
        b = len(case.lens)
        # Request 0 of req_to_token is the padded slots' dummy; request i + 1 is batch row i.
        longest = max(max(case.lens), 1)
        swa_pages_per_req = math.ceil(longest / case.swa_page)
        n_swa_pages = (b + 1) * swa_pages_per_req
        page_of = torch.randperm(n_swa_pages, generator=gen).reshape(b + 1, swa_pages_per_req)
        pos = torch.arange(longest)
        swa_loc = page_of[:, pos // case.swa_page] * case.swa_page + pos % case.swa_page  # (b + 1, longest)
        n_full = (b + 1) * longest
        full = torch.randperm(n_full, generator=gen).reshape(b + 1, longest)  # req_to_token
        self.full_to_swa = torch.empty(n_full, dtype=torch.int64)
        self.full_to_swa[full.reshape(-1)] = swa_loc.reshape(-1)
        self.req_to_token = full.to(torch.int32)
        self.req_pool_indices = torch.tensor([i + 1 if n > 0 else 0 for i, n in enumerate(case.lens)])
        self.seq_lens = torch.tensor([n if n > 0 else 1 for n in case.lens])
        # Every request's token rows (its history): scores and kv ~ N(0, 4).
        self.history = torch.randn(b + 1, longest, self.width, generator=gen) * 2
        if case.neg_inf_channel:  # score channel 5 (both halves for ratio 4: every row of a block)
            for col in ((2 * d + 5, 3 * d + 5) if r == 4 else (d + 5,)):
                self.history[..., col] = float("-inf")
        ring = ring_size(r)
        # The ring layout the release's planner uses: from 0.5.20 ratio 128 keeps one ring per request
        # (row rid * ring + pos % ring); otherwise one per SWA page (swa_page * ring + swa_loc % ring).
        self.req_ring = r == 128 and patching.installed_release() >= (0, 5, 20, 0)
        self.swa_loc = swa_loc
        state = torch.full((max(n_swa_pages, b + 1) * ring + r, self.width), float("nan"))
        for i, (req, n) in enumerate(zip(self.req_pool_indices.tolist(), self.seq_lens.tolist())):
            if case.lens[i] <= 0:
                continue
            for t in range(n - 1):  # the rows of every earlier token, in order (later ones overwrite)
                state[self.state_loc(req, t)] = self.history[req, t]
        self.state0 = state
        self.u = torch.stack([self.history[int(q), int(n) - 1] for q, n in zip(self.req_pool_indices, self.seq_lens)])
        ape = torch.randn(self.k, d, generator=gen)  # the hot-fixed ape as (K, d) rows
        self.ape = ape.reshape(r, -1) if r == 4 else ape  # the parameter's shape: (4, 2d) / (128, d)
        self.norm = types.SimpleNamespace(weight=torch.rand(d, generator=gen) + 0.5, variance_epsilon=EPS)
        angle = torch.rand(MAX_POS, 32, generator=gen, dtype=torch.float64) * 6.283
        self.freqs = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)
        emits = [n > 0 and n % r == 0 for n in case.lens]
        self.emitting = [i for i, e in enumerate(emits) if e]
        locs = torch.randperm(2 * b + 2, generator=gen)[: b] + 1  # distinct compressed slots, never 0
        # Each request's new-token slot: an emitting one's // ratio is its distinct compressed slot.
        raw = locs * r + (self.seq_lens - 1) % r
        self.out_loc = upstream_out_loc(self.seq_lens.to(device), raw.to(device), r).cpu()
        if self.out_loc.tolist() != torch.where(torch.tensor(emits), locs, 0).tolist():
            raise AssertionError("upstream's metadata places the compressed rows elsewhere than assumed")
        pages = math.ceil((2 * b + 3) / case.page_size)
        nbytes = 132 * case.page_size if self.indexer else page_bytes(case.page_size)
        self.cache0 = torch.randint(0, 256, (pages, nbytes), generator=gen, dtype=torch.uint8)
        self.calls: dict[str, list] = {"compress_forward": [], "norm_rope_store": [], "store": []}

    def state_loc(self, req: int, pos: int) -> int:
        """The state row of request ``req``'s token ``pos``, as the release's planner places it."""
        ring = ring_size(self.case.ratio)
        if self.req_ring:
            return req * ring + pos % ring
        s = int(self.swa_loc[req, pos])
        return (s // self.case.swa_page) * ring + s % ring

    @property
    def indexer(self) -> bool:
        return self.case.head_dim == 128

    # -- the decode plan (stand-in for the C++ planner) ----------------------------------------

    def plan(self):
        """``CompressorDecodePlan`` as ``plan_compress_decode`` builds it: per request int32
        (seq_len, write_loc, previous block's page, current block's page) in 16 bytes."""
        r = self.case.ratio
        pos1 = self.seq_lens - 1
        pos0 = (pos1 - r).clamp(min=0)
        rids = self.req_pool_indices.tolist()
        write = torch.tensor([self.state_loc(q, int(p)) for q, p in zip(rids, pos1)])
        read0 = torch.tensor([self.state_loc(q, int(p)) // r for q, p in zip(rids, pos0)])
        raw = torch.stack([self.seq_lens, write, read0, write // r], 1).to(torch.int32)
        plan_d = raw.contiguous().view(torch.uint8).reshape(-1, 16).to(self.device)
        return self.sg.cv2.CompressorDecodePlan(r, plan_d)

    # -- stand-ins for upstream's JIT kernels --------------------------------------------------

    def _compress_forward(self, *, kv_score_buffer, kv_score_input, ape, plan, compress_ratio, head_dim, out=None,
                          is_online=False):
        r, d = compress_ratio, head_dim
        self.calls["compress_forward"].append(dict(ratio=r, online=is_online))
        buf = kv_score_buffer.view(-1, kv_score_buffer.shape[-1])
        p = plan.plan_d.view(torch.int32)
        seq, write, rp0, rp1 = (p[:, i].long() for i in range(4))
        buf[write] = kv_score_input.to(buf.dtype)
        res = torch.full((p.shape[0], d), float("nan"), dtype=kv_score_input.dtype, device=buf.device)  # unwritten
        for b in range(p.shape[0]):
            if seq[b] % r:
                continue
            if r == 4:
                prev, cur = buf[rp0[b] * 4: rp0[b] * 4 + 4], buf[rp1[b] * 4: rp1[b] * 4 + 4]
                kv = torch.cat([prev[:, :d], cur[:, d: 2 * d]])
                score = torch.cat([prev[:, 2 * d: 3 * d], cur[:, 3 * d:]])
                if seq[b] <= 4:  # the first block: no previous one (its rows: kv 0, score -FLT_MAX)
                    kv[:4], score[:4] = 0.0, -torch.finfo(torch.float32).max
            else:
                rows = buf[rp1[b] * r: rp1[b] * r + r]
                kv, score = rows[:, :d], rows[:, d:]
            score = score.float() + ape.float()
            m = score.amax(0)
            e = torch.exp(score - m)
            res[b] = ((kv.float() * e).sum(0) / e.sum(0)).to(res.dtype)
        return res

    def _norm_rope_store(self, kv, plan, *, norm_weight, norm_eps, freq_cis, out_loc, kvcache, page_size,
                         use_fp4=False, **unused):
        self.calls["norm_rope_store"].append(dict(use_fp4=use_fp4, unused=sorted(unused)))
        p = plan.plan_d.view(torch.int32)
        r = plan.compress_ratio
        keep = [b for b in range(p.shape[0]) if int(p[b, 0]) % r == 0]
        if not keep:
            return
        x = kv[keep].float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight.float()
        f = freq_cis[(p[keep, 0] - r).long()]  # (n, 32) complex: the block's first position
        rot = torch.view_as_complex(x[:, -64:].reshape(-1, 32, 2).contiguous()) * f
        x = torch.cat([x[:, :-64], torch.view_as_real(rot).reshape(-1, 64)], 1)
        if x.shape[1] == 128:
            x = hadamard_ref(x.double()).float()
        else:  # the attention rows: rounded to bf16 before the FP8 quantisation (its store does that)
            x = x.bfloat16()
        self.upstream_rows = x
        self._store(x, kvcache, out_loc[keep], page_size)

    def _store(self, rows, cache, loc, page_size):
        store = self.sg.fused_store_cache  # upstream's, as imported (the pool module's name is swapped in run)
        with swap_attrs((self.sg.store, "is_hip_runtime", lambda: True)):
            store(rows, cache, loc, page_size=page_size, type="indexer" if self.indexer else "flashmla")

    def _recording_store(self, rows, cache, loc, *, page_size, type):
        self.calls["store"].append(dict(rows=rows.clone(), loc=loc.clone(), type=type))
        self._store(rows, cache, loc, page_size)

    # -- running the step -------------------------------------------------------------------------

    def _stand_ins(self, upstream: str, record: bool):
        """The attribute swaps of one call: upstream's JIT kernels by the stand-ins (``upstream=
        "standin"``; ``"real"``: upstream's own, a GPU with the JIT toolchain), the store recorded
        (``record``; off when timing: recording copies the rows)."""
        cv2 = self.sg.cv2
        changes = []
        if upstream == "standin":
            changes += [(cv2, "compress_forward", self._compress_forward),
                        (cv2, "compress_norm_rope_store", self._norm_rope_store)]
        elif upstream != "real":
            raise ValueError(f"upstream must be 'standin' or 'real', got {upstream!r}")
        store = self._recording_store if record else (
            lambda rows, cache, loc, *, page_size, type: self._store(rows, cache, loc, page_size))
        return changes + [(self.sg.pool, "fused_store_cache", store)]

    def prepare(self, upstream: str = "standin"):
        """Device buffers for :meth:`call` (the plan from the stand-in planner, or upstream's own
        ``CompressorDecodePlan.generate`` with ``upstream="real"``): a step that can be repeated, as
        a CUDA graph replays it (it stores the same row and the same block each time)."""
        dev, r = self.device, self.case.ratio
        plan = self.plan() if upstream == "standin" else self.sg.cv2.CompressorDecodePlan.generate(
            r, self.req_pool_indices.to(dev), self.req_to_token.to(dev), self.full_to_swa.to(dev),
            self.seq_lens.to(dev), self.case.swa_page, ring_size(r))
        self.buffers = dict(
            kv_score_buffer=self.state0.clone().to(dev), kv_score_input=self.u.to(dev),
            ape=self.ape.to(dev), head_dim=self.case.head_dim,
            norm=types.SimpleNamespace(weight=self.norm.weight.to(dev), variance_epsilon=EPS),
            freqs_cis_cache=self.freqs.to(dev), kv_cache=self.cache0.clone().to(dev), is_indexer=self.indexer,
            rotate=self.indexer, compress_ratio=r, page_size=self.case.page_size, out_loc=self.out_loc.to(dev))
        self.backend = object.__new__(self.sg.cv2.CompressorBackendMixin)
        self.backend.forward_metadata = types.SimpleNamespace(**{f"c{r}_compress_metadata": plan})
        return self.buffers

    def call(self, upstream: str = "standin", record: bool = True):
        """``_forward_compress_all_in_one`` on the buffers of :meth:`prepare`, as ``forward_unified``
        calls it."""
        with swap_attrs(*self._stand_ins(upstream, record)):
            self.backend._forward_compress_all_in_one(**self.buffers)

    def run(self, upstream: str = "standin"):
        """One call on fresh copies of the state and cache: -> (state, cache) after the step."""
        buffers = self.prepare(upstream)
        self.call(upstream)
        return buffers["kv_score_buffer"].cpu(), buffers["kv_cache"].cpu()

    # -- references and readers ---------------------------------------------------------------------

    def reference(self, b: int, work=torch.float64) -> torch.Tensor:
        """The contract's block that batch row ``b`` emits (it must emit), in ``work``."""
        r, d = self.case.ratio, self.case.head_dim
        req, n = int(self.req_pool_indices[b]), int(self.seq_lens[b])
        bias = self.ape.reshape(self.k, d)
        table = torch.view_as_real(self.freqs.to(torch.complex128))
        seq = compress_sequence_ref(self.history[req, :n].to(work), r, d, bias.to(work), self.norm.weight.to(work), EPS,
                                    table[..., 0].to(work), table[..., 1].to(work), self.indexer)
        return seq[n // r - 1]

    def stored_row(self, cache: torch.Tensor, loc: int) -> torch.Tensor:
        """Compressed slot ``loc`` of ``cache`` dequantised to fp32 (512: V4 layout; 128: indexer)."""
        ps = self.case.page_size
        page, slot = divmod(loc, ps)
        if not self.indexer:
            return dequantize_kv(cache[page: page + 1], ps)[0, slot]
        row = cache[page]
        values = row[slot * 128: slot * 128 + 128].view(torch.float8_e4m3fn).float()
        scale = row[128 * ps + 4 * slot: 128 * ps + 4 * slot + 4].view(torch.float32)
        return values * scale

    @property
    def slots(self) -> int:
        return self.cache0.shape[0] * self.case.page_size

    def slot_bytes(self, cache: torch.Tensor, loc: int) -> torch.Tensor:
        """Every byte compressed slot ``loc`` owns in ``cache`` (its values and its scales)."""
        ps = self.case.page_size
        page, slot = divmod(loc, ps)
        row = cache[page]
        if self.indexer:
            return torch.cat([row[slot * 128: slot * 128 + 128], row[128 * ps + 4 * slot: 128 * ps + 4 * slot + 4]])
        return torch.cat([row[slot * 576: slot * 576 + 576], row[576 * ps + 8 * slot: 576 * ps + 8 * slot + 8]])

    @contextlib.contextmanager
    def rows_to_upstreams_store(self):
        """The patched path with its rows handed to upstream's store instead of stored in our launch
        (``dsv4_calls.ROWS_TO_UPSTREAMS_STORE``, a test switch): how a test sees our rows, and what
        it compares the in-launch store's bytes with."""
        from .. import dsv4_calls

        with swap_attrs((dsv4_calls, "ROWS_TO_UPSTREAMS_STORE", True)):
            yield

    @contextlib.contextmanager
    def fresh_calls(self):
        for v in self.calls.values():
            v.clear()
        yield self.calls


__all__ = ["Dsv4CompressCase", "Dsv4CompressStep", "import_sglang", "ring_size"]

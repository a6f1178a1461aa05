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
from sgl_hip_kernels.testing.sglang_plans import prefill_plan_rows

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
        gen = self._begin(case, sg, seed, device)
        r = case.ratio
        b = len(case.lens)
        # Request 0 of req_to_token is the padded slots' dummy; request i + 1 is batch row i.
        longest = max(max(case.lens), 1)
        n_swa_pages = self._layout(gen, b + 1, longest)
        self.req_pool_indices = torch.tensor([i + 1 if n > 0 else 0 for i, n in enumerate(case.lens)])
        self.seq_lens = torch.tensor([n if n > 0 else 1 for n in case.lens])
        # Every request's token rows (its history): scores and kv ~ N(0, 4).
        self.history = torch.randn(b + 1, longest, self.width, generator=gen) * 2
        self._neg_inf_channel()
        state = torch.full((max(n_swa_pages, b + 1) * ring_size(r) + r, self.width), float("nan"))
        for i, (req, n) in enumerate(zip(self.req_pool_indices.tolist(), self.seq_lens.tolist())):
            if case.lens[i] <= 0:
                continue
            for t in range(n - 1):  # the rows of every earlier token, in order (later ones overwrite)
                state[self.state_loc(req, t)] = self.history[req, t]
        self.state0 = state
        self.u = torch.stack([self.history[int(q), int(n) - 1] for q, n in zip(self.req_pool_indices, self.seq_lens)])
        self._parameters(gen)
        emits = [n > 0 and n % r == 0 for n in case.lens]
        self.emitting = [i for i, e in enumerate(emits) if e]
        locs = torch.randperm(2 * b + 2, generator=gen)[: b] + 1  # distinct compressed slots, never 0
        # Each request's new-token slot: an emitting one's // ratio is its distinct compressed slot.
        raw = locs * r + (self.seq_lens - 1) % r
        self.out_loc = upstream_out_loc(self.seq_lens.to(device), raw.to(device), r).cpu()
        if self.out_loc.tolist() != torch.where(torch.tensor(emits), locs, 0).tolist():
            raise AssertionError("upstream's metadata places the compressed rows elsewhere than assumed")
        self._end(gen, 2 * b + 3)

    def _begin(self, case, sg, seed: int, device) -> torch.Generator:
        """The case's geometry (checked) -> the generator every input is drawn from."""
        self.case, self.sg, self.device = case, sg, device
        r = case.ratio
        if case.swa_page % ring_size(r):
            raise ValueError(f"swa_page {case.swa_page} must be a multiple of the ring ({ring_size(r)})")
        self.width = (4 if r == 4 else 2) * case.head_dim
        self.k = 8 if r == 4 else 128
        return torch.Generator().manual_seed(seed)

    def _end(self, gen, slots: int):
        """The compressed cache (random bytes, at least ``slots`` slots) and the call records."""
        pages = math.ceil(slots / self.case.page_size)
        nbytes = 132 * self.case.page_size if self.indexer else page_bytes(self.case.page_size)
        self.cache0 = torch.randint(0, 256, (pages, nbytes), generator=gen, dtype=torch.uint8)
        self.calls: dict[str, list] = {"compress_forward": [], "norm_rope_store": [], "store": []}

    def _method_arguments(self, plan, **arrays) -> dict:
        """``_forward_compress_all_in_one``'s keyword arguments (``arrays``: the pools, the rows and
        ``out_loc``, on the device) and a backend whose metadata holds ``plan``."""
        dev, r = self.device, self.case.ratio
        self.buffers = dict(
            arrays, ape=self.ape.to(dev), head_dim=self.case.head_dim,
            norm=types.SimpleNamespace(weight=self.norm.weight.to(dev), variance_epsilon=EPS),
            freqs_cis_cache=self.freqs.to(dev), is_indexer=self.indexer, rotate=self.indexer, compress_ratio=r,
            page_size=self.case.page_size)
        self.backend = object.__new__(self.sg.cv2.CompressorBackendMixin)
        self.backend.forward_metadata = types.SimpleNamespace(**{f"c{r}_compress_metadata": plan})
        return self.buffers

    def _layout(self, gen, n_req: int, longest: int) -> int:
        """``req_to_token`` / ``full_to_swa`` of ``n_req`` requests of up to ``longest`` tokens, SWA pages
        drawn at random and aligned to positions, and the ring layout of the release's planner: from
        0.5.20 ratio 128 keeps one ring per request (row rid * ring + pos % ring); otherwise one per SWA
        page (swa_page * ring + swa_loc % ring). -> the number of SWA pages."""
        sp = self.case.swa_page
        swa_pages_per_req = math.ceil(longest / sp)
        n_swa_pages = n_req * swa_pages_per_req
        page_of = torch.randperm(n_swa_pages, generator=gen).reshape(n_req, swa_pages_per_req)
        pos = torch.arange(longest)
        self.swa_loc = page_of[:, pos // sp] * sp + pos % sp  # (n_req, longest)
        n_full = n_req * longest
        full = torch.randperm(n_full, generator=gen).reshape(n_req, longest)  # req_to_token
        self.full_to_swa = torch.empty(n_full, dtype=torch.int64)
        self.full_to_swa[full.reshape(-1)] = self.swa_loc.reshape(-1)
        self.req_to_token = full.to(torch.int32)
        self.req_ring = self.case.ratio == 128 and patching.installed_release() >= (0, 5, 20, 0)
        return n_swa_pages

    def _neg_inf_channel(self):
        """The case's -inf channel: score channel 5 -inf on every token (both halves for ratio 4: every row of a block)."""
        d = self.case.head_dim
        if self.case.neg_inf_channel:
            for col in ((2 * d + 5, 3 * d + 5) if self.case.ratio == 4 else (d + 5,)):
                self.history[..., col] = float("-inf")

    def _parameters(self, gen, max_pos: int = MAX_POS):
        """The compressor's ape (the hot-fixed (K, d) rows, in the parameter's shape), norm and RoPE
        table (``max_pos`` positions)."""
        r, d = self.case.ratio, self.case.head_dim
        ape = torch.randn(self.k, d, generator=gen)
        self.ape = ape.reshape(r, -1) if r == 4 else ape  # the parameter's shape: (4, 2d) / (128, d)
        self.norm = types.SimpleNamespace(weight=torch.rand(d, generator=gen) + 0.5, variance_epsilon=EPS)
        angle = torch.rand(max_pos, 32, generator=gen, dtype=torch.float64) * 6.283
        self.freqs = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)

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

    @staticmethod
    def _pool(kv, score, ape):
        """Upstream's kernels' pooling of one block: max-subtracting softmax per channel (an
        all -inf channel: NaN)."""
        score = score.float() + ape.float()
        e = torch.exp(score - score.amax(0))
        return (kv.float() * e).sum(0) / e.sum(0)

    def _window(self, buf, rp0, rp1, seq_len, rows_from_u, d):
        """A block's K rows (kv, score) as ``c4_v2.cuh`` / ``c128_v2.cuh`` gather them: row j from
        the state ring (page rp0 for ratio 4's rows 0..3, else rp1; slot j % ratio) unless it is one
        of the last ``rows_from_u.shape[0]`` rows, which come from the input; ratio 4's first block
        (seq_len <= 4) has no previous one: its rows are kv 0, score -FLT_MAX."""
        r, k = self.case.ratio, self.k
        n_new = rows_from_u.shape[0]
        rows = [rows_from_u[j - (k - n_new)] if j >= k - n_new else buf[(rp0 if r == 4 and j < 4 else rp1) * r + j % r]
                for j in range(k)]
        rows = torch.stack(rows)
        if r == 128:
            return rows[:, :d], rows[:, d:]
        kv = torch.cat([rows[:4, :d], rows[4:, d: 2 * d]])
        score = torch.cat([rows[:4, 2 * d: 3 * d], rows[4:, 3 * d:]])
        if seq_len <= 4:
            kv[:4], score[:4] = 0.0, -torch.finfo(torch.float32).max
        return kv, score

    def _compress_forward(self, *, kv_score_buffer, kv_score_input, ape, plan, compress_ratio, head_dim, out=None,
                          is_online=False):
        r, d = compress_ratio, head_dim
        self.calls["compress_forward"].append(dict(ratio=r, online=is_online, decode=plan.is_decode))
        buf = kv_score_buffer.view(-1, kv_score_buffer.shape[-1])
        u = kv_score_input
        if plan.is_decode:  # store the new row, then pool the block it closes (from the ring)
            p = plan.plan_d.view(torch.int32).long()
            buf[p[:, 1]] = u.to(buf.dtype)
            res = torch.full((p.shape[0], d), float("nan"), dtype=u.dtype, device=buf.device)  # unwritten
            for b in range(p.shape[0]):
                if p[b, 0] % r == 0:
                    res[b] = self._pool(*self._window(buf, *p[b, [2, 3, 0]].tolist(), u[:0], d), ape).to(res.dtype)
            return res
        # Prefill: every block of the plan (ring rows as they were), then the kept rows into the ring.
        pc, pw = plan.plan_c.view(torch.int32).long(), plan.plan_w.view(torch.int32).long()
        res = torch.full((pc.shape[0], d), float("nan"), dtype=u.dtype, device=buf.device)  # unwritten
        for i in range(pc.shape[0]):
            seq, packed, rp0, rp1 = pc[i].tolist()
            if seq == -1:
                continue
            ragged, n_new = packed & 0xFFFF, self.k - (packed >> 16)
            kv, score = self._window(buf, rp0, rp1, seq, u[ragged - n_new + 1: ragged + 1], d)
            res[i] = self._pool(kv, score, ape).to(res.dtype)
        live = pw[:, 0] != -1
        buf[pw[live, 1]] = u[pw[live, 0]].to(buf.dtype)
        return res

    def _norm_rope_store(self, kv, plan, *, norm_weight, norm_eps, freq_cis, out_loc, kvcache, page_size,
                         use_fp4=False, **unused):
        self.calls["norm_rope_store"].append(dict(use_fp4=use_fp4, unused=sorted(unused), decode=plan.is_decode))
        r = plan.compress_ratio
        if plan.is_decode:  # a request's row where it closes a block, at its out_loc
            p = plan.plan_d.view(torch.int32)
            keep = [b for b in range(p.shape[0]) if int(p[b, 0]) % r == 0]
            seq, loc = p[keep, 0], out_loc[keep]
        else:  # every plan row that is not padding, at the out_loc of its block's last token
            p = plan.plan_c.view(torch.int32)
            keep = [i for i in range(p.shape[0]) if int(p[i, 0]) != -1]
            seq, loc = p[keep, 0], out_loc[(p[keep, 1] & 0xFFFF).long()]
        if not keep:
            self.upstream_rows = kv[:0].float()
            return
        x = kv[keep].float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight.float()
        f = freq_cis[(seq - r).long()]  # (n, 32) complex: the block's first position
        rot = torch.view_as_complex(x[:, -64:].reshape(-1, 32, 2).contiguous()) * f
        x = torch.cat([x[:, :-64], torch.view_as_real(rot).reshape(-1, 64)], 1)
        if x.shape[1] == 128:
            x = hadamard_ref(x.double()).float()
        else:  # the attention rows: rounded to bf16 before the FP8 quantisation (its store does that)
            x = x.bfloat16()
        self.upstream_rows = x
        self._store(x, kvcache, loc, page_size)

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
        return self._method_arguments(plan, kv_score_buffer=self.state0.clone().to(dev), kv_score_input=self.u.to(dev),
                                      kv_cache=self.cache0.clone().to(dev), out_loc=self.out_loc.to(dev))

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

    def _sequence_reference(self, req: int, n: int, work) -> torch.Tensor:
        """The contract's every block of request ``req``'s first ``n`` tokens, in ``work``."""
        bias = self.ape.reshape(self.k, self.case.head_dim)
        table = torch.view_as_real(self.freqs.to(torch.complex128))
        return compress_sequence_ref(self.history[req, :n].to(work), self.case.ratio, self.case.head_dim, bias.to(work),
                                     self.norm.weight.to(work), EPS, table[..., 0].to(work), table[..., 1].to(work),
                                     self.indexer)

    def reference(self, b: int, work=torch.float64) -> torch.Tensor:
        """The contract's block that batch row ``b`` emits (it must emit), in ``work``."""
        n = int(self.seq_lens[b])
        return self._sequence_reference(int(self.req_pool_indices[b]), n, work)[n // self.case.ratio - 1]

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


@dataclasses.dataclass(frozen=True)
class Dsv4PrefillCase:
    ratio: int = 4
    head_dim: int = 512
    prefix: tuple = (10, 0, 2, 13, 5)  # each request's first chunk (0: it joins in the second)
    extend: tuple = (6, 13, 21, 3, 1)  # its second chunk (every request has one)
    swa_page: int = 16
    page_size: int = 2
    neg_inf_channel: bool = False
    gpu_planner: bool = False  # upstream="real": the planner's GPU-input path (rows unordered, padded to the chunk)


class Dsv4PrefillChunks(Dsv4CompressStep):
    """A chunked prefill of the DeepSeek-V4 compressor through the real
    ``_forward_compress_all_in_one``: chunk 0 is the first ``prefix`` tokens of the requests that
    have one, chunk 1 every request's next ``extend`` tokens (after a prefix, its blocks read the
    rows chunk 0 left in the state ring, and a chunk's rows span several SWA pages' rings). The pools
    are laid out as for a decode step (:class:`Dsv4CompressStep`); the state starts NaN (a row a
    kernel must not read shows up), and each block has its own compressed slot (never 0).

    The plan (``CompressorPrefillPlan``) comes from a stand-in of ``plan_compress_prefill``, written
    from ``c_plan.cuh``'s host path (no speculative decoding), or with ``upstream="real"`` from the
    release's own planner: per token that closes a block, 16 bytes (seq_len; ragged row | rows still in
    the ring << 16; the state pages of the previous block and of its own, which the planner leaves -1
    and the batch row where no ring row is read); per token the ring keeps (at or after the last
    closed block's start, for ratio 4 the block before it; and, ratio 4, the last block of every SWA
    page), 8 bytes (ragged row; state row). ``out_loc`` is per token, from the release's own
    metadata kernel."""

    def __init__(self, case: Dsv4PrefillCase, sg: types.SimpleNamespace, seed: int = 0, device="cpu"):
        if len(case.prefix) != len(case.extend) or min(case.extend) < 1 or min(case.prefix) < 0:
            raise ValueError("one prefix (>= 0) and one extend (>= 1) per request")
        gen = self._begin(case, sg, seed, device)
        r = case.ratio
        b = len(case.prefix)
        self.totals = [p + e for p, e in zip(case.prefix, case.extend)]
        n_swa_pages = self._layout(gen, b + 1, max(self.totals))  # request 0: nobody's (request i + 1: row i)
        self.history = torch.randn(b + 1, max(self.totals), self.width, generator=gen) * 2
        self._neg_inf_channel()
        self.state0 = torch.full((max(n_swa_pages, b + 1) * ring_size(r) + r, self.width), float("nan"))
        self._parameters(gen, max(MAX_POS, max(self.totals)))
        self._references = {}
        # Every block of every request: its own compressed slot, never 0.
        self.blocks = [(i, n) for i, total in enumerate(self.totals) for n in range(total // r)]
        slots = (torch.randperm(2 * len(self.blocks) + 2, generator=gen)[: len(self.blocks)] + 1).tolist()
        self.block_slot = dict(zip(self.blocks, slots))
        self._end(gen, 2 * len(self.blocks) + 3)

    def chunk(self, c: int) -> list[tuple[int, int, int]]:
        """Chunk ``c``'s requests: (batch row, tokens before it, its tokens)."""
        if c == 0:
            return [(i, 0, p) for i, p in enumerate(self.case.prefix) if p > 0]
        return [(i, p, e) for i, (p, e) in enumerate(zip(self.case.prefix, self.case.extend))]

    def chunk_blocks(self, c: int) -> list[tuple[int, int]]:
        """(batch row, block) of each block chunk ``c`` closes, in the plan's order."""
        r = self.case.ratio
        return [(i, n) for i, start, e in self.chunk(c) for n in range(start // r, (start + e) // r)]

    def out_loc(self, c: int) -> torch.Tensor:
        """Chunk ``c``'s ``c{r}_out_loc`` (one per token) from the release's metadata kernel; asserted
        to be each closing token's block slot and 0 elsewhere."""
        r = self.case.ratio
        seq, raw, expect = [], [], []
        for i, start, e in self.chunk(c):
            for t in range(start, start + e):
                seq.append(t + 1)
                raw.append(self.block_slot.get((i, t // r), 0) * r + t % r)
                expect.append(self.block_slot[(i, t // r)] if (t + 1) % r == 0 else 0)
        dev = self.device
        loc = upstream_out_loc(torch.tensor(seq).to(dev), torch.tensor(raw).to(dev), r).cpu()
        if loc.tolist() != expect:
            raise AssertionError("upstream's metadata places the compressed rows elsewhere than assumed")
        return loc

    def rows(self, c: int) -> torch.Tensor:
        """Chunk ``c``'s raw rows, ragged: request after request."""
        return torch.cat([self.history[i + 1, start: start + e] for i, start, e in self.chunk(c)])

    def plan(self, c: int):
        """Chunk ``c``'s ``CompressorPrefillPlan`` as ``plan_compress_prefill``'s host path builds it
        (``sgl_hip_kernels.testing.sglang_plans``)."""
        reqs = self.chunk(c)
        blocks, writes = prefill_plan_rows([(start, e) for _, start, e in reqs], self.case.ratio,
                                           lambda b, t: self.state_loc(reqs[b][0] + 1, t), self.case.swa_page)
        as_bytes = lambda rows, n: torch.tensor(rows, dtype=torch.int32).reshape(-1, n // 4).view(torch.uint8)  # noqa: E731
        return self.sg.cv2.CompressorPrefillPlan(self.case.ratio, as_bytes(blocks, 16).to(self.device),
                                                 as_bytes(writes, 8).to(self.device))

    def real_plan(self, c: int):
        """Chunk ``c``'s plan from the release's own planner: its host path (lengths on the CPU), or
        with ``case.gpu_planner`` its GPU-input path as CUDA graphs use it (lengths on the device,
        ``use_cuda_graph``: the plan padded to the chunk's tokens, its rows in any order)."""
        dev, r = self.device, self.case.ratio
        reqs = self.chunk(c)
        rids = torch.tensor([i + 1 for i, _, _ in reqs], dtype=torch.int64, device=dev)
        seq = torch.tensor([start + e for _, start, e in reqs], dtype=torch.int64)
        ext = torch.tensor([e for _, _, e in reqs], dtype=torch.int64)
        if self.case.gpu_planner:
            seq, ext = seq.to(dev), ext.to(dev)
        return self.sg.cv2.CompressorPrefillPlan.generate(
            r, rids, seq, ext, self.req_to_token.to(dev), self.full_to_swa.to(dev), self.case.swa_page, ring_size(r),
            int(ext.sum()), use_cuda_graph=self.case.gpu_planner)

    def prepare(self, upstream: str = "standin"):
        """The pools on the device, fresh: the state (NaN) and the cache."""
        dev = self.device
        self.pools = dict(kv_score_buffer=self.state0.clone().to(dev), kv_cache=self.cache0.clone().to(dev))
        return self.pools

    def prepare_chunk(self, c: int, upstream: str = "standin"):
        """Chunk ``c``'s arguments over the pools of :meth:`prepare` (the plan: the stand-in's, or the
        release's own with ``upstream="real"``)."""
        plan = self.plan(c) if upstream == "standin" else self.real_plan(c)
        return self._method_arguments(plan, **self.pools, kv_score_input=self.rows(c).to(self.device),
                                      out_loc=self.out_loc(c).to(self.device))

    def run(self, upstream: str = "standin"):
        """Both chunks on fresh pools: -> [(state, cache) after each chunk] (copies on the CPU); the
        rows upstream's stand-in stored, per chunk, in ``self.upstream_chunk_rows``."""
        self.prepare(upstream)
        after, self.upstream_chunk_rows = [], []
        for c in (0, 1):
            self.upstream_rows = None
            self.prepare_chunk(c, upstream)
            self.call(upstream)
            self.upstream_chunk_rows.append(self.upstream_rows)
            after.append((self.pools["kv_score_buffer"].cpu().clone(), self.pools["kv_cache"].cpu().clone()))
        return after

    def block_reference(self, i: int, n: int, work=torch.float64) -> torch.Tensor:
        """The contract's block ``n`` of batch row ``i`` (over its whole history), in ``work``."""
        if (i, work) not in self._references:  # every block of the request, once
            self._references[i, work] = self._sequence_reference(i + 1, self.totals[i], work)
        return self._references[i, work][n]



__all__ = ["Dsv4CompressCase", "Dsv4CompressStep", "Dsv4PrefillCase", "Dsv4PrefillChunks", "import_sglang", "ring_size"]

"""Fused DeepSeek-V4 compressor (sgl_hip_kernels.dsv4_compress) vs the fp32 contract (dsv4_ref).

The state contract is written out here independently of the planner: after a request has seen L
tokens its ring holds the raw rows of tokens ``[max(0, r*(L//r) - (4 if r == 4 else 0)), L)``, token
t on page ``pages[b, (t // r) % n_pages]`` slot ``t % r``, and nothing else is ever written: the
state starts NaN (so reading a slot the kernel must not read shows up as NaN), page 0 belongs to no
request (upstream's fallback write clobbered slot 0), and every row outside the rings must come
back bit-identical.

CPU: the interpreter in fp32 against fp64, within 2x torch's own fp32 error. GPU: bf16 rows,
DeepSeek-V4 shapes, and CUDA-graph replay == eager.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sgl_hip_kernels.testing.sglang_plans import prefill_plan_rows
from sgl_hip_kernels.testing.checks import assert_within_one_rounding, assert_within_torch_error, graph_replay_equals_eager
from sgl_hip_kernels.dsv4_compress import (CompressWorkspace, LaunchRule, compress_decode, compress_prefill, launch_rule,
                                           plan_prefill)
from sgl_hip_kernels.dsv4 import compress as compress_module
from sgl_hip_kernels.dsv4.compress import CacheStore, compress_prefill_paged, workspace_fits
from sgl_hip_kernels.dsv4.compress_ref import compress_sequence_ref
from sgl_hip_kernels.dsv4.kv_cache import page_bytes, quantize_kv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


class Compressor:
    """One compressor's parameters and a batch of requests' rings over one NaN-filled state."""

    def __init__(self, rng, ratio, d, n_requests, rotate=False):
        self.ratio, self.d, self.rotate = ratio, d, rotate
        self.k, self.n_pages, self.width = (8, 2, 4 * d) if ratio == 4 else (128, 1, 2 * d)
        self.bias = torch.randn(self.k, d, generator=rng, dtype=torch.float64)
        self.norm_w = torch.rand(d, generator=rng, dtype=torch.float64) + 0.5
        angle = torch.rand(2048, 32, generator=rng, dtype=torch.float64) * 6.283
        self.cos, self.sin = angle.cos(), angle.sin()
        # Rings on pages 1.. in a shuffled order; page 0 and a spare page at the end belong to no one.
        n = n_requests * self.n_pages
        self.pages = (torch.randperm(n, generator=rng) + 1).to(torch.int32).reshape(n_requests, self.n_pages)
        self.state = torch.full(((n + 2) * ratio, self.width), float("nan"))

    def dev(self, x, dtype=torch.float32):
        """A copy of ``x`` on the test's device (a copy on the CPU too: a kernel writing it must not
        write the original)."""
        return x.to(device=DEV, dtype=dtype, copy=True)

    def kernel_args(self):
        return (self.dev(self.bias), self.dev(self.norm_w), EPS, self.dev(self.cos), self.dev(self.sin))

    def ring_rows(self, b, seq_len):
        """{state row: token} of request b's ring after seq_len tokens (the contract above)."""
        keep_from = max(0, self.ratio * (seq_len // self.ratio) - (4 if self.ratio == 4 else 0))
        r, pages = self.ratio, self.pages
        return {int(pages[b, (t // r) % self.n_pages]) * r + t % r: t for t in range(keep_from, seq_len)}

    def seed_state(self, rows, lens):
        for b, (u, n) in enumerate(zip(rows, lens)):
            for r, t in self.ring_rows(b, n).items():
                self.state[r] = u[t].float()

    def check_state(self, state, rows, lens, before, decode=False):
        """Ring rows hold their tokens' raw rows exactly; every other row is bit-identical to ``before``
        (a decode step always stores its token, even the one closing a ratio-128 block, whose slot
        is no longer kept)."""
        expect = before.clone()
        for b, (u, n) in enumerate(zip(rows, lens)):
            written = self.ring_rows(b, n)
            if decode and n > 0:
                written[int(self.pages[b, (n - 1) // self.ratio % self.n_pages]) * self.ratio + (n - 1) % self.ratio] = n - 1
            for r, t in written.items():
                expect[r] = u[t].float()
        assert torch.equal(state.cpu().view(torch.int32), expect.view(torch.int32)), "state rows differ from the ring contract"

    def blocks(self, u, blocks):
        """References (fp64, fp32) of the given block numbers of one sequence's raw rows u."""
        def ref(work):
            seq = compress_sequence_ref(u.to(work), self.ratio, self.d, self.bias.to(work), self.norm_w.to(work), EPS,
                                        self.cos.to(work), self.sin.to(work), self.rotate)
            return seq[list(blocks)]
        return ref(torch.float64), ref(torch.float32)


def raw_rows(rng, c, length, neg_inf_channel=False):
    u = torch.randn(length, c.width, generator=rng) * 2
    if neg_inf_channel:  # a score channel that is -inf on every token, and one token -inf everywhere
        score_cols = slice(2 * c.d, 4 * c.d) if c.ratio == 4 else slice(c.d, 2 * c.d)
        u[:, score_cols][:, 3] = float("-inf")
        u[length // 2, score_cols] = float("-inf")
    return u


CASES = [  # (ratio, d, rotate): attention d = 512, indexer d = 128 with the rotation
    (4, 128, False), (4, 128, True), (4, 512, False), (128, 128, True), (128, 128, False),
]


@pytest.mark.parametrize("ratio, d, rotate", CASES)
def test_prefill_ragged_batch(rng, ratio, d, rotate):
    """Mixed prefixes (0: the first block has no previous block) and extends (0, 1, not multiples of
    the ratio, several blocks), one ragged launch; then the ring holds what decode needs."""
    r = ratio
    prefix = [0, 3, r + 2, 2 * r, 5]
    extend = [2 * r + 3, r + 1, 0, r, 1]
    c = Compressor(rng, ratio, d, len(prefix), rotate)
    seqs = [raw_rows(rng, c, p + e, neg_inf_channel=(i == 0)) for i, (p, e) in enumerate(zip(prefix, extend))]
    c.seed_state(seqs, prefix)
    before = c.state.clone()
    plan = plan_prefill(prefix, extend, ratio, device=DEV, pad_blocks_to=None)
    # ratio 128: request 1 (prefix 3) reads tokens 0..2 from slots that its kept tokens 128..131
    # overwrite, so the stores need their own launch; ratio 4: no kept row lands on a read slot
    assert plan.writes_in_same_launch == (ratio == 4)
    new_rows = torch.cat([u[p:] for u, p in zip(seqs, prefix)])
    state = c.dev(c.state)
    out = torch.full((plan.blocks.shape[0], d), float("nan"), device=DEV)
    got = compress_prefill(c.dev(new_rows), state, c.dev(c.pages, torch.int32), plan, *c.kernel_args(), rotate=rotate, out=out)
    assert got is out
    i = 0
    for u, p, e in zip(seqs, prefix, extend):
        emitted = range(p // r, (p + e) // r)
        if len(emitted):
            ref64, ref32 = c.blocks(u, emitted)
            assert_within_torch_error(got[i:i + len(emitted)].cpu(), ref64, ref32, f"prefill blocks {list(emitted)}")
        i += len(emitted)
    assert i == plan.n_blocks == got.shape[0]
    c.check_state(state, seqs, [p + e for p, e in zip(prefix, extend)], before)


@pytest.mark.parametrize("ratio, d, rotate", CASES[:1] + CASES[3:4])
def test_decode_steps_mixed_batch(rng, ratio, d, rotate):
    """Decode steps over a mixed batch (one request on its first block, lengths that emit at
    different steps, a padded slot with seq_len 0): emitting requests get their block, the others
    exactly 0, and only each request's own slot of its own ring changes."""
    r = ratio
    lens = [1, r - 2, 2 * r - 1, 3 * r - 1, 0]  # emits blocks 1 and 2 (the ring wraps back to its first page)
    c = Compressor(rng, ratio, d, len(lens), rotate)
    seqs = [raw_rows(rng, c, n + 3) for n in lens]
    live = [n > 0 for n in lens]
    c.seed_state(seqs, [n - 1 if n else 0 for n in lens])
    state, pages = c.dev(c.state), c.dev(c.pages, torch.int32)
    for step in range(3):
        now = [n + step if ok else 0 for n, ok in zip(lens, live)]
        before = state.cpu().clone()
        rows = torch.stack([u[max(n - 1, 0)] for u, n in zip(seqs, now)])
        out = torch.full((len(lens), d), float("nan"), device=DEV)
        compress_decode(c.dev(rows), state, pages, torch.tensor(now, dtype=torch.int32, device=DEV), *c.kernel_args(), ratio,
                        rotate=rotate, out=out)
        for b, (u, n) in enumerate(zip(seqs, now)):
            if n > 0 and n % r == 0:
                ref64, ref32 = c.blocks(u, [n // r - 1])
                assert_within_torch_error(out[b:b + 1].cpu(), ref64, ref32, f"request {b} at seq_len {n}")
            else:
                assert torch.equal(out[b].cpu(), torch.zeros(d)), f"request {b} at seq_len {n} does not emit: out must be 0"
        c.check_state(state, seqs, now, before, decode=True)
    assert sum(n % r == 0 for n in [x + s for x in lens[:-1] for s in range(3)]) >= 2  # the steps did emit


@pytest.mark.parametrize("ratio, d, rotate", [(4, 128, True), (128, 128, False)])
def test_decode_prev_cur_pages_and_strided_tables_equal_the_ring(rng, ratio, d, rotate):
    """``page_order="prev_cur"`` (this step's previous and current block pages, as SGLang's decode plan
    gives them, the first block's two the same page), with seq_lens, pages and the RoPE tables read
    in place from strided views (a (B, 4) int32 plan; the halves of view_as_real of a complex
    table), gives the ring order's result bit for bit: out and the whole state."""
    r = ratio
    lens = [1, r - 1, 2 * r - 1, 3 * r - 1, 0]
    c = Compressor(rng, ratio, d, len(lens), rotate)
    seqs = [raw_rows(rng, c, n + 2) for n in lens]
    c.seed_state(seqs, [n - 1 if n else 0 for n in lens])
    ring_state, pc_state = c.dev(c.state), c.dev(c.state)
    pages = c.dev(c.pages, torch.int32)
    bias, norm_w, eps, cos, sin = c.kernel_args()
    table = torch.view_as_real(torch.complex(cos, sin))  # (max_pos, 32, 2): cos, sin interleaved
    seen = 0
    for step in range(2):
        now = [n + step if n else 0 for n in lens]
        rows = c.dev(torch.stack([u[max(n - 1, 0)] for u, n in zip(seqs, now)]))
        seq_lens = torch.tensor(now, dtype=torch.int32, device=DEV)
        ring_out = compress_decode(rows, ring_state, pages, seq_lens, bias, norm_w, eps, cos, sin, ratio, rotate=rotate)
        plan = torch.zeros(len(lens), 4, dtype=torch.int32, device=DEV)  # seq_len, (unused), previous page, current page
        plan[:, 0] = seq_lens
        for b, n in enumerate(now):
            blk = max(n - 1, 0) // r
            plan[b, 3] = pages[b, blk % c.n_pages]
            plan[b, 2] = pages[b, (blk - 1) % c.n_pages] if (r == 4 and blk > 0) else plan[b, 3]
        pc_pages = plan[:, 2:] if r == 4 else plan[:, 3:]
        assert pc_pages.stride() == (4, 1) and plan[:, 0].stride() == (4,) and table[..., 0].stride() == (64, 2)
        pc_out = compress_decode(rows, pc_state, pc_pages, plan[:, 0], bias, norm_w, eps, table[..., 0], table[..., 1],
                                 ratio, rotate=rotate, page_order="prev_cur")
        assert torch.equal(ring_out.view(torch.int32), pc_out.view(torch.int32)), f"step {step}: out differs"
        assert torch.equal(ring_state.view(torch.int32), pc_state.view(torch.int32)), f"step {step}: state differs"
        seen += int(sum(n > 0 and n % r == 0 for n in now))
    assert seen >= 3  # blocks were emitted (the first block's own, and later ones reading a previous page)
    with pytest.raises(ValueError, match="page_order"):
        compress_decode(rows, pc_state, pages, seq_lens, bias, norm_w, eps, cos, sin, ratio, page_order="parity")


def stored_bytes(cache, rows, locs, kind, page_size, preshuffle=0):
    """``cache`` with each (row, loc) quantised into it as SGLang's HIP Triton store lays it out: the
    V4 layout through ``kv_cache.quantize_kv`` (this project's writer), the indexer's here."""
    cache = cache.clone()
    for row, loc in zip(rows, locs):
        page, slot = divmod(int(loc), page_size)
        if kind == "flashmla":
            token = quantize_kv(row.view(1, 1, 512), 1)[0]  # 576 data bytes, then 8 scale bytes
            cache[page, slot * 576: slot * 576 + 576] = token[:576]
            at = page_size * 576 + slot * 8
            cache[page, at: at + 7] = token[576: 583]
            continue
        scale = row.abs().amax().clamp_min(1e-8) / 448.0
        q = (row * (1.0 / scale)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
        lane = torch.arange(128)
        if preshuffle:
            p = preshuffle
            at = slot // p * (p * 128) + lane // p * (p * p) + slot % p * p + lane % p
        else:
            at = slot * 128 + lane
        cache[page, at] = q
        cache[page, page_size * 128 + 4 * slot: page_size * 128 + 4 * slot + 4] = scale.view(1).view(torch.uint8)
    return cache


@pytest.mark.parametrize("kind, ratio, d, rotate, page_size, preshuffle",
                         [("flashmla", 4, 512, False, 2, 0), ("flashmla", 128, 512, False, 2, 0),
                          ("indexer", 4, 128, True, 4, 0), ("indexer", 4, 128, True, 8, 4)])
def test_decode_store_into_the_cache_equals_quantising_out(rng, kind, ratio, d, rotate, page_size, preshuffle):
    """``store=CacheStore(...)``: the emitted rows go straight into SGLang's compressed cache, byte
    for byte what quantising the ``out`` rows (bf16 for the V4 layout, fp32 for the indexer's) into
    it gives; a request that emits nothing writes no byte (its loc names slot 0, which must stay as
    it was), and the state is the same as with ``out``."""
    r = ratio
    lens = [r, r - 1, 2 * r, 0, 3 * r]
    c = Compressor(rng, ratio, d, len(lens), rotate)
    seqs, _, _ = decode_inputs(rng, c, [max(n, 1) for n in lens])
    rows = c.dev(torch.stack([u[max(n, 1) - 1] for u, n in zip(seqs, lens)]))
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    emitting = [b for b, n in enumerate(lens) if n > 0 and n % r == 0]
    locs = torch.tensor([3 + 2 * b if b in emitting else 0 for b in range(len(lens))])
    n_pages = -(-(3 + 2 * len(lens)) // page_size)
    nbytes = page_bytes(page_size) if kind == "flashmla" else 132 * page_size
    cache0 = torch.randint(0, 256, (n_pages, nbytes), generator=rng, dtype=torch.uint8)
    state_out, state_store, pages = c.dev(c.state), c.dev(c.state), c.dev(c.pages, torch.int32)
    out = torch.empty(len(lens), d, dtype=torch.bfloat16 if kind == "flashmla" else torch.float32, device=DEV)
    compress_decode(rows, state_out, pages, seq_lens, *c.kernel_args(), ratio, rotate=rotate, out=out)
    expect = stored_bytes(cache0, out[emitting].float().cpu(), locs[emitting], kind, page_size, preshuffle)
    # The rule a batch of 256 gets as well (ratio-4 attention: one program per block, not 16).
    big_batch_rule = launch_rule(ratio, d, prefill=False, batch=256)
    assert (big_batch_rule.split == 1) == (kind == "flashmla" and ratio == 4)
    for loc_dtype, rule in [(torch.int64, None), (torch.int32, None), (torch.int64, big_batch_rule)]:
        cache = cache0.to(DEV)
        store = CacheStore(kind, cache, locs.to(loc_dtype).to(DEV), page_size, preshuffle)
        assert compress_decode(rows, state_store, pages, seq_lens, *c.kernel_args(), ratio, rotate=rotate,
                               store=store, rule=rule) is None
        assert torch.equal(cache.cpu(), expect), f"{loc_dtype}, {rule}: the cache differs from quantising out into it"
        assert torch.equal(state_store.view(torch.int32), state_out.view(torch.int32)), "the state differs"
    assert len(emitting) == 3
    # A request the device guard refuses (a page id past the state; host check off, as under
    # capture) that emits nothing writes no cache byte (its loc, 0 here, names no slot of its own).
    bad_pages = c.pages.clone()
    bad_pages[1, -1] = c.state.shape[0] // r
    cache = cache0.to(DEV)
    compress_decode(rows, c.dev(c.state), c.dev(bad_pages, torch.int32), seq_lens, *c.kernel_args(), ratio,
                    rotate=rotate, store=CacheStore(kind, cache, locs.to(DEV), page_size, preshuffle), check_indices=False)
    assert lens[1] % r and torch.equal(cache.cpu(), expect), "a refused request that emits nothing wrote the cache"
    bad = [(dict(kind="flashmla" if kind == "indexer" else "indexer"), "does not take d"),
           (dict(loc=locs.to(torch.int16).to(DEV)), "loc must be"),
           (dict(cache=cache[:, :-4]), "store cache must be"),
           (dict(loc=torch.where(locs > 0, locs + 10 ** 6, 0).to(DEV)), "outside the cache"),
           (dict(preshuffle=3), "preshuffle")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            compress_decode(rows, state_store, pages, seq_lens, *c.kernel_args(), ratio, rotate=rotate,
                            store=dataclasses.replace(store, **change))
    with pytest.raises(ValueError, match="not both"):
        compress_decode(rows, state_store, pages, seq_lens, *c.kernel_args(), ratio, rotate=rotate, out=out, store=store)


class PagedChunk:
    """A ragged prefill chunk over SGLang's paged rings: request b's token t has state row
    ``swa_page * R + t % R`` (R: the ring, 8 rows for ratio 4, 128 for ratio 128), its SWA pages of
    ``swa`` tokens drawn at random, so a chunk's blocks read rings of several pages; the state holds
    (NaN elsewhere) the prefix rows the chunk's blocks read. The plan is SGLang's planner's
    (``sgl_hip_kernels.testing.sglang_plans.prefill_plan_rows``), then ``pad`` padding rows of each.
    ``ring``: a longer ring, as speculative decoding (MTP) makes it (16 / 256 rows), where the planner
    also keeps the last ``ring - K + 2`` tokens; ``shuffle``: both plans' rows (padding included) in a
    random order, as the planner's GPU path (atomic slots) leaves them."""

    def __init__(self, rng, c, prefix, extend, swa, pad=2, ring=None, shuffle=False):
        r, ring = c.ratio, ring or (8 if c.ratio == 4 else 128)
        self.c, self.prefix, self.extend = c, list(prefix), list(extend)
        self.seqs = [raw_rows(rng, c, p + e) for p, e in zip(prefix, extend)]
        longest = max(p + e for p, e in zip(prefix, extend))
        per_req = -(-longest // swa)
        self.swa_pages = (torch.randperm(len(prefix) * per_req + 1, generator=rng)[:len(prefix) * per_req] + 1).reshape(
            len(prefix), per_req)  # SWA page 0 belongs to no one
        self.row = lambda b, t: int(self.swa_pages[b, t // swa]) * ring + t % ring  # noqa: E731
        self.state = torch.full(((len(prefix) * per_req + 2) * ring, c.width), float("nan"))
        for b, p in enumerate(prefix):
            for t in range(max(0, r * (p // r) - (4 if r == 4 else 0)), p):
                self.state[self.row(b, t)] = self.seqs[b][t]
        blocks, writes = prefill_plan_rows(list(zip(prefix, extend)), r, self.row, swa, ring)
        self.n_blocks, self.n_writes = len(blocks), len(writes)
        self.blocks = torch.tensor(blocks + [[-1, 0, -1, -1]] * pad, dtype=torch.int32).reshape(-1, 4)
        self.writes = torch.tensor(writes + [[-1, -1]] * pad, dtype=torch.int32).reshape(-1, 2)
        self.block_rows = torch.arange(self.blocks.shape[0])  # plan row of each block (padding last)
        if shuffle:
            order = torch.randperm(self.blocks.shape[0], generator=rng)
            self.blocks, self.block_rows = self.blocks[order], torch.argsort(order)
            self.writes = self.writes[torch.randperm(self.writes.shape[0], generator=rng)]
        self.u = torch.cat([u[p:] for u, p in zip(self.seqs, prefix)])

    def run(self, state=None, **kw):
        c = self.c
        state = c.dev(self.state) if state is None else state
        got = compress_prefill_paged(c.dev(self.u), state, self.blocks.to(DEV), self.writes.to(DEV), *c.kernel_args(),
                                     c.ratio, rotate=c.rotate, **kw)
        return got, state

    def expected_state(self):
        """The state after the chunk: the kept rows copied in, every other row as it was."""
        expect = self.state.clone()
        kept = [(ragged, row) for ragged, row in self.writes.tolist() if ragged != -1]
        for ragged, row in kept:
            expect[row] = self.u[ragged]
        assert len(kept) == self.n_writes
        return expect

    def check_blocks(self, got):
        i = 0
        for u, p, e in zip(self.seqs, self.prefix, self.extend):
            emitted = range(p // self.c.ratio, (p + e) // self.c.ratio)
            if len(emitted):
                ref64, ref32 = self.c.blocks(u, emitted)
                rows = got[self.block_rows[i:i + len(emitted)].to(got.device)]
                assert_within_torch_error(rows.float().cpu(), ref64, ref32, f"blocks {list(emitted)}")
            i += len(emitted)
        assert i == self.n_blocks >= 2


PAGED = {  # ratio, d, rotate, swa, prefix, extend, ring: chunks across SWA pages; (10, 6): a kept row lands on a
    # ring slot a block of the chunk reads (token 12 on token 4's slot); (0, 3), (5, 1): no block; MTP's longer rings
    "ratio 4": (4, 128, True, 16, [0, 10, 2, 13, 5, 0], [13, 6, 21, 3, 1, 3], None),
    "ratio 128": (128, 128, False, 128, [0, 100, 3], [130, 30, 2], None),
    "ratio 4, MTP ring, shuffled plan": (4, 128, True, 32, [0, 10, 2, 13, 5, 0], [13, 6, 21, 3, 1, 3], 16),
    "ratio 128, MTP ring, shuffled plan": (128, 128, False, 256, [0, 200, 3], [130, 70, 2], 256),
}


@pytest.mark.parametrize("name", list(PAGED))
def test_prefill_paged_plan_blocks_and_state(rng, name):
    """SGLang's own prefill plan read in place: each block within 2x torch's fp32 error of the fp64
    contract, its ring rows read from the pages the plan names (the rest of the state is NaN), the
    padding rows of both plans untouched, and the state after it the kept rows copied in, with
    the blocks seeing the ring as it was before the chunk."""
    ratio, d, rotate, swa, prefix, extend, ring = PAGED[name]
    c = Compressor(rng, ratio, d, len(prefix), rotate)
    ch = PagedChunk(rng, c, prefix, extend, swa, ring=ring, shuffle=ring is not None)
    if ratio == 4 and ring is None:  # the chunk (10, 6) keeps token 12, on token 4's ring slot, which its block 2 reads
        assert ch.row(1, 12) == ch.row(1, 4)
    out = torch.full((ch.blocks.shape[0], d), float("nan"), device=DEV)
    got, state = ch.run(out=out)
    padding = (ch.blocks[:, 0] == -1).to(got.device)
    assert got is out and int(padding.sum()) == 2 and got[padding].isnan().all(), "a padding row was written"
    if ring is not None:
        assert not torch.equal(ch.block_rows, torch.arange(ch.blocks.shape[0]))  # the plan is shuffled
    ch.check_blocks(got)
    assert torch.equal(state.cpu().view(torch.int32), ch.expected_state().view(torch.int32)), "the state differs"


def test_prefill_paged_store_and_guards(rng):
    """``store=``: the blocks go to cache slot loc[ragged] as quantising the out rows into it gives
    (V4 layout and the preshuffled indexer's), nothing else written; the index checks on the host,
    and with them off (as under capture) the device guards: a block that would read a page outside
    the state gets a NaN row, a kept row outside the state is not copied."""
    for kind, d, rotate, page_size, preshuffle in [("flashmla", 512, False, 2, 0), ("indexer", 128, True, 8, 4)]:
        c = Compressor(rng, 4, d, 3, rotate)
        ch = PagedChunk(rng, c, [0, 6, 2], [9, 7, 6], swa=16, pad=1)
        out = torch.empty(ch.blocks.shape[0], d, dtype=torch.bfloat16 if kind == "flashmla" else torch.float32, device=DEV)
        ch.run(out=out)
        ragged = (ch.blocks[: ch.n_blocks, 1] & 0xFFFF).long()
        loc = torch.zeros(ch.u.shape[0], dtype=torch.int64)
        loc[ragged] = torch.randperm(2 * ch.n_blocks, generator=rng)[: ch.n_blocks] + 1
        n_pages = -(-(2 * ch.n_blocks + 1) // page_size)
        cache0 = torch.randint(0, 256, (n_pages, page_bytes(page_size) if kind == "flashmla" else 132 * page_size),
                               generator=rng, dtype=torch.uint8)
        expect = stored_bytes(cache0, out[: ch.n_blocks].float().cpu(), loc[ragged], kind, page_size, preshuffle)
        cache = cache0.to(DEV)
        store = CacheStore(kind, cache, loc.to(torch.int32).to(DEV), page_size, preshuffle)
        assert ch.run(store=store)[0] is None
        assert torch.equal(cache.cpu(), expect), f"{kind}: the cache differs from quantising out into it"
    ratio4 = ch
    bad = {"a page outside the state": (0, 3, ch.state.shape[0] // 4), "a ragged row outside u": (0, 1, ch.u.shape[0]),
           "buffer_len 8": (0, 1, int(ch.blocks[0, 1] & 0xFFFF) | 8 << 16)}
    with_buffer = [i for i in range(ch.n_blocks) if int(ch.blocks[i, 1]) >> 16 > 4]
    for what, (_, col, value) in bad.items():
        i = with_buffer[0]
        blocks = ch.blocks.clone()
        blocks[i, col] = value
        with pytest.raises(ValueError, match="block rows"):
            compress_prefill_paged(c.dev(ch.u), c.dev(ch.state), blocks.to(DEV), ch.writes.to(DEV), *c.kernel_args(), 4,
                                   rotate=rotate)
        out = torch.zeros(blocks.shape[0], d, device=DEV)
        state = c.dev(ch.state)
        compress_prefill_paged(c.dev(ch.u), state, blocks.to(DEV), ch.writes.to(DEV), *c.kernel_args(), 4, rotate=rotate,
                               out=out, check_indices=False)
        assert out[i].isnan().all() and not out[:i].isnan().any() and not out[i + 1:].isnan().any(), what
        assert torch.equal(state.cpu().view(torch.int32), ch.expected_state().view(torch.int32)), what
    for what, row in {"a state row past the state": ch.state.shape[0], "two kept rows on one state row": -1}.items():
        writes = ratio4.writes.clone()
        writes[0, 1] = row if row >= 0 else int(writes[1, 1])
        with pytest.raises(ValueError, match="kept rows"):
            compress_prefill_paged(c.dev(ch.u), c.dev(ch.state), ch.blocks.to(DEV), writes.to(DEV), *c.kernel_args(), 4,
                                   rotate=rotate)
    writes = ch.writes.clone()
    writes[0, 1] = ch.state.shape[0]
    state = c.dev(ch.state)
    compress_prefill_paged(c.dev(ch.u), state, ch.blocks.to(DEV), writes.to(DEV), *c.kernel_args(), 4, rotate=rotate,
                           check_indices=False)
    expect = ch.expected_state()
    expect[int(ch.writes[0, 1])] = ch.state[int(ch.writes[0, 1])]
    assert torch.equal(state.cpu().view(torch.int32), expect.view(torch.int32)), "a kept row past the state was copied"
    far = CacheStore("indexer", cache, torch.full((ch.u.shape[0],), 10 ** 6, dtype=torch.int64, device=DEV), 8, 4)
    with pytest.raises(ValueError, match="outside the cache"):
        ch.run(store=far)
    with pytest.raises(ValueError, match="contiguous int32"):
        compress_prefill_paged(c.dev(ch.u), c.dev(ch.state), ch.blocks.to(torch.int64).to(DEV), ch.writes.to(DEV),
                               *c.kernel_args(), 4, rotate=rotate)


def test_workspace_fits_says_when_a_launch_needs_a_new_one(monkeypatch):
    """One program per block needs no workspace; a split launch fits only the largest one made."""
    monkeypatch.setattr(compress_module, "_WORKSPACES", {})
    cpu, split = torch.device("cpu"), LaunchRule(8, 8, 1)
    assert workspace_fits(10 ** 6, 512, 4, cpu, LaunchRule(1, 8, 4)) and not workspace_fits(1, 512, 4, cpu, split)
    compress_module._workspace(None, 10, 512, 4, cpu)
    assert workspace_fits(10, 512, 4, cpu, split) and not workspace_fits(11, 512, 4, cpu, split)
    assert not workspace_fits(10, 512, 128, cpu, split)  # one per (device, ratio, d)


def test_edges_neg_inf_and_all_invalid(rng):
    """The sglang#26208 edges: an old max of -inf, a new score of -inf, invalid rows with NaN behind them.
    Block 0 of ratio 4 has no previous block (rows 0..3 invalid, their pages NaN); with its own rows'
    scores all -inf no row weighs at all, and the output is defined: exactly 0, never NaN."""
    c = Compressor(rng, 4, 128, 2)
    u = raw_rows(rng, c, 4)
    u[:, 3 * 128:] = float("-inf")  # own half scores: every row, every channel
    v = raw_rows(rng, c, 8)
    v[0:3, 3 * 128 + 7] = float("-inf")  # channel 7: -inf on the first rows (old max stays -inf), then finite
    v[1, 2 * 128:3 * 128] = float("-inf")  # block 1's row 1 (token 1's A half) scores -inf everywhere,
    v[1, 0:128] = float("nan")  # and its kv is NaN: a row that weighs 0 is not multiplied in
    plan = plan_prefill([0, 0], [4, 8], 4, device=DEV)
    state = c.dev(c.state)
    out = compress_prefill(c.dev(torch.cat([u, v])), state, c.dev(c.pages, torch.int32), plan, *c.kernel_args())
    assert torch.equal(out[0].cpu(), torch.zeros(128))
    assert not out.isnan().any()
    ref64, ref32 = c.blocks(v, [0, 1])
    assert_within_torch_error(out[1:].cpu(), ref64, ref32, "guarded rows")
    # Ratio 128 pooled in row tiles of 32 (the production rule loads all 128 rows at once; a
    # caller's rule may not): a channel -inf through the whole first tile carries an old max of
    # -inf into the next; a channel -inf on every row pools to 0.
    c = Compressor(rng, 128, 128, 1)
    w = raw_rows(rng, c, 128)
    w[:100, 128 + 5] = float("-inf")
    w[:, 128 + 6] = float("-inf")
    ref64, ref32 = c.blocks(w, [0])
    for rule in (None, LaunchRule(split=2, rows_per_tile=32, num_warps=4)):
        out = compress_prefill(c.dev(w), c.dev(c.state), c.dev(c.pages, torch.int32), plan_prefill([0], [128], 128, device=DEV),
                               *c.kernel_args(), rule=rule)
        assert not out.isnan().any()
        assert_within_torch_error(out.cpu(), ref64, ref32, f"ratio 128 guarded channels, {rule}")


def test_padded_plan_and_bad_inputs(rng):
    c = Compressor(rng, 128, 128, 1)
    u = raw_rows(rng, c, 130)
    plan = plan_prefill([0], [130], 128, device=DEV, pad_blocks_to=3)
    assert plan.n_blocks == 1 and plan.blocks.shape == (3, 4)
    state = c.dev(c.state)
    out = compress_prefill(c.dev(u), state, c.dev(c.pages, torch.int32), plan, *c.kernel_args())
    assert torch.equal(out[1:].cpu(), torch.zeros(2, 128))
    # ratio 128, d 128 splits a block over programs: their ticket counters are back to 0 after the call
    ws = CompressWorkspace(3, 128, torch.device(DEV))
    assert launch_rule(128, 128, prefill=True).split > 1
    again = compress_prefill(c.dev(u), c.dev(c.state), c.dev(c.pages, torch.int32), plan, *c.kernel_args(), workspace=ws)
    assert torch.equal(again, out) and int(ws.count.abs().sum()) == 0
    with pytest.raises(ValueError, match="workspace"):
        compress_prefill(c.dev(u), state, c.dev(c.pages, torch.int32), plan, *c.kernel_args(),
                         workspace=CompressWorkspace(2, 128, torch.device(DEV)))
    args = c.kernel_args()
    pages = c.dev(c.pages, torch.int32)
    with pytest.raises(ValueError, match="ratio must be 4 or 128"):
        plan_prefill([0], [8], 8)
    with pytest.raises(ValueError, match="the plan is for"):  # a plan made for other inputs
        compress_prefill(c.dev(u[:129]), state, pages, plan, *args)
    with pytest.raises(ValueError, match="the plan is for"):
        compress_prefill(c.dev(u), state, pages, plan_prefill([0, 0], [65, 65], 128, device=DEV), *args)
    with pytest.raises(ValueError, match="the plan is for"):
        compress_prefill(c.dev(u), state, pages, plan_prefill([4000], [130], 128, device=DEV), *args)  # past the RoPE table
    with pytest.raises(ValueError, match="state_pages must be"):
        compress_prefill(c.dev(u), state, torch.cat([pages, pages], 1)[:, ::2], plan, *args)
    with pytest.raises(ValueError, match="seq_lens must be"):
        compress_decode(c.dev(u[:1]), state, pages, torch.tensor([1, 1], dtype=torch.int32, device=DEV), *args, 128)
    with pytest.raises(ValueError, match="launch rule"):
        compress_prefill(c.dev(u), state, pages, plan, *args, rule=LaunchRule(split=3, rows_per_tile=32, num_warps=4))
    with pytest.raises(ValueError, match="pad_blocks_to"):
        plan_prefill([0], [300], 128, pad_blocks_to=1)
    with pytest.raises(ValueError, match="bias"):
        compress_prefill(c.dev(u), state, pages, plan, args[0][:64], *args[1:])
    with pytest.raises(ValueError, match="state must be"):
        compress_prefill(c.dev(u), state.to(torch.bfloat16), pages, plan, *args)
    with pytest.raises(ValueError, match="seq_lens"):
        compress_decode(c.dev(u[:1]), state, pages, torch.tensor([1], device=DEV), *args, 128)
    with pytest.raises(ValueError, match="power of two"):
        compress_decode(c.dev(u[:1, :192]), state[:, :192], pages, torch.tensor([1], dtype=torch.int32, device=DEV),
                        *args, 128)


def guarded_state(c, guard_rows):
    """The compressor's state as a view into a bigger NaN buffer with ``guard_rows`` on each side:
    a store outside the state lands in the guards (memory a real GPU would corrupt)."""
    big = torch.full((c.state.shape[0] + 2 * guard_rows, c.width), float("nan"), device=DEV)
    state = big[guard_rows: guard_rows + c.state.shape[0]]
    state.copy_(c.dev(c.state))
    return big, state


def decode_inputs(rng, c, lens):
    seqs = [raw_rows(rng, c, n) for n in lens]
    c.seed_state(seqs, [n - 1 for n in lens])
    rows = c.dev(torch.stack([u[n - 1] for u, n in zip(seqs, lens)]))
    return seqs, rows, torch.tensor(lens, dtype=torch.int32, device=DEV)


def test_index_values_are_checked_on_the_host(rng):
    """Page ids outside the state, pages shared by two requests (or by one request's two ring
    pages), positions past the RoPE table: refused before any launch, state untouched."""
    c = Compressor(rng, 4, 128, 3)
    n_state_pages = c.state.shape[0] // 4
    _, rows, seq_lens = decode_inputs(rng, c, [8, 4, 12])
    state = c.dev(c.state)
    before = state.clone()
    args = c.kernel_args()
    bad = {
        "outside the state": [[1, 2], [3, n_state_pages], [5, 6]],
        "outside the state (min -1": [[1, 2], [-1, 4], [5, 6]],
        "share a state page": [[1, 2], [2, 4], [5, 6]],  # request 1 reuses request 0's page
        "share a state page ": [[1, 2], [4, 4], [5, 6]],  # one request's two ring pages
    }
    for message, pages in bad.items():
        with pytest.raises(ValueError, match=message.strip().replace("(", r"\(")):
            compress_decode(rows, state, torch.tensor(pages, dtype=torch.int32, device=DEV), seq_lens, *args, 4)
        with pytest.raises(ValueError, match=message.strip().replace("(", r"\(")):
            compress_prefill(rows, state, torch.tensor(pages, dtype=torch.int32, device=DEV),
                             plan_prefill([0, 0, 0], [1, 1, 1], 4, device=DEV),
                             *args)
    assert torch.equal(state.view(torch.int32), before.view(torch.int32))
    # A padded slot (seq_len 0) may carry any page ids: it touches nothing.
    pages = torch.tensor([[1, 2], [999, -7], [5, 6]], dtype=torch.int32, device=DEV)
    out = compress_decode(rows, state, pages, torch.tensor([8, 0, 12], dtype=torch.int32, device=DEV), *args, 4)
    assert torch.equal(out[1].cpu(), torch.zeros(128))
    # Decode positions past the RoPE table (2048 rows here), as prefill's plan check refuses them.
    with pytest.raises(ValueError, match="position 2048 is past the RoPE table of 2048"):
        compress_decode(rows, state, c.dev(c.pages, torch.int32), torch.tensor([8, 4, 2049], dtype=torch.int32, device=DEV),
                        *args, 4)


@pytest.mark.parametrize("ratio", [4, 128])
def test_device_guard_never_writes_outside_the_state(rng, ratio):
    """With the host check off (what graph capture does): a request whose page id is past the end
    or negative stores nothing anywhere and gets a NaN row; the good request is unaffected."""
    r, d = ratio, 128
    c = Compressor(rng, ratio, d, 3)
    n_state_pages = c.state.shape[0] // r
    lens = [2 * r, r, 3 * r]  # every request closes a block
    seqs, rows, seq_lens = decode_inputs(rng, c, lens)
    # A clean run first: every request valid (within torch's error of the reference).
    clean = compress_decode(rows, c.dev(c.state).clone(), c.dev(c.pages, torch.int32), seq_lens, *c.kernel_args(), ratio)
    refs = [c.blocks(u, [n // r - 1]) for u, n in zip(seqs, lens)]
    assert_within_torch_error(clean.cpu(), torch.cat([a for a, _ in refs]), torch.cat([b for _, b in refs]), "clean run")
    big, state = guarded_state(c, guard_rows=2 * r)
    before = big.clone()
    pages = c.pages.clone()
    pages[1, -1] = n_state_pages  # one past the last page (ratio 4: the second ring page only)
    pages[2] = -1
    out = torch.zeros(3, d, device=DEV)
    compress_decode(rows, state, c.dev(pages, torch.int32), seq_lens, *c.kernel_args(), ratio, out=out, check_indices=False)
    written = set(c.ring_rows(0, lens[0])) | {int(c.pages[0, (lens[0] - 1) // r % c.n_pages]) * r + (lens[0] - 1) % r}
    changed = {i - 2 * r for i in range(big.shape[0]) if not torch.equal(big[i].view(torch.int32), before[i].view(torch.int32))}
    assert changed <= written and changed, f"rows written outside request 0's ring: {sorted(changed - written)}"
    assert out[1:].isnan().all(), "refused requests get a NaN row"
    assert torch.equal(out[0], clean[0]), "the good request is unaffected by the refused ones, bit for bit"
    # Prefill with the same pages: the refused request's blocks are NaN, its kept rows never stored.
    big, state = guarded_state(c, guard_rows=2 * r)
    before = big.clone()
    plan = plan_prefill([0, 0, 0], lens, ratio, device=DEV)
    u = c.dev(torch.cat(seqs))
    out = compress_prefill(u, state, c.dev(pages, torch.int32), plan, *c.kernel_args(), check_indices=False)
    changed = {i - 2 * r for i in range(big.shape[0]) if not torch.equal(big[i].view(torch.int32), before[i].view(torch.int32))}
    assert changed <= set(c.ring_rows(0, lens[0])), f"rows written outside request 0's ring: {sorted(changed)}"
    req = plan.blocks[:, 3].cpu()
    assert out[req != 0].isnan().all() and not out[req == 0].isnan().any()
    # A hand-made plan whose rows name a request past state_pages, or ragged rows past u: the host
    # checks the plan's own requests only, the kernel refuses these rows (NaN, nothing written).
    big, state = guarded_state(c, guard_rows=2 * r)
    before = big.clone()
    blocks, writes = plan.blocks.clone(), plan.writes.clone()
    blocks[req == 1, 3] = 7
    blocks[req == 2, 1] = u.shape[0] + 5
    writes[writes[:, 1] == 1, 1] = 7
    writes[writes[:, 1] == 2, 0] = u.shape[0] + 5
    bad = dataclasses.replace(plan, blocks=blocks, writes=writes)
    out = compress_prefill(u, state, c.dev(c.pages, torch.int32), bad, *c.kernel_args())
    changed = {i - 2 * r for i in range(big.shape[0]) if not torch.equal(big[i].view(torch.int32), before[i].view(torch.int32))}
    assert changed <= set(c.ring_rows(0, lens[0])), f"rows written outside request 0's ring: {sorted(changed)}"
    assert out[req != 0].isnan().all() and not out[req == 0].isnan().any()


def test_device_guard_position_past_the_rope_table(rng):
    """Host check off: a block whose position is past the table gives a NaN row (its ring row is
    still stored: the state stays consistent); the other request is unaffected."""
    c = Compressor(rng, 4, 128, 2)
    lens = [8, 2052]  # request 1's block starts at position 2048 of a 2048-row table
    seqs, rows, seq_lens = decode_inputs(rng, c, lens)
    state = c.dev(c.state)
    before = state.cpu().clone()
    out = compress_decode(rows, state, c.dev(c.pages, torch.int32), seq_lens, *c.kernel_args(), 4, check_indices=False)
    assert out[1].isnan().all() and not out[0].isnan().any()
    c.check_state(state, seqs, lens, before, decode=True)


def test_out_dtype_and_eps_are_checked(rng):
    c = Compressor(rng, 4, 128, 1)
    _, rows, seq_lens = decode_inputs(rng, c, [4])
    state, pages = c.dev(c.state), c.dev(c.pages, torch.int32)
    bias, norm_w, _, cos, sin = c.kernel_args()
    for out in (torch.empty(1, 128, dtype=torch.float64, device=DEV), torch.empty(1, 128, dtype=torch.int32, device=DEV)):
        with pytest.raises(ValueError, match="out must be"):
            compress_decode(rows, state, pages, seq_lens, bias, norm_w, EPS, cos, sin, 4, out=out)
    for eps in (np.float32(1e-6), torch.tensor(1e-6, dtype=torch.float64)):  # any real scalar
        compress_decode(rows, state, pages, seq_lens, bias, norm_w, eps, cos, sin, 4)
    for eps in (-1e-6, 0.0, float("nan"), float("inf"), torch.ones(2)):
        with pytest.raises(ValueError, match="eps must be a"):
            compress_decode(rows, state, pages, seq_lens, bias, norm_w, eps, cos, sin, 4)
        with pytest.raises(ValueError, match="eps must be a"):
            compress_prefill(rows, state, pages, plan_prefill([0], [1], 4, device=DEV), bias, norm_w, eps, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio, d, rotate", [(4, 512, False), (128, 512, False), (4, 128, True), (128, 128, True)])
def test_gpu_bf16_decode_and_graph(rng, ratio, d, rotate):
    """DeepSeek-V4 shapes, bf16 rows (state fp32, output bf16), batch 64 with every request on a
    block boundary; then the same decode call captured in a CUDA graph replays bit-identically."""
    r, batch = ratio, 64
    lens = [r * (1 + i % 3) for i in range(batch)]
    c = Compressor(rng, ratio, d, batch, rotate)
    seqs = [raw_rows(rng, c, n).to(torch.bfloat16).float() for n in lens]
    c.seed_state(seqs, [n - 1 for n in lens])
    state, pages = c.dev(c.state), c.dev(c.pages, torch.int32)
    rows = c.dev(torch.stack([u[n - 1] for u, n in zip(seqs, lens)]), torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.empty(batch, d, dtype=torch.bfloat16, device=DEV)
    args = c.kernel_args()
    compress_decode(rows, state, pages, seq_lens, *args, ratio, rotate=rotate, out=out)
    for b, (u, n) in enumerate(zip(seqs, lens)):
        ref64, ref32 = c.blocks(u, [n // r - 1])
        assert_within_one_rounding(out[b:b + 1].cpu(), ref64, ref32, f"request {b}")
    graph_replay_equals_eager(lambda: compress_decode(rows, state, pages, seq_lens, *args, ratio, rotate=rotate, out=out), [out])
    c.check_state(state, seqs, lens, c.state, decode=True)

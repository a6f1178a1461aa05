"""The indexer FP8 K cache (sgl_hip_kernels.indexer_k_cache) against its torch reference over the real
bytes (indexer_k_cache_ref), writer and reader as a pair, and the layout check.

CPU: the Triton kernels under the interpreter. The writer's fp8 bytes are compared bit for bit (its
encoder is integer arithmetic, exact under the interpreter); the logits in fp32 against an fp64 sum.
"""

from __future__ import annotations

import pytest
import torch

from sgl_hip_kernels.indexer_k_cache import (cp_gather_indexer_k_quant_cache, fp8_paged_mqa_logits,
                                             indexer_k_quant_and_cache)
from sgl_hip_kernels.indexer_k_cache_ref import (LayoutMismatchError, check_layout, detect_layout, gather_ref,
                                                 k_offsets, layout_probe, mqa_logits_ref, mqa_logits_torch,
                                                 quantize_ref, row_bytes, write_ref)
from sgl_hip_kernels.scales_ref import pow2_ceil
from sgl_hip_kernels.testing.checks import assert_bits_equal

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_preshuffle_offsets_by_hand():
    off = k_offsets(64, 128, True)
    for (o, c), want in {(0, 0): 0, (0, 15): 15, (0, 16): 256, (1, 0): 16, (15, 127): 2047, (16, 0): 2048,
                         (63, 127): 8191}.items():
        assert off[o, c] == want
    assert torch.equal(off.flatten().sort().values, torch.arange(64 * 128))  # a bijection on the K region
    assert torch.equal(k_offsets(16, 64, False).flatten(), torch.arange(16 * 64))


def test_pow2_ceil_is_exact_just_above_a_power_of_two():
    x = torch.tensor([1.0, 1.0000001, 0.25, 0.2500001, 3.0, 2.0**-30 * 1.0000001])
    assert torch.equal(pow2_ceil(x), torch.tensor([1.0, 2.0, 0.25, 0.5, 4.0, 2.0**-29]))
    assert torch.ceil(torch.log2(torch.tensor(1.0000001) * 2**-8)) == -8  # what log2 would have given (2^-8)


def test_fp8_encoder_matches_torch_on_every_code_boundary(rng):
    """The kernel's integer e4m3 encoder: every code, every midpoint between codes (ties to even)
    and random values, against torch's cast (through the writer at scale 1: amax 448 per row)."""
    codes = torch.arange(256, dtype=torch.int32)
    vals = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = vals[~vals.isnan()].sort().values.unique()
    mids = (finite[1:] + finite[:-1]) / 2
    x = torch.cat([finite, mids, torch.randn(4096, generator=rng).clamp(-40, 40) * 10]).clamp(-448, 448)
    n = -(-len(x) // 127) * 127
    x = torch.cat([x, torch.zeros(n - len(x))]).reshape(-1, 127)
    k = torch.cat([torch.full((x.shape[0], 1), 448.0), x], 1)  # amax 448: the scale is exactly 1
    cache = torch.zeros(x.shape[0], 1, 132, dtype=torch.uint8)
    slots = torch.arange(x.shape[0])
    cache_dev = cache.to(DEV)
    indexer_k_quant_and_cache(k.to(DEV), cache_dev, slots.to(DEV), 128, "ue8m0")
    want = k.to(torch.float8_e4m3fn).view(torch.uint8)
    assert_bits_equal(cache_dev[:, 0, :128].cpu(), want, "e4m3 codes")


@pytest.mark.parametrize("block_size, head_dim, qbs", [(16, 128, 128), (64, 128, 128), (128, 128, 128), (64, 64, 64),
                                                        (16, 128, 64)])
@pytest.mark.parametrize("preshuffle", [False, True])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_writer_bytes_and_gather_round_trip(rng, block_size, head_dim, qbs, preshuffle, scale_fmt):
    blocks, t = 6, 3 * block_size // 2 + 5
    k = torch.randn(t, head_dim, generator=rng) * torch.exp2(torch.randint(-6, 6, (t, 1), generator=rng).float())
    slots = torch.randperm(blocks * block_size - 1, generator=rng)[:t]  # distinct, and none is the last slot
    slots[1] = -1  # skipped
    slots[2] = blocks * block_size - 1  # the last token of the last block
    width = row_bytes(head_dim, qbs)
    want = torch.full((blocks, block_size, width), 0xAB, dtype=torch.uint8)
    write_ref(k, want, slots, qbs, scale_fmt, preshuffle)
    got = torch.full((blocks, block_size, width), 0xAB, dtype=torch.uint8, device=DEV)
    indexer_k_quant_and_cache(k.to(DEV), got, slots.to(DEV), qbs, scale_fmt, preshuffle)
    # K region and scale region compared separately (as aiter's test does); bytes no token owns untouched.
    k_bytes = block_size * head_dim
    assert_bits_equal(got.reshape(blocks, -1)[:, :k_bytes].cpu(), want.reshape(blocks, -1)[:, :k_bytes], "K region")
    assert_bits_equal(got.reshape(blocks, -1)[:, k_bytes:].cpu(), want.reshape(blocks, -1)[:, k_bytes:], "scale region")
    # Gather: three ragged sequences over a block table with holes (-1 where a sequence has no block).
    table = torch.full((3, blocks), -1, dtype=torch.int32)
    order = torch.randperm(blocks, generator=rng).to(torch.int32)
    table[0, :2], table[1, :1], table[2, :3] = order[:2], order[2:3], order[3:6]
    lens = torch.tensor([2 * block_size, 1, 3 * block_size - 3])
    cu = torch.cat([torch.zeros(1), lens.cumsum(0)]).to(torch.int32)
    n = int(cu[-1])
    dst_k = torch.full((n, head_dim), 0xCD, dtype=torch.uint8, device=DEV)
    dst_s = torch.full((n, 4 * head_dim // qbs), 0xCD, dtype=torch.uint8, device=DEV)
    cp_gather_indexer_k_quant_cache(got, dst_k, dst_s, table.to(DEV), cu.to(DEV), preshuffle)
    ref_k, ref_s = gather_ref(want, table, cu, head_dim, qbs, preshuffle)
    assert_bits_equal(dst_k.cpu(), ref_k, "gathered K")
    assert_bits_equal(dst_s.cpu(), ref_s, "gathered scales")
    # The written tokens come back as their quantised values, wherever the layout put them.
    codes, scales = quantize_ref(k, qbs, scale_fmt)
    block, o = slots[slots >= 0] // block_size, slots[slots >= 0] % block_size
    flat = want.reshape(blocks, -1)
    assert torch.equal(flat[block[:, None], k_offsets(block_size, head_dim, preshuffle)[o]], codes[slots >= 0])


def test_gather_never_reads_past_the_table_or_the_cache(rng):
    cache = torch.full((2, 16, 132), 0xEE, dtype=torch.uint8, device=DEV)
    table = torch.tensor([[1, 7, -1]], dtype=torch.int32, device=DEV)  # block 7 is not in the cache
    cu = torch.tensor([0, 48], dtype=torch.int32, device=DEV)  # 48 tokens: the third block is a hole
    dst_k = torch.zeros(48, 128, dtype=torch.uint8, device=DEV)
    dst_s = torch.zeros(48, 4, dtype=torch.uint8, device=DEV)
    cp_gather_indexer_k_quant_cache(cache, dst_k, dst_s, table, cu)
    assert (dst_k[:16] == 0xEE).all() and (dst_k[16:] == 0x7F).all() and (dst_s[16:] == 0xFF).all()


def case(rng, b, next_n, h, d, block_size, blocks_per_seq, preshuffle, ctx):
    blocks = b * blocks_per_seq + 3
    cache = torch.zeros(blocks, block_size, d + 4, dtype=torch.uint8)
    table = torch.randperm(blocks, generator=rng)[: b * blocks_per_seq].reshape(b, blocks_per_seq).to(torch.int32)
    for row in range(b):
        n = ctx[row]
        pos = torch.arange(n)
        slots = table[row, pos // block_size].long() * block_size + pos % block_size
        write_ref(torch.randn(n, d, generator=rng), cache, slots, d, "ue8m0", preshuffle)
    used = torch.zeros(blocks, dtype=torch.bool)
    used[table.flatten().long()] = True
    cache[~used] = 0x7F  # NaN in every block no table names
    q = (torch.randn(b, next_n, h, d, generator=rng) * 4).to(torch.float8_e4m3fn)
    w = torch.randn(b * next_n, h, generator=rng)
    return cache, table, q, w, torch.tensor(ctx, dtype=torch.int32)


@pytest.mark.parametrize("preshuffle", [False, True])
@pytest.mark.parametrize("block_size, next_n, h", [(64, 1, 16), (16, 2, 20), (64, 2, 64)])
def test_writer_reader_pair(rng, preshuffle, block_size, next_n, h):
    cache, table, q, w, ctx = case(rng, 3, next_n, h, 128, block_size, 4, preshuffle, [4 * block_size, 1, block_size + 7])
    max_len = 4 * block_size + 16
    out = torch.full((3 * next_n, max_len), float("nan"), device=DEV)
    got = fp8_paged_mqa_logits(q.to(DEV), cache.to(DEV), w.to(DEV), ctx.to(DEV), table.to(DEV), max_len, preshuffle,
                               block_size, out=out)
    ref = mqa_logits_ref(q, cache, w, ctx, table, max_len, preshuffle, block_size)
    ref32 = mqa_logits_ref(q, cache, w, ctx, table, max_len, preshuffle, block_size, work=torch.float32)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isinf(got.cpu()), ~finite) and not got.isnan().any()
    err = (got.cpu().double() - ref)[finite].abs().max()
    assert err <= 2 * (ref32.double() - ref)[finite].abs().max() + 1e-6 * ref[finite].abs().max(), err
    batched = mqa_logits_torch(q, cache, w, ctx, table, max_len, preshuffle, block_size)  # the benchmark's torch arm
    assert torch.equal(torch.isinf(batched), ~finite)
    assert torch.allclose(batched.double()[finite], ref[finite], rtol=1e-5, atol=1e-4)
    # The same bytes read in the other layout are different logits: the pairing matters.
    other = fp8_paged_mqa_logits(q.to(DEV), cache.to(DEV), w.to(DEV), ctx.to(DEV), table.to(DEV), max_len,
                                 not preshuffle, block_size)
    assert not torch.allclose(other.cpu()[finite], got.cpu()[finite])


def test_block_64_reads_the_right_token(rng):
    """The aiter #5591 shape: 64-token blocks named by a block table (not per token): each position
    must read its own token, and nothing past the context (NaN there) may leak."""
    cache, table, q, w, ctx = case(rng, 2, 1, 16, 128, 64, 3, False, [130, 64])
    max_len = 192
    got = fp8_paged_mqa_logits(q.to(DEV), cache.to(DEV), w.to(DEV), ctx.to(DEV), table.to(DEV), max_len, False, 64)
    ref = mqa_logits_ref(q, cache, w, ctx, table, max_len, False, 64)
    assert torch.isfinite(got[0, :130]).all() and torch.isinf(got[0, 130:]).all() and torch.isinf(got[1, 64:]).all()
    assert torch.allclose(got.cpu().double()[torch.isfinite(ref)], ref[torch.isfinite(ref)], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("written, read", [(False, True), (True, False)])
def test_layout_check_catches_both_directions(rng, written, read):
    """#31563: a row-major writer and a preshuffled reader (and the reverse) raise, naming both."""
    cache = torch.zeros(4, 64, 132, dtype=torch.uint8, device=DEV)
    k = torch.randn(40, 128, generator=rng).to(DEV)
    indexer_k_quant_and_cache(k, cache, torch.arange(40, device=DEV), 128, "ue8m0", written)
    probe_slot = 64 + 5
    probe = layout_probe(128, DEV)
    indexer_k_quant_and_cache(probe, cache, torch.tensor([probe_slot], device=DEV), 128, "ue8m0", written)
    assert detect_layout(cache, probe_slot, probe, 128, "ue8m0") is written
    check_layout(cache, probe_slot, probe, 128, "ue8m0", written)  # the matching pair passes
    q = torch.randn(1, 1, 16, 128, generator=rng).to(torch.float8_e4m3fn).to(DEV)
    args = (q, cache, torch.randn(1, 16, device=DEV), torch.tensor([40], dtype=torch.int32, device=DEV),
            torch.tensor([[0, 1]], dtype=torch.int32, device=DEV), 128, read, 64)
    with pytest.raises(LayoutMismatchError, match="written row-major, the reader expects preshuffled" if not written
                       else "written preshuffled .*, the reader expects row-major"):
        fp8_paged_mqa_logits(*args, probe=(probe_slot, probe, "ue8m0"))
    with pytest.raises(LayoutMismatchError, match="neither layout"):
        check_layout(cache, 3 * 64, probe, 128, "ue8m0", read)  # nothing written there


def test_bad_inputs_are_refused(rng):
    cache = torch.zeros(2, 24, 132, dtype=torch.uint8)
    k = torch.randn(3, 128)
    with pytest.raises(ValueError, match="multiples of 16"):
        indexer_k_quant_and_cache(k, cache, torch.arange(3), 128, "ue8m0", preshuffle=True)
    with pytest.raises(ValueError, match="rows are 132 B"):
        indexer_k_quant_and_cache(torch.randn(3, 64), cache, torch.arange(3), 64, "ue8m0")
    with pytest.raises(ValueError, match="scale_fmt"):
        indexer_k_quant_and_cache(k, cache, torch.arange(3), 128, "e4m3")
    with pytest.raises(ValueError, match="past the cache"):
        indexer_k_quant_and_cache(k, cache, torch.tensor([0, 1, 48]), 128, "ue8m0")
    with pytest.raises(ValueError, match="one-byte"):
        indexer_k_quant_and_cache(k, cache.float(), torch.arange(3), 128, None)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        indexer_k_quant_and_cache(k, cache.view(torch.float8_e5m2), torch.arange(3), 128, None)
    with pytest.raises(ValueError, match="block_size is 16"):
        fp8_paged_mqa_logits(torch.zeros(1, 1, 4, 128, dtype=torch.uint8), cache, torch.zeros(1, 4),
                             torch.ones(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32), 8, False, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("preshuffle", [False, True])
def test_gpu_fp8_bytes_logits_and_graph(rng, preshuffle):
    """On the GPU: the writer's bytes equal the reference's, the bf16 reader is within 2x torch's
    bf16 error of the fp64 logits, and a CUDA-graph replay of the reader equals eager."""
    from sgl_hip_kernels.testing.checks import graph_replay_equals_eager

    blocks, bs, t = 64, 64, 3000
    k = torch.randn(t, 128, generator=rng)
    slots = torch.randperm(blocks * bs, generator=rng)[:t]
    want = torch.zeros(blocks, bs, 132, dtype=torch.uint8)
    write_ref(k, want, slots, 128, "ue8m0", preshuffle)
    got = torch.zeros(blocks, bs, 132, dtype=torch.uint8, device="cuda")
    indexer_k_quant_and_cache(k.cuda(), got, slots.cuda(), 128, "ue8m0", preshuffle)
    assert_bits_equal(got.cpu(), want, "writer bytes on the GPU")
    cache, table, q, w, ctx = case(rng, 4, 2, 64, 128, 64, 8, preshuffle, [512, 100, 1, 300])
    ref = mqa_logits_ref(q, cache, w, ctx, table, 520, preshuffle, 64)
    args = (q.cuda(), cache.cuda(), w.cuda(), ctx.cuda(), table.cuda(), 520, preshuffle, 64)
    out = torch.empty(8, 520, device="cuda")
    fp8_paged_mqa_logits(*args, out=out)
    finite = torch.isfinite(ref)
    same = mqa_logits_torch(q.cuda(), cache.cuda(), w.cuda(), ctx.cuda(), table.cuda(), 520, preshuffle, 64).cpu()
    err = (out.cpu().double() - ref)[finite].abs().max()
    assert err <= 2 * (same.double() - ref)[finite].abs().max() + 1e-3 * ref[finite].abs().max(), err
    graph_replay_equals_eager(lambda: fp8_paged_mqa_logits(*args, out=out), [out])


@pytest.mark.gpu
def test_gpu_cache_over_2gib(rng):
    bs = 64
    blocks = 2**31 // (bs * 132) + 8
    cache = torch.zeros(blocks, bs, 132, dtype=torch.uint8, device="cuda")
    assert cache.numel() > 2**31
    k = torch.randn(bs, 128, generator=rng).cuda()
    slots = (blocks - 1) * bs + torch.arange(bs, device="cuda")  # the last block, past 2 GiB
    indexer_k_quant_and_cache(k, cache, slots, 128, "ue8m0", True)
    dst_k = torch.empty(bs, 128, dtype=torch.uint8, device="cuda")
    dst_s = torch.empty(bs, 4, dtype=torch.uint8, device="cuda")
    table = torch.tensor([[blocks - 1]], dtype=torch.int32, device="cuda")
    cp_gather_indexer_k_quant_cache(cache, dst_k, dst_s, table, torch.tensor([0, bs], dtype=torch.int32, device="cuda"), True)
    codes, scales = quantize_ref(k.cpu(), 128, "ue8m0")
    assert_bits_equal(dst_k.cpu(), codes, "K bytes past 2 GiB")
    assert_bits_equal(dst_s.cpu().view(torch.float32), scales, "scales past 2 GiB")


# --- against upstream's own Triton store and gather (sglang 0.5.23) -------------------------------

def _upstream_0523():
    import os

    from sgl_hip_kernels.testing.upstream import release_wheel

    found = release_wheel("0.5.23")
    if found is None:
        if os.environ.get("SGLANG_HIP_DECODE_TEST_RELEASES"):
            pytest.fail("the sglang 0.5.23 wheel is missing although make test fetched the releases")
        pytest.skip("the sglang 0.5.23 wheel is missing: run `make releases` (tools/release_wheels.py)")
    return found


@pytest.mark.parametrize("preshuffle", [False, True])
def test_upstream_0523_triton_store_and_gather_agree_byte_for_byte(rng, preshuffle):
    """sglang 0.5.23's own index-K store (both layouts: its module switch) writes, from our
    quantisation, exactly the bytes our writer writes; its gather (row-major only) returns what
    ours returns. A second implementation of the preshuffle formula, read from the release."""
    from sgl_hip_kernels.testing.upstream import PoolShape, dsa_index_k_cache

    up = dsa_index_k_cache(_upstream_0523(), preshuffle)
    blocks = 5
    ours, theirs = (torch.zeros(blocks, 64, 132, dtype=torch.uint8, device=DEV) for _ in range(2))
    k = (torch.randn(70, 128, generator=rng) * 3).to(DEV)
    slots = torch.randperm(blocks * 64, generator=rng)[:70].to(DEV)
    slots[-1] = blocks * 64 - 1  # the last token of the last block
    indexer_k_quant_and_cache(k, ours, slots, 128, "ue8m0", preshuffle)
    codes, scales = quantize_ref(k, 128, "ue8m0")
    up.SetKAndS.triton(PoolShape, theirs.view(blocks, -1), slots.long(), codes.view(torch.float8_e4m3fn),
                       scales.contiguous())
    assert_bits_equal(theirs, ours, "upstream's store vs ours")
    if not preshuffle:
        lens = torch.tensor([130, 3, 0, 64], dtype=torch.int32)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)]).to(DEV)
        table = torch.tensor([[4, 0, 2], [1, -1, -1], [-1, -1, -1], [3, -1, -1]], dtype=torch.int32, device=DEV)
        dst_k = torch.empty(int(lens.sum()), 128, dtype=torch.uint8, device=DEV)
        dst_s = torch.empty(int(lens.sum()), 4, dtype=torch.uint8, device=DEV)
        cp_gather_indexer_k_quant_cache(ours, dst_k, dst_s, table, cu, False)
        got_k, got_s = up.GetKAndS.triton(PoolShape, theirs.view(blocks, -1), table, lens.to(DEV), int(lens.sum()),
                                          int(lens.max()))
        assert_bits_equal(got_k, dst_k, "upstream's gather vs ours: K")
        assert_bits_equal(got_s, dst_s, "upstream's gather vs ours: scales")

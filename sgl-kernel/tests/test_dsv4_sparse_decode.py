"""DeepSeek-V4 sparse decode (sgl_hip_kernels.dsv4.sparse_decode) vs an fp64 reference that reads the
cache bytes with its own dequantisation (``kv_cache.gather_tokens``, torch; not the kernel's).

How the CPU suite covers the fp8 decode: under the interpreter q is fp32 and every dot is fp32, but
the cache is the real FP8 one and the kernel's own fp8 path runs (its bitcast of the bytes to
e4m3, the power-of-two scales, the bf16 RoPE). ``test_every_fp8_code_decodes_exactly`` sends each of
the 254 finite e4m3 codes, at several scales, through that path and asserts bit-exact values, so
the CPU checks the decode itself, not an approximation of it; bf16 q and bf16 dots (the GPU's
precision) are covered by the @gpu tests at DeepSeek-V4 shapes.

Tolerance: "within torch's error": 2x the error torch makes computing the same in the kernel's
precision (fp32 on the CPU, bf16 on the GPU) against the fp64 reference, plus one rounding of the
reference to the output's dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sgl_hip_kernels.dsv4 import dequantize_kv, page_bytes, quantize_kv, sparse_decode
from sgl_hip_kernels.dsv4.kv_cache import DATA_BYTES, TOKEN_BYTES
from sgl_hip_kernels.dsv4.sparse_decode import launch_rule
from sgl_hip_kernels.dsv4.sparse_decode_ref import sparse_decode_ref
from sgl_hip_kernels.testing.checks import assert_bits_equal, assert_within_torch_error, graph_replay_equals_eager

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN_BYTE = 0x7F  # e4m3fn NaN


class Scope:
    """A cache of ``pages`` pages of ``block_size`` tokens and, per query token, ``topk`` indices into
    it; every token no index names is poisoned (NaN data, NaN RoPE, an infinite scale)."""

    def __init__(self, rng, b, s_q, topk, block_size, pages, device=DEV, invalid=0.0, length=None):
        self.block_size = block_size
        kv = torch.randn(pages, block_size, 512, generator=rng) * 2
        self.cache = quantize_kv(kv, block_size)
        n = pages * block_size
        idx = torch.stack([torch.randperm(n, generator=rng)[:topk] for _ in range(b * s_q)]).reshape(b, s_q, topk)
        drop = torch.rand(b, s_q, topk, generator=rng) < invalid
        self.indices = torch.where(drop, -1, idx).to(torch.int32)
        self.length = None if length is None else torch.tensor(length, dtype=torch.int32)
        used = torch.zeros(n, dtype=torch.bool)
        keep = self.indices >= 0
        if self.length is not None:
            keep &= torch.arange(topk) < self.length[:, None, None]
        used[self.indices[keep].long()] = True
        self.poison(~used)
        self.cache, self.indices = self.cache.to(device), self.indices.to(device)
        self.length = None if self.length is None else self.length.to(device)

    def poison(self, unused):
        pages, bs = self.cache.shape[0], self.block_size
        data = self.cache[:, : bs * DATA_BYTES].view(pages, bs, DATA_BYTES)
        exps = self.cache[:, bs * DATA_BYTES : bs * TOKEN_BYTES].view(pages, bs, 8)
        unused = unused.reshape(pages, bs)
        data[..., :448][unused] = NAN_BYTE
        data[..., 448:][unused] = 0xFF  # bf16 NaN
        exps[..., :7][unused] = 0xFF  # 2^128: inf
        self.cache[:, bs * TOKEN_BYTES :] = 0xFF  # page padding

    def kwargs(self, prefix=""):
        names = ("k_cache", "indices", "block_size", "topk_length") if not prefix else (
            "extra_k_cache", "extra_indices", "extra_block_size", "extra_topk_length")
        return dict(zip(names, (self.cache, self.indices, self.block_size, self.length)))


def run_both(q, main, extra=None, sink=None, scale=0.04, **kw):
    args = dict(main.kwargs(), **(extra.kwargs("x") if extra else {}))
    cache, idx, bs = args.pop("k_cache"), args.pop("indices"), args.pop("block_size")
    got = sparse_decode(q, cache, idx, bs, scale, attn_sink=sink, **args, **kw)
    ref = sparse_decode_ref(q.double(), cache, idx, bs, scale, attn_sink=sink, **args)
    same = sparse_decode_ref(q, cache, idx, bs, scale, attn_sink=sink, **args,
                             work=torch.float32 if q.dtype == torch.float32 else torch.bfloat16)
    return got, ref, same


def check(got, ref, same, what):
    (out, lse), (ref_out, ref_lse), (same_out, same_lse) = got, ref, same
    assert not out.isnan().any(), f"{what}: NaN in the output"
    assert_within_torch_error(out, ref_out, same_out, f"{what} out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{what}: lonely rows differ"
    finite = ~torch.isinf(ref_lse)
    if finite.any():
        assert_within_torch_error(lse[finite], ref_lse[finite], same_lse[finite].float(), f"{what} lse")


# --- the cache format ---------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 2, 53, 64, 576])
def test_quantize_layout_and_round_trip(rng, block_size):
    pages = 2
    kv = torch.randn(pages, block_size, 512, generator=rng) * torch.exp2(torch.randint(-20, 20, (pages, block_size, 1),
                                                                                         generator=rng).float())
    cache = quantize_kv(kv, block_size)
    assert cache.dtype == torch.uint8 and cache.shape == (pages, page_bytes(block_size))
    assert page_bytes(block_size) % 576 == 0 and page_bytes(block_size) >= block_size * 584
    assert page_bytes(block_size) - block_size * 584 < 576
    # Byte positions, written out here: token t's RoPE at t*576+448 (bf16), its 7 scales at bs*576+8t.
    t = block_size - 1
    rope = cache[1, t * 576 + 448 : t * 576 + 576].view(torch.bfloat16)
    assert torch.equal(rope, kv[1, t, 448:].bfloat16())
    scales = cache[1, block_size * 576 + 8 * t : block_size * 576 + 8 * t + 8]
    amax = kv[1, t, :448].reshape(7, 64).abs().amax(-1)
    # The smallest power of two that brings the tile's amax inside +-448:
    assert ((amax / torch.exp2(scales[:7].float() - 127) <= 448) & (amax / torch.exp2(scales[:7].float() - 128) > 448)).all()
    assert scales[7] == 0 and (cache[:, block_size * 584 :] == 0).all()
    back = dequantize_kv(cache, block_size)
    tile_amax = kv[..., :448].reshape(pages, block_size, 7, 64).abs().amax(-1, keepdim=True)
    err = (back[..., :448] - kv[..., :448]).reshape(pages, block_size, 7, 64).abs()
    assert (err <= tile_amax * 2**-4).all()  # e4m3: 3 mantissa bits, the scale within a factor 2 of amax/448
    assert torch.equal(back[..., 448:], kv[..., 448:].bfloat16().float())


def test_cache_views_and_bad_geometry(rng):
    bs = 61
    cache = quantize_kv(torch.randn(3, bs, 512, generator=rng), bs)
    view = torch.as_strided(cache, (3, bs, 1, 584), (cache.stride(0), 584, 584, 1))  # SGLang's byte view
    assert torch.equal(dequantize_kv(view, bs), dequantize_kv(cache, bs))
    assert torch.equal(dequantize_kv(cache.view(torch.float8_e4m3fn), bs), dequantize_kv(cache, bs))
    with pytest.raises(ValueError, match="does not hold block_size 60"):
        dequantize_kv(cache, 60)
    with pytest.raises(ValueError, match="one-byte"):
        dequantize_kv(cache.view(torch.int16), bs)
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_kv(cache[:, ::2], bs)
    with pytest.raises(ValueError, match="quantize_kv"):
        quantize_kv(torch.randn(2, bs, 448), bs)


def test_every_fp8_code_decodes_exactly(rng):
    """Every finite e4m3 code at scales 2^-23..2^15, through the kernel's own decode path: one valid
    key per query makes out = that key exactly (softmax weight 1; fp32 on the CPU)."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    bs, exps = 64, (107, 120, 127, 139)
    cache = torch.zeros(len(exps), page_bytes(bs), dtype=torch.uint8)
    for p, e in enumerate(exps):
        for t in range(bs):
            row = torch.roll(codes.repeat(2), t * 7)[:448]
            cache[p, t * 576 : t * 576 + 448] = row
            cache[p, t * 576 + 448 : t * 576 + 576] = torch.randn(64, generator=rng).bfloat16().view(torch.uint8)
            cache[p, bs * 576 + 8 * t : bs * 576 + 8 * t + 7] = torch.tensor([e - 3 + (t + i) % 7 for i in range(7)])
    n = len(exps) * bs
    indices = torch.arange(n, dtype=torch.int32).reshape(n, 1, 1)
    q = torch.randn(n, 1, 3, 512, generator=rng)
    cache, indices, q = cache.to(DEV), indices.to(DEV), q.to(DEV)
    out, lse = sparse_decode(q, cache, indices, bs, 0.01)
    want = dequantize_kv(cache, bs).reshape(n, 1, 1, 512).expand(n, 1, 3, 512)
    # Equal values (a sum of one product: the -0 code comes back +0).
    assert torch.equal(out.float(), want.to(out.dtype).float()), "one key: out == its dequantised value"
    assert torch.isfinite(lse).all()
    seen = torch.unique(cache[:, : bs * 576].reshape(len(exps), bs, 576)[..., :448])
    assert len(seen) == 254  # every finite code went through


# --- against the reference (CPU: interpreter, fp32) --------------------------------------------

@pytest.mark.parametrize("block_size", [2, 53, 61, 69, 576])
@pytest.mark.parametrize("s_q", [1, 2])
def test_odd_block_sizes(rng, block_size, s_q):
    main = Scope(rng, 2, s_q, 40, block_size, max(2, 96 // block_size + 1), invalid=0.2)
    q = torch.randn(2, s_q, 5, 512, generator=rng).to(DEV)
    check(*run_both(q, main, sink=torch.randn(5, generator=rng).to(DEV)), f"block {block_size} s_q {s_q}")


@pytest.mark.parametrize("splits", [None, 1, 2, 5])
@pytest.mark.parametrize("sink", [False, True])
def test_two_scopes_lengths_and_splits(rng, splits, sink):
    b, s_q, h = 3, 2, 20  # heads not a multiple of 16
    main = Scope(rng, b, s_q, 48, 16, 8, invalid=0.1, length=[48, 7, 0])
    extra = Scope(rng, b, s_q, 80, 2, 64, invalid=0.1, length=[0, 80, 33])
    q = torch.randn(b, s_q, h, 512, generator=rng).to(DEV)
    attn_sink = torch.randn(h, generator=rng).to(DEV) if sink else None
    check(*run_both(q, main, extra, sink=attn_sink, splits=splits), f"two scopes, splits {splits}")


def test_lonely_rows_and_no_valid_index(rng):
    b, s_q, h = 3, 2, 4
    main = Scope(rng, b, s_q, 96, 8, 16, length=[96, 0, 96])
    assert launch_rule(b * s_q, h, 96, DEV, 3).splits == 3  # the combine's empty rows are exercised
    main.indices[2, 1] = -1  # one lonely query among valid ones
    q = torch.randn(b, s_q, h, 512, generator=rng).to(DEV)
    sink = torch.randn(h, generator=rng).to(DEV)
    for splits in (1, 3):
        (out, lse), ref, same = run_both(q, main, sink=sink, splits=splits)
        check((out, lse), ref, same, f"lonely, splits {splits}")
        assert (out[1] == 0).all() and (out[2, 1] == 0).all()
        assert torch.isinf(lse[1]).all() and (lse[1] > 0).all() and torch.isinf(lse[2, :, 1]).all()
        assert torch.isfinite(lse[0]).all()
    everything_invalid = torch.full_like(main.indices, -1)
    out, lse = sparse_decode(q, main.cache, everything_invalid, 8, 0.1, attn_sink=sink, splits=2)
    assert (out == 0).all() and (lse == float("inf")).all()


def test_device_guard_treats_indices_past_the_cache_as_invalid(rng):
    """With the host's check off, an index past the cache reads nothing (the kernel's own guard)."""
    main = Scope(rng, 2, 1, 64, 16, 8)
    q = torch.randn(2, 1, 4, 512, generator=rng).to(DEV)
    wild = main.indices.clone()
    wild[:, :, ::3] = 8 * 16 + torch.arange(22, device=DEV).to(torch.int32) * 1000  # past the 128 tokens
    got = sparse_decode(q, main.cache, wild, 16, 0.05, check_indices=False, splits=2)
    want = sparse_decode(q, main.cache, torch.where(wild >= 128, -1, wild), 16, 0.05, splits=2)
    assert_bits_equal(got[0], want[0], "out-of-range indices are invalid")
    assert_bits_equal(got[1], want[1], "lse")


def test_sink_changes_out_not_lse(rng):
    main = Scope(rng, 2, 1, 32, 16, 4)
    q = torch.randn(2, 1, 6, 512, generator=rng).to(DEV)
    plain = sparse_decode(q, main.cache, main.indices, 16, 0.05)
    sink = torch.randn(6, generator=rng).to(DEV)
    sunk = sparse_decode(q, main.cache, main.indices, 16, 0.05, attn_sink=sink)
    assert torch.equal(plain[1], sunk[1])
    factor = 1 / (1 + torch.exp(sink[None, None, :, None] - plain[1].transpose(1, 2)[..., None]))
    assert torch.allclose(sunk[0].double(), plain[0].double() * factor.double(), rtol=1e-5, atol=1e-6)


def test_strided_q_views_and_out(rng):
    main = Scope(rng, 2, 2, 24, 32, 4)
    big = torch.randn(2, 2, 9, 1024, generator=rng).to(DEV)
    q = big[:, :, 1:8, 256:768]  # non-contiguous heads and rows
    view = torch.as_strided(main.cache, (4, 32, 1, 584), (main.cache.stride(0), 584, 584, 1))
    out = torch.full((2, 2, 7, 512), float("nan"), device=DEV)
    got, lse = sparse_decode(q, view, main.indices, 32, 0.05, out=out)
    assert got is out and not out.isnan().any()
    want = sparse_decode(q.contiguous(), main.cache, main.indices, 32, 0.05)
    assert_bits_equal(out, want[0], "a strided q and a byte view read the same")
    assert_bits_equal(lse, want[1], "lse")


def test_launch_rule_is_fixed_and_bounded(monkeypatch):
    from sgl_hip_kernels import splitk

    monkeypatch.setattr(splitk, "_sm_count", lambda device: 132)  # an H200's rule, on any machine
    p = launch_rule(1, 64, 640, "cuda")
    assert (p.block_h, p.block_n, p.num_warps) == (64, 64, 8) and p.splits == 5  # 640 keys, >= 128 per split
    assert launch_rule(256, 128, 1152, "cuda").splits == 1  # 512 programs already cover 132 SMs twice
    assert launch_rule(4, 16, 640, "cuda").block_h == 16
    p = launch_rule(2, 128, 1152, "cpu", splits=64)
    assert p.splits * p.keys_per_split >= 1152 and (p.splits - 1) * p.keys_per_split < 1152
    assert p.keys_per_split % p.block_n == 0 and (p.keys_per_split // p.block_n) & (p.keys_per_split // p.block_n - 1) == 0


def test_bad_inputs_are_refused(rng):
    main = Scope(rng, 2, 2, 16, 8, 4, device="cpu")
    q = torch.randn(2, 2, 4, 512, generator=rng)
    c, i = main.cache, main.indices
    cases = [
        ((q.half(), c, i, 8), {}, "q must be"),
        ((q[..., :448], c, i, 8), {}, "q must be"),
        ((q, c, i.long(), 8), {}, "int32"),
        ((q, c, i[:1], 8), {}, "indices must be"),
        ((q, c, i, 7), {}, "does not hold block_size 7"),
        ((q, c, i, 8), {"topk_length": torch.tensor([1, 2, 3, 4], dtype=torch.int32)}, "one length per batch row"),
        ((q, c, i, 8), {"topk_length": torch.tensor([1, 2])}, "int32"),
        ((q, c, i + 100, 8), {}, "past the cache"),
        ((q, c, i, 8), {"extra_k_cache": c, "extra_indices": i}, "together"),
        ((q, c, i, 8), {"extra_topk_length": torch.tensor([1, 2], dtype=torch.int32)}, "without an extra scope"),
        ((q, c, i, 8), {"extra_block_size": 8}, "without an extra scope"),
        ((q, c, i, 8), {"topk_length": torch.tensor([[1, 0], [2, 0]], dtype=torch.int32)[:, 0]}, "contiguous"),
        ((q, c, i, 8), {"attn_sink": torch.zeros(4, 2)[:, 0]}, "contiguous"),
        ((q, c.view(torch.bool), i, 8), {}, "one-byte"),
        ((q, c, i, 8), {"attn_sink": torch.zeros(3)}, "attn_sink"),
        ((q, c, i, 8), {"out": torch.empty(2, 2, 4, 512, dtype=torch.bfloat16)}, "out must be"),
        ((q, c.float(), i, 8), {}, "one-byte"),
    ]
    for args, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            sparse_decode(*args, 0.1, **kw)
    assert len(cases) == 17
    odd = torch.zeros(c.numel() + 1, dtype=torch.uint8)[1:].view(c.shape)
    with pytest.raises(ValueError, match="even address"):
        sparse_decode(q, odd, i, 8, 0.1)
    lengths = torch.tensor([3, 16], dtype=torch.int32)
    past = i.clone()
    past[0, :, 3:] = 10**6  # past the row's length: ignored, so not refused
    sparse_decode(q, c, past, 8, 0.1, topk_length=lengths)
    empty = sparse_decode(q[:0], c, i[:0], 8, 0.1)
    assert empty[0].shape == (0, 2, 4, 512) and empty[1].shape == (0, 4, 2)


def test_import_has_no_global_side_effects():
    code = ("import os; before = dict(os.environ); import sgl_hip_kernels.dsv4.sparse_decode; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --- GPU: bf16, DeepSeek-V4 shapes ------------------------------------------------------------

DSV4_SHAPES = [  # (h_q, batch, s_q, extra top-k, extra block)
    (64, 1, 2, 512, 64), (64, 2, 1, 512, 64), (64, 64, 2, 512, 64), (64, 74, 1, 512, 64), (64, 256, 1, 512, 64),
    (128, 1, 1, 1024, 1024), (128, 2, 2, 1024, 64), (128, 74, 2, 1024, 64), (128, 128, 1, 1024, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("h, b, s_q, x_topk, x_block", DSV4_SHAPES)
def test_gpu_dsv4_shapes(rng, h, b, s_q, x_topk, x_block):
    # The SWA scope: top-k 128 over pages of 256 tokens; the compressed scope: top-k 512/1024.
    main = Scope(rng, b, s_q, 128, 256, max(2, b), device="cpu", invalid=0.05, length=None)
    extra = Scope(rng, b, s_q, x_topk, x_block, max(2, b * x_topk // x_block + 1), device="cpu", invalid=0.05,
                  length=torch.randint(1, x_topk + 1, (b,), generator=rng).tolist())
    for s in (main, extra):
        s.cache, s.indices, s.length = s.cache.cuda(), s.indices.cuda(), None if s.length is None else s.length.cuda()
    q = torch.randn(b, s_q, h, 512, generator=rng).bfloat16().cuda()
    sink = torch.randn(h, generator=rng).cuda()
    got, ref, same = run_both(q, main, extra, sink=sink, scale=512**-0.5)
    check(got, ref, same, f"h {h} batch {b} s_q {s_q}")
    out = torch.empty_like(got[0])
    args = dict(main.kwargs(), **extra.kwargs("x"))
    cache, idx, bs = args.pop("k_cache"), args.pop("indices"), args.pop("block_size")
    graph_replay_equals_eager(lambda: sparse_decode(q, cache, idx, bs, 512**-0.5, attn_sink=sink, out=out, **args), [out])


@pytest.mark.gpu
def test_gpu_cache_over_2gib(rng):
    bs = 64
    pages = (2**31 // page_bytes(bs)) + 64
    cache = torch.zeros(pages, page_bytes(bs), dtype=torch.uint8, device="cuda")
    assert cache.numel() > 2**31
    top = quantize_kv(torch.randn(8, bs, 512, generator=rng), bs).cuda()
    cache[-8:] = top  # the keys live past 2 GiB
    idx = ((pages - 8) * bs + torch.randperm(8 * bs, generator=rng)[:256]).to(torch.int32).reshape(1, 2, 128).cuda()
    q = torch.randn(1, 2, 64, 512, generator=rng).bfloat16().cuda()
    out, lse = sparse_decode(q, cache, idx, bs, 0.05)
    ref_out, ref_lse = sparse_decode_ref(q.double(), top, idx - (pages - 8) * bs, bs, 0.05)
    same_out, _ = sparse_decode_ref(q, top, idx - (pages - 8) * bs, bs, 0.05, work=torch.bfloat16)
    assert_within_torch_error(out, ref_out, same_out, "cache over 2 GiB")


@pytest.mark.gpu
def test_gpu_two_streams_do_not_share_scratch(rng):
    """Two split-K calls of one shape on two streams at once: each equals its own eager result."""
    mains = [Scope(rng, 2, 1, 512, 64, 9) for _ in range(2)]
    qs = [torch.randn(2, 1, 64, 512, generator=rng).bfloat16().cuda() for _ in range(2)]
    assert launch_rule(2, 64, 512, "cuda").splits > 1
    want = [sparse_decode(q, m.cache, m.indices, 64, 0.05) for q, m in zip(qs, mains)]
    streams = [torch.cuda.Stream() for _ in range(2)]
    got = [None, None]
    for _ in range(20):
        for i, stream in enumerate(streams):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                got[i] = sparse_decode(qs[i], mains[i].cache, mains[i].indices, 64, 0.05)
        torch.cuda.synchronize()
        for i in range(2):
            assert_bits_equal(got[i][0], want[i][0], f"stream {i}")

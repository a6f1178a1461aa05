"""Benchmark: the indexer FP8 K cache (sgl_hip_kernels.indexer_k_cache) vs torch, both K layouts.

GLM-5 / DeepSeek indexer shapes: head_dim 128, one fp32 scale per token (132 B/token), 64-token
blocks, "ue8m0" scales.
* ``write`` — ``indexer_k_quant_and_cache`` of T new tokens (bf16 k) to random slots, T 1..4096;
* ``gather`` — ``cp_gather_indexer_k_quant_cache`` of 4 sequences totalling T tokens through a
  shuffled block table;
* ``logits`` — ``fp8_paged_mqa_logits``, 64 index heads, next_n 1, batch 1..64 at an 8k context:
  the reader of each layout on this GPU (row-major vs preshuffled).
Arms, in one run: ours (Triton), torch (``indexer_k_cache_ref``: the byte-level writer and gather with
their host planning step done before capture, the batched logits), upstream sglang 0.5.23's Triton
index-K cache kernels (``dsa_index_k_cache``, from the release wheel, ``--upstream``): its gather
(``_get_k_and_s_triton``, row-major only: the same work) and its store (``_set_k_and_s_triton``, both
layouts; it takes K already quantised, so it does less than ours: no quantisation, no bf16 read; its
input is quantised once before capture), and the one-launch floor. Each timing replays a CUDA graph of ``calls`` calls rotating
over as many input sets (L2 flushed before every replay), median [p20, p80], arms interleaved;
bytes term by term (read + written) -> GB/s and % of the measured copy bandwidth.

Run:  python sgl-kernel/benchmark/bench_indexer_k_cache.py [--quick] [--json out.json] [--upstream WHEEL]
On the CPU nothing is timed: the kernels (interpreter) are checked against the references.
"""

from __future__ import annotations

import sys

import torch
import triton

from sgl_hip_kernels.indexer_k_cache import cp_gather_indexer_k_quant_cache, fp8_paged_mqa_logits, indexer_k_quant_and_cache
from sgl_hip_kernels.indexer_k_cache_ref import (gather_plan, gather_ref, mqa_logits_ref, mqa_logits_torch, quantize_ref,
                                                 read_tokens, write_plan, write_planned, write_ref)
from sgl_hip_kernels.testing import timing
from sgl_hip_kernels.testing.upstream import PoolShape, dsa_index_k_cache, release_wheel
from sgl_hip_kernels.testing.report import bench_args, emit

D, BS, HEADS, CTX = 128, 64, 64, 8192
COLUMNS = ["op", "layout", "size", "ours_us", "upstream_us", "torch_us", "floor_us", "upstream/ours", "torch/ours",
           "ours/floor", "bytes", "GBps", "pct_copy_bw", "check"]


def cache_for(tokens: int, calls: int, l2: int):
    blocks = max(4 * l2 // (BS * 132), calls * tokens // BS + 4)
    return torch.zeros(blocks, BS, 132, dtype=torch.uint8, device="cuda")


def measure_write(tokens, preshuffle, repeats, copy_gbps, l2, up):
    calls, gen = 8, torch.Generator(device="cuda").manual_seed(tokens)
    cache = cache_for(tokens, calls, l2)
    slots = torch.randperm(cache.shape[0] * BS, generator=gen, device="cuda")
    sets = [{"k": torch.randn(tokens, D, generator=gen, device="cuda").bfloat16(),
             "slots": slots[i * tokens : (i + 1) * tokens]} for i in range(calls)]
    for st in sets:
        st["plan"] = write_plan(cache, st["slots"], D, D, preshuffle)
        codes, scales = quantize_ref(st["k"], D, "ue8m0")
        st["fp8"], st["scale"], st["loc"] = codes.view(torch.float8_e4m3fn), scales.contiguous(), st["slots"].long()
    ours = lambda s: indexer_k_quant_and_cache(s["k"], cache, s["slots"], D, "ue8m0", preshuffle)  # noqa: E731
    ref = cache.clone()
    ours(sets[0])
    write_ref(sets[0]["k"], ref, sets[0]["slots"], D, "ue8m0", preshuffle)
    check = f"bytes differ: {int((ref != cache).sum())}"
    arms = {"ours": ours, "torch": lambda s: write_planned(s["k"], ref, s["plan"], D, "ue8m0")}
    if up is not None:
        flat = cache.view(cache.shape[0], -1)
        arms["upstream"] = lambda s: up.SetKAndS.triton(PoolShape, flat, s["loc"], s["fp8"], s["scale"])
        theirs = torch.zeros_like(cache)
        up.SetKAndS.triton(PoolShape, theirs.view(cache.shape[0], -1), sets[0]["loc"], sets[0]["fp8"], sets[0]["scale"])
        check += f"; upstream store vs ours: {int((theirs != cache).sum())} bytes differ"
    row = {"op": "write", "layout": "preshuffled" if preshuffle else "row-major", "size": f"{tokens} tokens",
           "check": check}
    row.update(timing.arms_vs_ours(arms, sets, repeats, "k", tokens * (D * 2 + 132 + 8), copy_gbps))
    return row


def measure_gather(tokens, preshuffle, repeats, copy_gbps, l2, up):
    calls, gen = 8, torch.Generator(device="cuda").manual_seed(tokens + 1)
    cache = cache_for(tokens, calls, l2)
    cache.copy_(torch.randint(0, 120, cache.shape, generator=gen, device="cuda", dtype=torch.uint8))  # finite codes
    lens = torch.full((4,), tokens // 4, dtype=torch.int32)  # the last sequence takes the rest
    lens[-1] = tokens - int(lens[:-1].sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)]).cuda()
    width = triton.cdiv(int(lens.max()), BS)
    order = torch.randperm(cache.shape[0], generator=gen, device="cuda").to(torch.int32)
    sets = [{"table": order[i * 4 * width : (i + 1) * 4 * width].reshape(4, width).contiguous(),
             "k": torch.empty(tokens, D, dtype=torch.uint8, device="cuda"),
             "s": torch.empty(tokens, 4, dtype=torch.uint8, device="cuda")} for i in range(calls)]
    for st in sets:
        st["plan"] = gather_plan(cache, st["table"], cu, D, D, preshuffle)
    ours = lambda s: cp_gather_indexer_k_quant_cache(cache, s["k"], s["s"], s["table"], cu, preshuffle)  # noqa: E731
    ours(sets[0])
    want_k, want_s = gather_ref(cache, sets[0]["table"], cu, D, D, preshuffle)
    check = f"bytes differ: {int((want_k != sets[0]['k']).sum() + (want_s != sets[0]['s']).sum())}"
    arms = {"ours": ours, "torch": lambda s: read_tokens(cache, *s["plan"], D, D, preshuffle)}
    if up is not None and not preshuffle:  # upstream's Triton gather reads the row-major layout only
        flat, lens_dev, total, longest = cache.view(cache.shape[0], -1), lens.cuda(), int(lens.sum()), int(lens.max())
        arms["upstream"] = lambda s: up.GetKAndS.triton(PoolShape, flat, s["table"], lens_dev, total, longest)
        got_k, got_s = up.GetKAndS.triton(PoolShape, flat, sets[0]["table"], lens_dev, total, longest)
        check += f"; upstream: {int((got_k != want_k).sum() + (got_s != want_s).sum())} bytes differ"
    row = {"op": "gather", "layout": "preshuffled" if preshuffle else "row-major", "size": f"{tokens} tokens",
           "check": check}
    row.update(timing.arms_vs_ours(arms, sets, repeats, "k", tokens * 132 * 2 + 4 * width * 4 + 20, copy_gbps))
    return row


def measure_logits(batch, preshuffle, repeats, copy_gbps, l2):
    calls, gen = 4, torch.Generator(device="cuda").manual_seed(batch + 2)
    width = CTX // BS
    blocks = max(4 * l2 // (BS * 132), calls * batch * width)
    cache = torch.randint(0, 120, (blocks, BS, 132), generator=gen, device="cuda", dtype=torch.uint8)
    cache.view(blocks, -1)[:, BS * D :] = torch.full((1,), 2.0**-6).view(torch.uint8).repeat(BS).cuda()  # scales
    order = torch.randperm(blocks, generator=gen, device="cuda").to(torch.int32)
    ctx = torch.full((batch,), CTX, dtype=torch.int32, device="cuda")
    sets = [{"q": torch.randint(0, 120, (batch, 1, HEADS, D), generator=gen, device="cuda", dtype=torch.uint8),
             "w": torch.rand(batch, HEADS, generator=gen, device="cuda"),
             "table": order[i * batch * width : (i + 1) * batch * width].reshape(batch, width).contiguous(),
             "out": torch.empty(batch, CTX, device="cuda")} for i in range(calls)]
    ours = lambda s: fp8_paged_mqa_logits(s["q"], cache, s["w"], ctx, s["table"], CTX, preshuffle, BS, out=s["out"])  # noqa: E731
    torch_arm = lambda s: mqa_logits_torch(s["q"].view(torch.float8_e4m3fn), cache, s["w"], ctx, s["table"], CTX,  # noqa: E731
                                           preshuffle, BS)
    s0 = sets[0]
    got, same = ours(s0), torch_arm(s0)
    row = {"op": "logits", "layout": "preshuffled" if preshuffle else "row-major",
           "size": f"batch {batch} x {HEADS} heads, ctx {CTX}",
           "check": f"max|ours - torch fp32| / max|torch| = {((got - same).abs().max() / same.abs().max()).item():.1e}"}
    moved = batch * (CTX * 132 + CTX * 4 + HEADS * (D + 4) + CTX * 4 // BS)
    row.update(timing.arms_vs_ours({"ours": ours, "torch": torch_arm}, sets, repeats, "q", moved, copy_gbps))
    return row


def cpu_check() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for preshuffle in (False, True):
        cache, ref = torch.zeros(4, 16, 132, dtype=torch.uint8), torch.zeros(4, 16, 132, dtype=torch.uint8)
        k, slots = torch.randn(40, D, generator=gen), torch.randperm(64, generator=gen)[:40]
        indexer_k_quant_and_cache(k, cache, slots, D, "ue8m0", preshuffle)
        write_ref(k, ref, slots, D, "ue8m0", preshuffle)
        q = torch.randn(1, 1, 16, D, generator=gen).to(torch.float8_e4m3fn)
        w, ctx = torch.rand(1, 16, generator=gen), torch.tensor([50], dtype=torch.int32)
        table = torch.tensor([[2, 0, 3, 1]], dtype=torch.int32)
        got = fp8_paged_mqa_logits(q, cache, w, ctx, table, 64, preshuffle, 16)
        want = mqa_logits_ref(q, cache, w, ctx, table, 64, preshuffle, 16)
        finite = torch.isfinite(want)
        rows.append({"op": "write + logits", "layout": "preshuffled" if preshuffle else "row-major",
                     "bytes_differ": int((cache != ref).sum()),
                     "logits_err": float(f"{(got.double() - want)[finite].abs().max().item():.2e}")})
    return rows


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--upstream", default=release_wheel("0.5.23"),
                            help="sglang 0.5.23 wheel or unpacked release: its Triton index-K store and gather are the peers")

    args = bench_args(__doc__, argv, repeats=30, extra=extra)
    if not torch.cuda.is_available():
        emit({"benchmark": "indexer FP8 K cache", "device": "cpu (no timing; interpreter check only)",
              "providers": "triton (interpreter) vs torch reference", "columns": ["op", "layout", "bytes_differ", "logits_err"],
              "rows": cpu_check()}, args.json)
        return 0
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copy_gbps = timing.copy_bandwidth(args.repeats)
    rows = []
    for preshuffle in (False, True):
        up = dsa_index_k_cache(args.upstream, preshuffle) if args.upstream else None
        for tokens in ((1, 1024) if args.quick else (1, 16, 64, 256, 1024, 4096)):
            rows.append(measure_write(tokens, preshuffle, args.repeats, copy_gbps, l2, up))
            rows.append(measure_gather(tokens, preshuffle, args.repeats, copy_gbps, l2, up))
        for batch in ((1,) if args.quick else (1, 4, 16, 64)):
            rows.append(measure_logits(batch, preshuffle, args.repeats, copy_gbps, l2))
        print(f"  layout {'preshuffled' if preshuffle else 'row-major'} done", file=sys.stderr, flush=True)
    emit({"benchmark": f"indexer FP8 K cache (head_dim 128, 64-token blocks); copy bandwidth {copy_gbps:.0f} GB/s",
          "device": timing.device_name(),
          "providers": "triton (sgl_hip_kernels.indexer_k_cache) vs triton (sglang 0.5.23 dsa_index_k_cache "
                       f"store/gather{'' if args.upstream else ': not given'}) vs torch (indexer_k_cache_ref)",
          "columns": COLUMNS, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

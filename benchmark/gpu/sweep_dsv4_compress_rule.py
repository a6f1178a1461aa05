"""Sweep: the DeepSeek-V4 compressor kernels' launch rule (``LaunchRule``: programs per block, rows per
tile, warps) as dsv4-fused-compress launches them (SGLang's plan pages, the rows stored into the
compressed cache in the same launch): decode per layer shape and batch, every request closing a block;
or (``--prefill``) one prefill chunk of ``--tokens`` tokens over SGLang's plan (its blocks' launch only).

What it is for: ``compress.launch_rule`` is a fixed rule per shape; this measures whether the best
rule moves with the batch. Timing: ``timing.time_graphs`` (a CUDA graph of ``--calls`` launches per
rule, all rules of one shape interleaved, L2 flushed before each replay), median µs per launch; the
table gives the fixed rule's time, the best rule and its time. GPU only.

Run:  python benchmark/gpu/sweep_dsv4_compress_rule.py [--batches 1,16,64,256] [--layers 'c128 attention'] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from sgl_hip_kernels.dsv4.compress import CacheStore, LaunchRule, compress_decode, compress_prefill_paged, launch_rule
from sgl_hip_kernels.dsv4.kv_cache import page_bytes
from sgl_hip_kernels.testing import timing

SHAPES = {"c4 attention": (4, 512), "c4 indexer": (4, 128), "c128 attention": (128, 512)}


def parameters_and_cache(ratio: int, d: int, positions: int, emitted: int, gen: torch.Generator):
    """A compressor's bias, norm weight and RoPE table (``positions`` rows), and a compressed cache
    (zeros) with a distinct slot for each of ``emitted`` rows -> (bias, norm_w, cos, sin, cache,
    page_size, slots)."""
    bias = torch.randn(8 if ratio == 4 else 128, d, generator=gen).cuda()
    norm_w = (torch.rand(d, generator=gen) + 0.5).cuda()
    angle = torch.rand(positions, 32, generator=gen) * 6.283
    page_size = 256 // ratio
    n_cache = -(-emitted // page_size) + 1
    cache = torch.zeros(n_cache, page_bytes(page_size) if d == 512 else 132 * page_size, dtype=torch.uint8).cuda()
    slots = torch.randperm(n_cache * page_size, generator=gen)[:emitted]
    return bias, norm_w, angle.cos().cuda(), angle.sin().cuda(), cache, page_size, slots


def inputs(ratio: int, d: int, batch: int, gen: torch.Generator):
    """One decode step's launch arguments, every request emitting; pages (previous, current) distinct."""
    width = (4 if ratio == 4 else 2) * d
    n_pages = 2 * batch + 1
    state = torch.randn(n_pages * ratio, width, generator=gen).cuda()
    order = torch.randperm(n_pages, generator=gen)[: 2 * batch].reshape(batch, 2).to(torch.int32).cuda()
    pages = order if ratio == 4 else order[:, 1:].contiguous()
    seq_lens = torch.tensor([ratio * (2 + i % 3) for i in range(batch)], dtype=torch.int32).cuda()
    u = torch.randn(batch, width, generator=gen).cuda()
    bias, norm_w, cos, sin, cache, page_size, loc = parameters_and_cache(ratio, d, 4096, batch, gen)
    store = CacheStore("flashmla" if d == 512 else "indexer", cache, loc.cuda(), page_size)
    args = (u, state, pages, seq_lens, bias, norm_w, 1e-6, cos, sin, ratio)
    return args, dict(rotate=d == 128, store=store, check_indices=False, page_order="prev_cur")


def prefill_inputs(ratio: int, d: int, tokens: int, gen: torch.Generator):
    """One request's first prefill chunk of ``tokens`` rows as SGLang plans it (a block per token that
    closes one; no ring row is read), the blocks stored into the cache; no kept rows (their copy is
    the second launch, not swept)."""
    width, k = (4 if ratio == 4 else 2) * d, (8 if ratio == 4 else 128)
    u = torch.randn(tokens, width, generator=gen).cuda()
    state = torch.zeros(2 * ratio, width).cuda()
    t = torch.arange(ratio - 1, tokens, ratio)
    blocks = torch.stack([t + 1, t | (k - torch.clamp(t + 1, max=k)) << 16, -torch.ones_like(t), torch.zeros_like(t)], 1)
    writes = torch.zeros(0, 2, dtype=torch.int32).cuda()
    bias, norm_w, cos, sin, cache, page_size, slots = parameters_and_cache(ratio, d, tokens + 1, t.numel(), gen)
    loc = torch.zeros(tokens, dtype=torch.int64)
    loc[t] = slots  # a block's slot at its last token's ragged row
    store = CacheStore("flashmla" if d == 512 else "indexer", cache, loc.cuda(), page_size)
    args = (u, state, blocks.to(torch.int32).cuda(), writes, bias, norm_w, 1e-6, cos, sin, ratio)
    return args, dict(rotate=d == 128, store=store, check_indices=False)


def rules(ratio: int, prefill: bool = False):
    tiles = (8,) if ratio == 4 else (32, 128)
    splits, warps = ((1, 2, 4, 8, 16), (1, 4)) if prefill and ratio == 4 else ((4, 8, 16), (4, 8)) if ratio == 128 \
        else ((1, 2, 4, 8, 16), (1, 4, 8))
    return [LaunchRule(s, t, w) for s, t, w in itertools.product(splits, tiles, warps)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--layers", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--prefill", action="store_true", help="the prefill kernel over one chunk, not decode")
    ap.add_argument("--tokens", type=int, default=8192, help="--prefill: the chunk's tokens")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    launch = compress_prefill_paged if args.prefill else compress_decode
    for name in args.layers.split(","):
        ratio, d = SHAPES[name]
        for batch in [args.tokens] if args.prefill else map(int, args.batches.split(",")):
            fixed = launch_rule(ratio, d, prefill=args.prefill, batch=batch)
            a, kw = prefill_inputs(ratio, d, batch, gen) if args.prefill else inputs(ratio, d, batch, gen)
            graphs = {}
            for rule in rules(ratio, args.prefill):
                launch(*a, rule=rule, **kw)  # compiles, and makes the workspace before capture
                graphs[rule] = timing.capture(lambda rule=rule: launch(*a, rule=rule, **kw), args.calls)
            t = {rule: timing.summarise(s).median_us
                 for rule, s in timing.time_graphs(graphs, args.calls, args.repeats).items()}
            best = min(t, key=t.get)
            size = {"tokens" if args.prefill else "batch": batch}
            rows.append(dict(layer=name, **size, fixed=str(fixed), fixed_us=t[fixed], best=str(best),
                             best_us=t[best], all={str(k): v for k, v in t.items()}))
            tag = "t" if args.prefill else "b"
            print(f"{name:15s} {tag}{batch:<4d} fixed {fixed} {t[fixed]:7.2f} us   best {best} {t[best]:7.2f} us", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(device=timing.device_name(), provider="portable Triton", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""Benchmark: dsv4-fused-compress through SGLang's own DSV4 compressor method
(``CompressorBackendMixin._forward_compress_all_in_one`` of the installed release, driven by
``sglang_hip_decode.testing.dsv4_compress``), unpatched (upstream's real JIT kernels: its decode plan,
``compress_forward`` and ``compress_norm_rope_store``, compiled for this GPU at first use: the same JIT
kernels ROCm runs by default, there compiled through HIP) vs patched (this project's ``compress_decode``,
storing into the compressed cache in the same launch), one decode step of one compressor
layer: ratio 4 and 128, attention (d 512) and indexer (d 128), batch 1 ... 256, with every request
closing a block ("all") or the mix a decode step sees ("mixed": lengths spread evenly over a block,
so 1 request in ``ratio`` emits).

Each arm's stored rows are checked against the fp64 contract first (max abs error of the dequantised
rows in the table). Timing: ``testing.ab.ab_runs`` (the decode benchmarks' method: a CUDA graph of
``--calls`` steps per arm, replays interleaved, L2 flushed before each, median [p20, p80] of
``--repeats`` rounds); µs per layer, upstream/ours of the medians, GPU kernels per layer. The per-step
figure is the per-layer time times the model's compressor layers (``--c4-layers`` / ``--c128-layers``:
count them in the checkpoint's ``compress_ratios``; a C4 layer runs the attention and the indexer
compressor). GPU only, and sglang >= 0.5.13.

Run:  python benchmark/gpu/bench_dsv4_fused_compress_patch.py [--batches 1,4,16,64,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from sgl_hip_kernels.testing import timing
from sglang_hip_decode import patching
from sglang_hip_decode.patches.dsv4_fused_compress import PATCH
from sglang_hip_decode.testing.ab import ab_runs, upstream_vs_ours_row
from sglang_hip_decode.testing.dsv4_compress import Dsv4CompressCase, Dsv4CompressStep, import_sglang

ARMS = {"upstream": (), "ours": (PATCH,)}
LAYERS = {"c4 attention": (4, 512), "c4 indexer": (4, 128), "c128 attention": (128, 512)}


def lengths(ratio: int, batch: int, emit: str) -> tuple:
    """Lengths after the step: 'all' close a block (a few blocks in); 'mixed' spread over a block."""
    if emit == "all":
        return tuple(ratio * (2 + i % 3) for i in range(batch))
    return tuple(ratio * 2 + 1 + (i * ratio) // batch % ratio for i in range(batch))


def stored_error(s: Dsv4CompressStep, cache: torch.Tensor) -> float:
    worst = 0.0
    for b in s.emitting:
        worst = max(worst, (s.stored_row(cache, int(s.out_loc[b])).double() - s.reference(b)).abs().max().item())
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--layers", default=",".join(LAYERS), help=f"of {', '.join(LAYERS)}")
    ap.add_argument("--emit", default="all,mixed")
    ap.add_argument("--calls", type=int, default=20, help="steps per CUDA graph")
    ap.add_argument("--repeats", type=int, default=30, help="interleaved replay rounds per arm")
    ap.add_argument("--c4-layers", type=int, help="the model's ratio-4 layers (per-step column)")
    ap.add_argument("--c128-layers", type=int, help="the model's ratio-128 layers (per-step column)")
    ap.add_argument("--json", help="written after every shape")
    args = ap.parse_args()
    sg = import_sglang()
    device = timing.device_name()
    rows = []
    for name in args.layers.split(","):
        ratio, d = LAYERS[name]
        for emit in args.emit.split(","):
            for batch in map(int, args.batches.split(",")):
                case = Dsv4CompressCase(ratio=ratio, head_dim=d, lens=lengths(ratio, batch, emit),
                                        swa_page=128 if ratio == 128 else 64, page_size=256 // ratio)
                s = Dsv4CompressStep(case, sg, seed=batch, device="cuda")
                errs = {}
                for arm, patches in ARMS.items():
                    with patching.applied(*patches):
                        _, cache = s.run("real")
                    errs[arm] = stored_error(s, cache)
                s.prepare("real")
                runs = ab_runs(lambda: s.call("real", record=False), ARMS, args.calls, args.repeats, gpu=True)
                row = upstream_vs_ours_row(runs, errs, layer=name, ratio=ratio, d=d, emit=emit, batch=batch,
                                           emitting=len(s.emitting))
                rows.append(row)
                print(f"{name:15s} {emit:5s} b{batch:<4d} emitting {len(s.emitting):3d}  upstream "
                      f"{row['upstream_us']:8.2f} us ({row['upstream_kernels']} kernels)  ours {row['ours_us']:8.2f} us "
                      f"({row['ours_kernels']})  upstream/ours {row['speedup']:.3f}  stored err ours {errs['ours']:.2e} "
                      f"upstream {errs['upstream']:.2e}", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(dict(device=device,
                                       provider="portable Triton (ours, storing in its launch) vs upstream's JIT kernels",
                                       method="testing.ab.ab_runs: CUDA graphs, interleaved, L2 flushed, median",
                                       rows=rows), f, indent=1)
    if args.c4_layers is not None and args.c128_layers is not None:
        print("\nper decode step (compressor layers only), µs: emit batch upstream ours")
        for emit in args.emit.split(","):
            for batch in map(int, args.batches.split(",")):
                mine = {r["layer"]: r for r in rows if r["emit"] == emit and r["batch"] == batch}
                if set(mine) != set(LAYERS):
                    continue
                per = {arm: args.c4_layers * (mine["c4 attention"][f"{arm}_us"] + mine["c4 indexer"][f"{arm}_us"])
                       + args.c128_layers * mine["c128 attention"][f"{arm}_us"] for arm in ARMS}
                print(f"{emit:5s} {batch:4d} {per['upstream']:10.1f} {per['ours']:10.1f}  ({per['upstream'] / per['ours']:.3f})")


if __name__ == "__main__":
    main()

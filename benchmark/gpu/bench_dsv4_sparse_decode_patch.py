"""Benchmark: dsv4-sparse-decode through SGLang's own DSV4 HIP backend (``DeepseekV4HipRadixBackend.forward``
of the installed release, driven by ``sglang_hip_decode.testing.dsv4_attention``), unpatched (upstream's
Triton kernel, ``SGLANG_HACK_FLASHMLA_BACKEND=triton``) vs patched (this project's ``sparse_decode``), one
layer per ratio (0: SWA only, 4, 128), bf16 q, h_q 64, SWA top-k 128, C4 top-k 512.

Each arm's eager output is checked against the fp64 reference first (max abs error in the table).
Timing: ``testing.ab.ab_runs`` (the decode benchmarks' method: a CUDA graph of ``--calls`` layer
forwards per arm, replays interleaved, L2 flushed before each, median [p20, p80] of ``--repeats``
rounds); µs per layer, upstream/ours of the medians, GPU kernels per layer. GPU only, and sglang >=
0.5.13 (the DSV4 backend): so it lives outside the folders ``make bench`` runs on the CPU with 0.5.11.

Run:  python benchmark/gpu/bench_dsv4_sparse_decode_patch.py [--ratios 0,4,128] [--batches 1,16,64,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from sgl_hip_kernels.testing import timing
from sglang_hip_decode import patching
from sglang_hip_decode.patches.dsv4_sparse_decode import PATCH
from sglang_hip_decode.testing.ab import ab_runs, upstream_vs_ours_row
from sglang_hip_decode.testing.dsv4_attention import Dsv4AttentionCase, Dsv4AttentionPath, import_sglang, make_inputs

ARMS = {"upstream": (), "ours": (PATCH,)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,16,64,128,256")
    ap.add_argument("--ratios", default="0,4,128")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--calls", type=int, default=10, help="layer forwards per CUDA graph")
    ap.add_argument("--repeats", type=int, default=30, help="interleaved replay rounds per arm")
    ap.add_argument("--json", help="written after every shape (upstream's autotune makes a run long)")
    args = ap.parse_args()
    sg = import_sglang()
    rows = []
    device = timing.device_name()
    for ratio in map(int, args.ratios.split(",")):
        for batch in map(int, args.batches.split(",")):
            case = Dsv4AttentionCase(batch=batch, heads=args.heads, ratio=ratio, dtype=torch.bfloat16, swa_topk=128,
                                     extra_topk=512 if ratio == 4 else 64, swa_pages=max(8, batch),
                                     extra_pages=max(16, 4 * batch))
            path = Dsv4AttentionPath(case, make_inputs(case, torch.Generator().manual_seed(batch), "cuda"), sg)
            ref = path.reference()
            with path.kernel("triton"):
                errs = {}
                for arm, patches in ARMS.items():
                    with patching.applied(*patches):
                        errs[arm] = (path.run().double() - ref).abs().max().item()
                runs = ab_runs(path.run, ARMS, args.calls, args.repeats, gpu=True)
            t = {arm: timing.summarise(r.samples) for arm, r in runs.items()}
            row = upstream_vs_ours_row(runs, errs, ratio=ratio, batch=batch)
            rows.append(row)
            print(f"ratio {ratio:3d} batch {batch:3d}: upstream {t['upstream']} us ({runs['upstream'].kernels:g} kernels)  "
                  f"ours {t['ours']} us ({runs['ours'].kernels:g})  upstream/ours {row['speedup']:5.2f}  max err vs fp64: "
                  f"upstream {errs['upstream']:.2e} ours {errs['ours']:.2e}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(device=device, heads=args.heads, calls=args.calls, repeats=args.repeats, rows=rows), f,
                              indent=1)
    print(f"device: {device}; providers: upstream = sglang's Triton DSV4 decode (HIP backend 'triton'), "
          "ours = sgl_hip_kernels.dsv4.sparse_decode (portable Triton)")


if __name__ == "__main__":
    main()

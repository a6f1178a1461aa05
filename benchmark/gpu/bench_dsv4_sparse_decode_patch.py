"""Benchmark: dsv4-sparse-decode through SGLang's own DSV4 HIP backend (``DeepseekV4HipRadixBackend.forward``
of the installed release, driven by ``sglang_hip_decode.testing.dsv4_attention``), unpatched (upstream's
Triton kernel, ``SGLANG_HACK_FLASHMLA_BACKEND=triton``) vs patched (this project's ``sparse_decode``), one
layer per ratio (0: SWA only, 4, 128), batch 1..256, bf16 q, h_q 64, SWA top-k 128, C4 top-k 512.

Each arm's outputs are checked against the fp64 reference first. Timing: ``triton.testing.do_bench_cudagraph``
(a CUDA graph of the layer's forward, median of its replays), arms interleaved per shape; µs per layer and
the ratio. GPU only, and sglang >= 0.5.13 (the DSV4 backend): so it lives outside the folders ``make bench``
runs on the CPU with 0.5.11; the device is named in the output.

Run:  python benchmark/gpu/bench_dsv4_sparse_decode_patch.py [--batches 1,16,64,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from sglang_hip_decode import patching
from sglang_hip_decode.patches.dsv4_sparse_decode import PATCH
from sglang_hip_decode.testing.dsv4_attention import Dsv4AttentionCase, Dsv4AttentionPath, import_sglang, make_inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,16,64,128,256")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    sg = import_sglang()
    rows = []
    for ratio in (0, 4, 128):
        for batch in map(int, args.batches.split(",")):
            case = Dsv4AttentionCase(batch=batch, heads=args.heads, ratio=ratio, dtype=torch.bfloat16, swa_topk=128,
                                     extra_topk=512 if ratio == 4 else 64, swa_pages=max(8, batch),
                                     extra_pages=max(16, 4 * batch))
            path = Dsv4AttentionPath(case, make_inputs(case, torch.Generator().manual_seed(batch), "cuda"), sg)
            ref = path.reference()
            times, errs = {}, {}
            with path.kernel("triton"):
                for arm, patches in (("upstream", ()), ("ours", (PATCH,)), ("upstream", ()), ("ours", (PATCH,))):
                    with patching.applied(*patches):
                        out = path.run()
                        errs[arm] = (out.double() - ref).abs().max().item()
                        t = triton.testing.do_bench_cudagraph(path.run, rep=50)
                    times.setdefault(arm, []).append(t * 1e3)
            up, ours = min(times["upstream"]), min(times["ours"])
            rows.append(dict(ratio=ratio, batch=batch, upstream_us=up, ours_us=ours, speedup=up / ours,
                             err_upstream=errs["upstream"], err_ours=errs["ours"]))
            print(f"ratio {ratio:3d} batch {batch:3d}: upstream {up:8.2f} us  ours {ours:8.2f} us  upstream/ours "
                  f"{up / ours:5.2f}  max err vs fp64: upstream {errs['upstream']:.2e} ours {errs['ours']:.2e}", flush=True)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; providers: upstream = sglang's Triton DSV4 decode (HIP backend 'triton'), "
          "ours = sgl_hip_kernels.dsv4.sparse_decode (portable Triton)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, heads=args.heads, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""Benchmark: dsv4-fused-compress-prefill through SGLang's own DSV4 compressor method
(``CompressorBackendMixin._forward_compress_all_in_one`` of the installed release, driven by
``sglang_hip_decode.testing.dsv4_compress.Dsv4PrefillChunks``), unpatched (upstream's real planner and
JIT kernels: ``compress_forward``'s prefill, which pools the blocks and then copies the kept rows into
the ring, and ``compress_norm_rope_store``: 3 launches) vs patched (this project's
``compress_prefill_paged`` over the same plan, storing into the compressed cache in its launch, then
the kept-row copy: 2 launches). One prefill chunk of one compressor layer after a first chunk (so its
first blocks read the ring that chunk left): ratio 4 and 128, attention (d 512) and indexer (d 128).

Each arm's stored rows are checked against the fp64 contract first (max abs error of the dequantised
rows of up to 8 blocks, in the table). Timing: ``testing.ab.ab_runs`` (CUDA graphs of ``--calls``
chunks per arm, replays interleaved, L2 flushed before each, median [p20, p80] of ``--repeats``
rounds; the plan is made once, outside the timing, as SGLang makes it once per batch for every
layer); µs per layer, upstream/ours of the medians, GPU kernels per layer. GPU only, sglang >= 0.5.13.

Run:  python benchmark/gpu/bench_dsv4_fused_compress_prefill.py [--shapes 1x8192,8x1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from sgl_hip_kernels.testing import timing
from sglang_hip_decode import patching
from sglang_hip_decode.patches.dsv4_fused_compress_prefill import PATCH
from sglang_hip_decode.testing.ab import ab_runs, upstream_vs_ours_row
from sglang_hip_decode.testing.dsv4_compress import Dsv4PrefillCase, Dsv4PrefillChunks, import_sglang

ARMS = {"upstream": (), "ours": (PATCH,)}
LAYERS = {"c4 attention": (4, 512), "c4 indexer": (4, 128), "c128 attention": (128, 512)}
CHECKED_BLOCKS = 8


def stored_error(s: Dsv4PrefillChunks, cache: torch.Tensor) -> tuple[float, int]:
    """The worst dequantised stored row's error against the fp64 contract, over the first blocks of
    the timed chunk -> (error, blocks checked)."""
    blocks = s.chunk_blocks(1)[:CHECKED_BLOCKS]
    worst = max((s.stored_row(cache, s.block_slot[b]).double() - s.block_reference(*b)).abs().max().item() for b in blocks)
    return worst, len(blocks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x8192,8x1024", help="requests x tokens of the timed chunk")
    ap.add_argument("--layers", default=",".join(LAYERS), help=f"of {', '.join(LAYERS)}")
    ap.add_argument("--calls", type=int, default=5, help="chunks per CUDA graph")
    ap.add_argument("--repeats", type=int, default=20, help="interleaved replay rounds per arm")
    ap.add_argument("--json", help="written after every shape")
    args = ap.parse_args()
    sg = import_sglang()
    device = timing.device_name()
    rows = []
    for name in args.layers.split(","):
        ratio, d = LAYERS[name]
        for shape in args.shapes.split(","):
            batch, tokens = map(int, shape.split("x"))
            # A first chunk that leaves a block open (so the timed chunk's first block reads the ring), then the chunk.
            prefix = tuple(ratio * (1 + i % 3) + ratio // 2 + 1 for i in range(batch))
            case = Dsv4PrefillCase(ratio=ratio, head_dim=d, prefix=prefix, extend=(tokens,) * batch,
                                   swa_page=128 if ratio == 128 else 64, page_size=256 // ratio)
            s = Dsv4PrefillChunks(case, sg, seed=batch, device="cuda")
            errs = {}
            for arm, patches in ARMS.items():
                with patching.applied(*patches):
                    (_, _), (_, cache) = s.run("real")
                errs[arm], checked = stored_error(s, cache)
            s.prepare("real")
            s.prepare_chunk(0, "real")
            s.call("real", record=False)  # the first chunk, whose ring the timed one reads
            s.prepare_chunk(1, "real")
            runs = ab_runs(lambda: s.call("real", record=False), ARMS, args.calls, args.repeats, gpu=True)
            row = upstream_vs_ours_row(runs, errs, layer=name, ratio=ratio, d=d, requests=batch, tokens=batch * tokens,
                                       blocks=len(s.chunk_blocks(1)), checked_blocks=checked)
            rows.append(row)
            print(f"{name:15s} {batch:3d} x {tokens:5d} blocks {row['blocks']:5d}  upstream {row['upstream_us']:9.2f} us "
                  f"({row['upstream_kernels']} kernels)  ours {row['ours_us']:9.2f} us ({row['ours_kernels']})  "
                  f"upstream/ours {row['speedup']:.3f}  stored err ours {errs['ours']:.2e} upstream {errs['upstream']:.2e}",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(device=device, provider="portable Triton (ours, storing in its launch) vs upstream's "
                                   "JIT kernels", method="testing.ab.ab_runs: CUDA graphs, interleaved, L2 flushed, median",
                                   rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

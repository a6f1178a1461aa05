"""Benchmark: the fused DeepSeek-V4 KV compressor vs the unfused torch sequence and a one-launch floor.

DeepSeek-V4's three compressors (contract: ``dsv4/compress_ref.py``): attention ratio 4 (overlap, d 512), attention
ratio 128 (d 512), indexer ratio 4 (d 128, Hadamard rotation); raw rows fp32 (``wkv_gate`` is
``linear_bf16_fp32``), state fp32, output fp32.
* decode, batch 1..256, one new token per request, two step patterns: ``all`` — every request closes
  a block this step (the worst case: every program pools K rows) and ``mixed`` — seq_lens drawn
  from 1..8192, so about 1/ratio of the requests emit;
* prefill, one request of 8192 new tokens (prefix 0), with its plan built once (it is shared by every
  compressor layer of the batch, so it is not timed).
Per shape, in one run on the GPU, each a CUDA graph of ``calls`` calls that rotate over ``calls``
independent input sets (so L2 does not hold the previous call's rows; it is also flushed before every
replay), µs per call, median [p20, p80], replays interleaved:
* ``fused`` — sgl_hip_kernels.dsv4_compress (one launch: decode, and prefill without a prefix);
* ``torch`` — the unfused torch sequence (``compress_ref.compress_{decode,prefill}_torch``, the tests'
  own baseline): state write, row gather, bias add, masked softmax, weighted sum, RMSNorm, RoPE (and
  the rotation as a matmul);
* ``floor`` — an empty Triton kernel launched on the same grid (what one launch costs);
bytes moved term by term (``moved_bytes``) -> GB/s and % of the device-to-device copy bandwidth
measured in the same run.

Run:  python sgl-kernel/benchmark/bench_dsv4_compress.py [--quick] [--json out.json]
On the CPU nothing is timed (absolute times come from a GPU only): the kernel (interpreter) is checked
against the torch sequence at a small shape.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from sgl_hip_kernels.testing import timing
from sgl_hip_kernels.testing.report import bench_args, emit
from sgl_hip_kernels.dsv4.compress import compress_decode, compress_prefill
from sgl_hip_kernels.dsv4.compress_ref import compress_decode_torch, compress_prefill_torch
from sgl_hip_kernels.dsv4.plan import plan_prefill, ratio_geometry
from sgl_hip_kernels.rotations_ref import hadamard_ref

CONFIGS = (("attn c4", 4, 512, False), ("attn c128", 128, 512, False), ("indexer c4", 4, 128, True))
DECODE = (1, 4, 16, 64, 128, 256)
PREFILL = 8192
EPS = 1e-6


@dataclasses.dataclass
class Compressor:
    name: str
    ratio: int
    d: int
    rotate: bool

    def __post_init__(self):
        self.k, self.n_pages, width_units = ratio_geometry(self.ratio)
        self.width = width_units * self.d
        gen = torch.Generator().manual_seed(self.ratio * 1000 + self.d)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.bias = torch.randn(self.k, self.d, generator=gen).to(dev)
        self.norm_w = (torch.rand(self.d, generator=gen) + 0.5).to(dev)
        angle = torch.rand(16384, 32, generator=gen) * 6.283
        self.cos, self.sin = angle.cos().to(dev), angle.sin().to(dev)
        self.hadamard = hadamard_ref(torch.eye(self.d)).to(dev)  # the rotation as a matrix, for the torch arm

    def params(self):
        return self.bias, self.norm_w, EPS, self.cos, self.sin


def decode_set(c: Compressor, batch: int, all_emit: bool, gen):
    """One independent decode step on ``gen``'s device: raw rows, a random state, shuffled rings, seq_lens."""
    dev = gen.device
    pages = torch.randperm(batch * c.n_pages, generator=gen, device=dev).to(torch.int32).reshape(batch, c.n_pages)
    seq_lens = (torch.randint(1, 64, (batch,), generator=gen, device=dev) * c.ratio if all_emit
                else torch.randint(1, 8193, (batch,), generator=gen, device=dev)).to(torch.int32)
    return {
        "u": torch.randn(batch, c.width, generator=gen, device=dev),
        "state": torch.randn(batch * c.n_pages * c.ratio, c.width, generator=gen, device=dev),
        "pages": pages, "seq_lens": seq_lens, "out": torch.empty(batch, c.d, device=dev),
    }


def torch_decode(c: Compressor, s):
    """The test's own baseline (``compress_ref.compress_decode_torch``, checked there against the
    per-block reference), the rotation applied as a matmul."""
    return compress_decode_torch(s["u"], s["state"], s["pages"], s["seq_lens"], *c.params(), c.ratio,
                                 rotation=c.hadamard if c.rotate else None)


def torch_prefill(c: Compressor, u):
    return compress_prefill_torch(u, c.ratio, *c.params(), rotation=c.hadamard if c.rotate else None)


def decode_bytes(c: Compressor, s) -> int:
    """Bytes the fused decode moves: per request the new row read and stored, seq_len and ring
    read, output written; per emitting request its K - 1 older rows (the 2d columns it uses) and the
    RoPE row; once the bias and norm weight."""
    b = s["u"].shape[0]
    emitting = int(((s["seq_lens"] % c.ratio) == 0).sum())
    return (b * c.width * 4 * 2 + b * (1 + c.n_pages) * 4 + b * c.d * 4
            + emitting * ((c.k - 1) * 2 * c.d * 4 + 64 * 4) + (c.k * c.d + c.d) * 4)


def prefill_bytes(c: Compressor, tokens: int, plan) -> int:
    """Every raw row read once (ratio 4: a token's A half by the next block, its B half by its own),
    one output row per block, the kept rows stored, the plan, bias, weight and RoPE rows."""
    nb = tokens // c.ratio
    return (tokens * c.width * 4 + nb * c.d * 4 + plan.writes.shape[0] * (c.width * 4 + 12) + nb * (16 + 64 * 4)
            + (c.k * c.d + c.d) * 4)


def over_sets(sets, fn):
    """One call of ``fn`` per input set: what a graph captures, so its calls rotate over the sets."""
    def body():
        for s in sets:
            fn(s)
    return body


def timed(graphs, calls, repeats):
    return {name: timing.summarise(v) for name, v in timing.time_graphs(graphs, calls, repeats).items()}


def measure_decode(c: Compressor, batch: int, all_emit: bool, repeats: int, copy_gbps: float) -> dict:
    calls = 16
    gen = torch.Generator(device="cuda").manual_seed(batch * 7 + all_emit)
    sets = [decode_set(c, batch, all_emit, gen) for _ in range(calls)]
    s0 = sets[0]
    check = {k: v.clone() for k, v in s0.items()}
    fused = compress_decode(s0["u"], s0["state"], s0["pages"], s0["seq_lens"], *c.params(), c.ratio, c.rotate, out=s0["out"])
    diff = (fused - torch_decode(c, check)).abs().max().item()
    state_diff = (s0["state"] - check["state"]).abs().max().item()

    fused_one = lambda s: compress_decode(s["u"], s["state"], s["pages"], s["seq_lens"], *c.params(), c.ratio, c.rotate,  # noqa: E731
                                          out=s["out"])
    graphs = {
        "fused": timing.capture(over_sets(sets, fused_one), 1),
        "torch": timing.capture(over_sets(sets, lambda s: torch_decode(c, s)), 1),
        "floor": timing.capture(over_sets(sets, lambda s: timing.empty_launch(s["out"], batch)), 1),
    }
    t = timed(graphs, calls, repeats)
    moved = sum(decode_bytes(c, s) for s in sets) // calls
    gbps = moved / (t["fused"].median_us * 1e-6) / 1e9
    return {
        "compressor": c.name, "phase": "decode " + ("all" if all_emit else "mixed"), "batch_or_tokens": batch,
        "emitting": round(sum(int(((s["seq_lens"] % c.ratio) == 0).sum()) for s in sets) / calls, 2),  # per call, mean
        "fused_us": str(t["fused"]), "torch_us": str(t["torch"]), "floor_us": str(t["floor"]),
        "fused/floor": round(t["fused"].median_us / t["floor"].median_us, 2),
        "torch/fused": round(t["torch"].median_us / t["fused"].median_us, 2),
        "bytes": moved, "GBps": round(gbps, 1), "pct_copy_bw": round(100 * gbps / copy_gbps, 1),
        "kernels_fused": timing.count_gpu_kernels(lambda: fused_one(s0)),
        "kernels_torch": timing.count_gpu_kernels(lambda: torch_decode(c, s0)),
        "max_abs_diff_vs_torch": max(diff, state_diff),
    }


def measure_prefill(c: Compressor, tokens: int, repeats: int, copy_gbps: float) -> dict:
    calls = 8
    gen = torch.Generator(device="cuda").manual_seed(tokens + c.ratio)
    plan = plan_prefill([0], [tokens], c.ratio, device="cuda")
    sets = [{"u": torch.randn(tokens, c.width, generator=gen, device="cuda"),
             "state": torch.zeros(c.n_pages * c.ratio, c.width, device="cuda"),
             "pages": torch.arange(c.n_pages, dtype=torch.int32, device="cuda")[None],
             "out": torch.empty(plan.blocks.shape[0], c.d, device="cuda")} for _ in range(calls)]
    fused_one = lambda s: compress_prefill(s["u"], s["state"], s["pages"], plan, *c.params(), c.rotate, out=s["out"])  # noqa: E731
    s0 = sets[0]
    diff = (fused_one(s0) - torch_prefill(c, s0["u"])).abs().max().item()

    graphs = {"fused": timing.capture(over_sets(sets, fused_one), 1),
              "torch": timing.capture(over_sets(sets, lambda s: torch_prefill(c, s["u"])), 1)}
    t = timed(graphs, calls, repeats)
    moved = prefill_bytes(c, tokens, plan)
    gbps = moved / (t["fused"].median_us * 1e-6) / 1e9
    return {
        "compressor": c.name, "phase": "prefill", "batch_or_tokens": tokens, "emitting": plan.n_blocks,
        "fused_us": str(t["fused"]), "torch_us": str(t["torch"]), "floor_us": "", "fused/floor": "",
        "torch/fused": round(t["torch"].median_us / t["fused"].median_us, 2),
        "bytes": moved, "GBps": round(gbps, 1), "pct_copy_bw": round(100 * gbps / copy_gbps, 1),
        "kernels_fused": timing.count_gpu_kernels(lambda: fused_one(s0)),
        "kernels_torch": timing.count_gpu_kernels(lambda: torch_prefill(c, s0["u"])), "max_abs_diff_vs_torch": diff,
    }


COLUMNS = ["compressor", "phase", "batch_or_tokens", "emitting", "fused_us", "torch_us", "floor_us", "fused/floor",
           "torch/fused", "bytes", "GBps", "pct_copy_bw", "kernels_fused", "kernels_torch", "max_abs_diff_vs_torch"]


def main(argv=None) -> int:
    args = bench_args(__doc__, argv)
    if not torch.cuda.is_available():
        # No timing on the CPU; check the kernel (interpreter) against the torch sequence instead.
        rows = []
        for name, ratio, d, rotate in (("indexer c4", 4, 128, True), ("attn c128", 128, 128, False)):
            c = Compressor(name + " (d 128)", ratio, d, rotate)
            s = decode_set(c, 4, True, torch.Generator().manual_seed(0))
            check = {k: v.clone() for k, v in s.items()}
            got = compress_decode(s["u"], s["state"], s["pages"], s["seq_lens"], *c.params(), ratio, rotate)
            rows.append({"compressor": c.name, "phase": "decode all", "batch_or_tokens": 4, "emitting": 4,
                         "max_abs_diff_vs_torch": (got - torch_decode(c, check)).abs().max().item()})
        emit({"benchmark": "dsv4 fused KV compressor", "device": "cpu (no timing; interpreter check only)",
              "providers": "triton (interpreter) vs torch ops", "columns": ["compressor", "phase", "batch_or_tokens", "emitting",
                                                                           "max_abs_diff_vs_torch"], "rows": rows}, args.json)
        return 0
    copy_gbps = timing.copy_bandwidth(args.repeats)
    rows = []
    for cfg in CONFIGS:
        c = Compressor(*cfg)
        for batch in ((1, 64) if args.quick else DECODE):
            for all_emit in (True, False):
                rows.append(measure_decode(c, batch, all_emit, args.repeats, copy_gbps))
        rows.append(measure_prefill(c, 1024 if args.quick else PREFILL, args.repeats, copy_gbps))
    emit({
        "benchmark": f"dsv4 fused KV compressor (fp32 rows and state); copy bandwidth {copy_gbps:.0f} GB/s",
        "device": timing.device_name(), "providers": "triton (sgl_hip_kernels.dsv4_compress) vs torch ops",
        "columns": COLUMNS, "rows": rows,
    }, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark for hip-alt-stream: the DeepSeek-V2-family MoE on one stream vs two, with real streams.

What runs is upstream's own ``DeepseekV2MoE.forward_normal`` (one stream) and
``forward_normal_dual_stream`` (shared experts on the current stream, gate / top-k / routed experts on
the alt stream, joined before the add), with hip-alt-stream applied (so both give the same output,
checked bit for bit per row), HIP flags forced (``sglang_hip_decode.testing.moe_streams``), captured
in a CUDA graph (upstream takes the dual path only in graph capture) and timed with arms interleaved.

Stand-in kernels, sized by the bytes the real ones read at GLM-5 shapes under TP8 (hidden 6144, 256
routed experts, top-8, expert intermediate 2048 / 8 = 256 per GPU, one shared expert; FP8 weights,
3 x 6144 x 256 B = 4.72 MB per expert per GPU): the gate is a bf16 6144 x 256 GEMM; the top-k a
softmax + top-8 (weights carrying the routed scaling factor, as aiter's); the routed experts two bf16
GEMMs whose weights hold as many bytes as the FP8 weights of the experts a batch activates
(256 (1 - (1 - 8/256)^B) of them on average: decode MoE is memory-bound, so bytes stand for time);
the shared expert the same for one expert. Each row says the µs the stand-ins take alone (the routed
branch: gate + top-k + experts; the shared branch), single vs dual per MoE layer, the ideal dual time
(the longer branch), and the overlap achieved: (single - dual) / (single - ideal).

What an H200 can and cannot say about MI355X: it shows how much of the shorter branch two streams
can hide on one GPU when nothing else runs; it has no TP AllReduce in the layer (the MI355X
regression measured upstream, +15% TPOT for GLM-5, came with AllReduce going from 9.5 to 23 µs under
dual-stream capture), no HIP hardware-queue mapping (``GPU_MAX_HW_QUEUES``), and CUDA's work
scheduler, not ROCm's CU partitioning between queues.

Run:  python benchmark/decode/bench_streams.py [--quick] [--json out.json]
On the CPU (CI's smoke run) the stream order is recorded at tiny shapes and nothing is timed.
"""

from __future__ import annotations

import sys

import torch

from sgl_hip_kernels.testing import timing
from sgl_hip_kernels.testing.report import bench_args, emit
from sglang_hip_decode import patching
from sglang_hip_decode.patches.hip_alt_stream import PATCH
from sglang_hip_decode.testing.moe_streams import MoEPath, bare_moe, hip_flags, import_dv2

HIDDEN, EXPERTS, TOPK, EXPERT_BYTES = 6144, 256, 8, 3 * 6144 * 256  # GLM-5 MoE under TP8, FP8 weights
FACTOR = 2.5
BATCHES = (1, 4, 16, 64, 256)
LAYERS = 4  # distinct layers per graph call, so one layer's weights are not in L2 for the next


def active_experts(batch: int) -> float:
    return EXPERTS * (1 - (1 - TOPK / EXPERTS) ** batch)


def _width(nbytes: float) -> int:
    """The inner width of an up + down bf16 GEMM pair over HIDDEN that reads ``nbytes`` of weights."""
    return max(64, int(round(nbytes / (2 * HIDDEN * 2) / 64)) * 64)


class _Mlp(torch.nn.Module):
    def __init__(self, width: int, gen: torch.Generator):
        super().__init__()
        self.up = (torch.randn(HIDDEN, width, generator=gen) * HIDDEN**-0.5).to(torch.bfloat16).cuda()
        self.down = (torch.randn(width, HIDDEN, generator=gen) * width**-0.5).to(torch.bfloat16).cuda()

    def forward(self, x):
        return (x @ self.up) @ self.down


class _Gate(torch.nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.weight = (torch.randn(EXPERTS, HIDDEN, generator=gen) * HIDDEN**-0.5).to(torch.bfloat16).cuda()

    def forward(self, x, gemm_output_zero_allocator=None):
        return x @ self.weight.t()


class _TopK:
    def __call__(self, hidden_states, router_logits, expert_location_dispatch_info=None, **kwargs):
        weights, ids = torch.topk(router_logits.float().softmax(-1), TOPK, dim=-1)
        return weights * FACTOR, ids


class _Routed(torch.nn.Module):
    """Reads the active experts' bytes (two GEMMs) and weighs by the top-k weights' sum."""

    def __init__(self, width, gen):
        super().__init__()
        self.mlp = _Mlp(width, gen)
        self.quant_method = object()
        self.moe_runner_config = type("cfg", (), {"inplace": True})()

    def forward(self, x, topk_output):
        weights, _ = topk_output
        return self.mlp(x) * weights.sum(-1, keepdim=True).to(x.dtype)


def gpu_row(dv2, batch: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    routed_width, shared_width = _width(active_experts(batch) * EXPERT_BYTES), _width(EXPERT_BYTES)
    alt = torch.cuda.Stream()
    layers = []
    for _ in range(LAYERS):
        shared = _Mlp(shared_width, gen)
        layers.append(bare_moe(dv2, _Gate(gen), _TopK(), _Routed(routed_width, gen),
                               lambda h, z=None, m=shared: m(h), FACTOR, alt))
    x = torch.randn(batch, HIDDEN, generator=gen).to(torch.bfloat16).cuda()

    def run(method):
        return lambda: [getattr(moe, method)(x) for moe in layers]

    def branch(kind):
        def fn():
            for moe in layers:
                if kind == "shared":
                    moe._forward_shared_experts(x)
                else:
                    moe.experts(x, moe.topk(x, moe.gate(x)))
        return fn

    with patching.applied(PATCH), hip_flags(dv2):
        single, dual = run("forward_normal")()[-1], run("forward_normal_dual_stream")()[-1]
        torch.cuda.synchronize()
        equal = torch.equal(single, dual)
        graphs = {name: timing.capture(fn, 1) for name, fn in (
            ("single", run("forward_normal")), ("dual", run("forward_normal_dual_stream")),
            ("routed", branch("routed")), ("shared", branch("shared")))}
    samples = timing.time_graphs(graphs, LAYERS, repeats)  # µs per MoE layer
    t = {name: timing.summarise(s) for name, s in samples.items()}
    ideal = max(t["routed"].median_us, t["shared"].median_us)
    single_us, dual_us = t["single"].median_us, t["dual"].median_us
    return {
        "batch": batch, "active_experts": round(active_experts(batch), 1),
        "routed_MB": round(2 * HIDDEN * routed_width * 2 / 1e6, 1), "shared_MB": round(2 * HIDDEN * shared_width * 2 / 1e6, 1),
        "us_routed_branch": str(t["routed"]), "us_shared_branch": str(t["shared"]),
        "us_single": str(t["single"]), "us_dual": str(t["dual"]),
        "dual_vs_single_us": str(timing.paired_saving(samples["single"], samples["dual"])),
        "us_ideal_dual": round(ideal, 2),
        "overlap": f"{(single_us - dual_us) / (single_us - ideal) * 100:.0f}%" if single_us > ideal else "n/a",
        "outputs_equal": equal,
    }


def cpu_row(dv2, tokens: int) -> dict:
    """The stream order of the dual path (recording streams), at a tiny shape; no timing."""
    path = MoEPath(torch.Generator().manual_seed(tokens), tokens=tokens, dv2=dv2)
    with patching.applied(PATCH), path.hip():
        single = path.single()
        path.streams.log.clear()
        dual = path.dual()
    order = " ".join(f"{e[0]}@{e[1]}" if e[0] != "wait" else f"{e[1]}.wait({e[2]})" for e in path.streams.log)
    return {"batch": tokens, "outputs_equal": torch.equal(single, dual), "dual_stream_order": order}


def main(argv=None) -> int:
    args = bench_args(__doc__, argv)
    dv2 = import_dv2()
    gpu = torch.cuda.is_available()
    if gpu:
        rows = []
        for batch in (1, 4) if args.quick else BATCHES:
            rows.append(gpu_row(dv2, batch, args.repeats))
            print(rows[-1], file=sys.stderr, flush=True)
        columns = ["batch", "active_experts", "routed_MB", "shared_MB", "us_routed_branch", "us_shared_branch",
                   "us_single", "us_dual", "dual_vs_single_us", "us_ideal_dual", "overlap", "outputs_equal"]
    else:
        rows = [cpu_row(dv2, t) for t in (1, 4)]
        columns = ["batch", "outputs_equal", "dual_stream_order"]
    emit({
        "benchmark": "hip-alt-stream: DeepseekV2MoE one stream vs two (GLM-5 TP8 MoE sizes; µs per MoE layer, "
                     "CUDA graphs, arms interleaved, median [p20, p80])",
        "device": timing.device_name() + ("" if gpu else " (stream order only; times come from a GPU)"),
        "providers": "torch stand-ins sized by the FP8 weight bytes read (gate, top-k, routed and shared experts)",
        "columns": columns, "rows": rows,
    }, args.json)
    if not all(r["outputs_equal"] for r in rows):
        print("dual-stream output differs from the single-stream output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

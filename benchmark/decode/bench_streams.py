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

A second table (``"prepare"`` in the JSON) times the MLA decode prepare fork per layer, the real
``forward_absorb_prepare`` -> ``forward_absorb_core`` (``testing.mla_decode``; GLM-5 NSA, top-k 2048
of an 8192-token context, the gfx95 TileLang fused path forced, the portable Triton fused
RoPE+cat+cache and sparse decode kernels): no alt stream (serial), upstream's fork (q_b_proj on the
alt stream, the indexer on the current one) and hip-dual-stream-av4 (the reverse, joined after the
fused kernel), 8 and 64 heads. The indexer stand-in does GLM-5's indexer work per token (64 index heads
x 128 dims against the whole context, ReLU-weighted, top-2048); "indexer hidden" is the time saved
against serial as a share of the indexer alone (100%: all of it overlapped).

Run:  python benchmark/decode/bench_streams.py [--quick] [--json out.json]
On the CPU (CI's smoke run) the stream order is recorded at tiny shapes and nothing is timed.
"""

from __future__ import annotations

import sys

import torch

from sgl_hip_kernels.testing import timing
from sgl_hip_kernels.testing.report import bench_args, emit, render
from sglang_hip_decode import patching
from sglang_hip_decode.patches.hip_alt_stream import PATCH
from sglang_hip_decode.patches.hip_dual_stream_av4 import PATCH as AV4
from sglang_hip_decode.testing.mla_decode import MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs
from sglang_hip_decode.testing.moe_streams import Gate, MoEPath, StreamLog, TopK, bare_moe, hip_flags, import_dv2

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


class _Routed(torch.nn.Module):
    """Reads the active experts' bytes (two GEMMs) and weighs by the top-k weights' sum."""

    def __init__(self, width, gen):
        super().__init__()
        self.mlp = _Mlp(width, gen)
        self.quant_method = object()
        self.moe_runner_config = type("cfg", (), {"inplace": True})()

    def forward(self, x, topk_output):
        return self.mlp(x) * topk_output.topk_weights.sum(-1, keepdim=True).to(x.dtype)


def gpu_row(dv2, batch: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    routed_width, shared_width = _width(active_experts(batch) * EXPERT_BYTES), _width(EXPERT_BYTES)
    alt = torch.cuda.Stream()
    layers = []
    for _ in range(LAYERS):
        shared = _Mlp(shared_width, gen)
        gate = Gate((torch.randn(EXPERTS, HIDDEN, generator=gen) * HIDDEN**-0.5).to(torch.bfloat16).cuda())
        layers.append(bare_moe(dv2, gate, TopK(TOPK, FACTOR), _Routed(routed_width, gen),
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


class _IndexerWork:
    """A GPU stand-in for the NSA indexer sized like GLM-5's: per token, 64 index heads x 128 dims
    against the request's whole context of 128-dim index keys (bf16 here; the real cache is FP8 + a
    scale, 132 B/token), ReLU-weighted over heads, then the top-k slots of that request."""

    def __init__(self, x, case, gen):
        b, ctx = case.batch, case.context
        self.q = torch.randn(b, 64, 128, generator=gen).to(torch.bfloat16).cuda()
        self.w = torch.rand(b, 64, generator=gen).cuda()
        self.keys = torch.randn(b, ctx, 128, generator=gen).to(torch.bfloat16).cuda()
        self.base = (torch.arange(b) * ctx).to(torch.int32).cuda()[:, None]
        self.topk = case.topk

    def __call__(self, x, q_lora, positions, forward_batch, layer_id):
        logits = torch.einsum("bhd,bcd->bhc", self.q, self.keys).float().relu()
        scores = (logits * self.w[:, :, None]).sum(1)
        return scores[:, :-1].topk(self.topk, dim=-1).indices.to(torch.int32) + self.base


PREPARE_ARMS = {"serial": (False, ()), "fork": (True, ()), "av4": (True, (AV4,))}


def prepare_gpu_row(sg, heads: int, batch: int, repeats: int) -> dict:
    """Per layer (prepare -> core of 4 distinct layers per replay): no stream, upstream's fork, A_v4."""
    gen = torch.Generator().manual_seed(batch * 100 + heads)
    case = MlaDecodeCase(batch=batch, heads=heads, topk=2048, context=8192, layers=LAYERS, hidden=256, device="cuda")
    path = MlaDecodePath(case, gen, sg)
    x = make_inputs(case, gen)
    hidden, latent = path.prepare_inputs(x, gen)
    path._add_prepare_parts(gen)
    indexer = _IndexerWork(x, case, gen)
    for layer in path.layers:
        layer.indexer = indexer
    alt = torch.cuda.Stream()
    outs, graphs = {}, {}
    with path.hip():
        for arm, (with_stream, patches) in PREPARE_ARMS.items():
            xi = x.clone()  # each arm writes its own KV caches
            with patching.applied(*patches):
                step = lambda s=with_stream, xi=xi: path.prepare_step(xi, hidden, latent, alt if s else None, None)  # noqa: E731
                outs[arm] = [o.clone() for o in step()] + xi.kv_caches
                graphs[arm] = timing.capture(step, 1)
        graphs["indexer alone"] = timing.capture(lambda: [indexer(None, None, None, None, i) for i in range(LAYERS)], 1)
    torch.cuda.synchronize()
    assert all(len(o) == 2 * LAYERS for o in outs.values())
    equal = all(torch.equal(a, b) for arm in ("fork", "av4") for a, b in zip(outs["serial"], outs[arm]))
    samples = timing.time_graphs(graphs, LAYERS, repeats)
    t = {name: timing.summarise(s) for name, s in samples.items()}
    hidden_share = lambda arm: (t["serial"].median_us - t[arm].median_us) / t["indexer alone"].median_us * 100  # noqa: E731
    return {
        "heads": heads, "batch": batch, "us_indexer_alone": str(t["indexer alone"]),
        "us_serial": str(t["serial"]), "us_fork_0.5.11": str(t["fork"]), "us_av4": str(t["av4"]),
        "fork_saved_us": str(timing.paired_saving(samples["serial"], samples["fork"])),
        "av4_saved_us": str(timing.paired_saving(samples["serial"], samples["av4"])),
        "indexer_hidden_fork": f"{hidden_share('fork'):.0f}%", "indexer_hidden_av4": f"{hidden_share('av4'):.0f}%",
        "outputs_equal": equal,  # attention outputs and KV caches, per layer
    }


def prepare_cpu_row(sg, arm: str) -> dict:
    case = MlaDecodeCase(batch=3, heads=4, topk=32, context=64, hidden=64, layers=1)
    gen = torch.Generator().manual_seed(0)
    path = MlaDecodePath(case, gen, sg)
    x = make_inputs(case, gen)
    hidden, latent = path.prepare_inputs(x, gen)
    with_stream, patches = PREPARE_ARMS[arm]
    log = StreamLog()
    with path.hip(), patching.applied(*patches), log.installed():
        path.prepare_step(x, hidden, latent, log.Stream("alt") if with_stream else None, log)
    order = " ".join(f"{e[0]}@{e[1]}" if e[0] != "wait" else f"{e[1]}.wait({e[2]})" for e in log.log)
    return {"arm": arm, "prepare_stream_order": order}  # outputs: test_hip_dual_stream_av4


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
    sg = import_sglang()
    if gpu:
        prepare_rows = []
        for heads, batch in ([(8, 1), (8, 4)] if args.quick else [(h, b) for h in (8, 64) for b in BATCHES]):
            prepare_rows.append(prepare_gpu_row(sg, heads, batch, args.repeats))
            print(prepare_rows[-1], file=sys.stderr, flush=True)
        prepare_columns = ["heads", "batch", "us_indexer_alone", "us_serial", "us_fork_0.5.11", "us_av4",
                           "fork_saved_us", "av4_saved_us", "indexer_hidden_fork", "indexer_hidden_av4", "outputs_equal"]
    else:
        prepare_rows = [prepare_cpu_row(sg, arm) for arm in PREPARE_ARMS]
        prepare_columns = ["arm", "prepare_stream_order"]
    result = {
        "benchmark": "hip-alt-stream: DeepseekV2MoE one stream vs two (GLM-5 TP8 MoE sizes; µs per MoE layer, "
                     "CUDA graphs, arms interleaved, median [p20, p80])",
        "device": timing.device_name() + ("" if gpu else " (stream order only; times come from a GPU)"),
        "providers": "torch stand-ins sized by the FP8 weight bytes read (gate, top-k, routed and shared experts)",
        "columns": columns, "rows": rows,
        "prepare": {
            "benchmark": "forward_absorb_prepare -> core per layer, decode: no stream vs upstream's fork vs A_v4 "
                         "(GLM-5 NSA: top-k 2048 of 8192 context, TileLang fused path; µs per layer)",
            "device": timing.device_name() + ("" if gpu else " (stream order only)"),
            "providers": "fused RoPE+cat+cache and sparse decode: " + ("triton" if gpu else "torch")
                         + "; indexer, q_b_proj, norms: torch stand-ins",
            "columns": prepare_columns, "rows": prepare_rows,
        },
    }
    emit(result, args.json)
    if not args.json:
        print("\n" + render(result["prepare"]))
    if not all(r["outputs_equal"] for r in rows + prepare_rows if "outputs_equal" in r):
        print("dual-stream output differs from the single-stream output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

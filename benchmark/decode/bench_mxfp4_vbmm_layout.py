"""Decode benchmark for mxfp4-vbmm-layout: the same path as test/test_mxfp4_vbmm_layout.py.

The real sglang 0.5.11 ``forward_absorb_core`` on Kimi-K2's path (aiter MLA backend, non-core
branch; ``sglang_hip_decode.testing.mla_decode``) with MXFP4 ``w_vc``, unpatched vs patched, per o_proj dtype (bf16,
FP8, MXFP4), Kimi-K2 per-rank shapes at TP8 (8 heads, v_head_dim 128, kv_lora_rank 512, 61 layers),
batch 1..256. Per layer: µs median [p20, p80] (CUDA graphs, arms interleaved), the saving (paired
per-round differences), GPU kernels, copy ops and bytes; a standalone ``transpose(0, 1).flatten(1, 2)``
of the (H, B, V) output (the copy the bf16 branch makes) timed in the same run; per step: the saving
times 61 layers. Providers: the portable Triton kernels on a GPU (the real aiter GEMM is gfx950-only).

Run:  python benchmark/decode/bench_mxfp4_vbmm_layout.py [--quick] [--json out.json] [--config config.json]
On the CPU only the copy audit is reported (absolute times come from a GPU only).
"""

from __future__ import annotations

import sys

import torch

from sglang_hip_decode.testing import providers
from sgl_hip_kernels.testing import timing
from sglang_hip_decode.testing.ab import ab_runs
from sglang_hip_decode.testing.mla_decode import KIMI_K2, MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs, model_shapes
from sgl_hip_kernels.testing.report import bench_args, emit
from sglang_hip_decode.patches.mxfp4_vbmm_layout import PATCH

BATCHES = (1, 4, 16, 64, 128, 256)
COLUMNS = ["o_proj", "batch", "unpatched_us", "patched_us", "saved_us", "flatten_copy_us", "patched/unpatched",
           "kernels_unpatched", "kernels_patched", "copies_unpatched", "copies_patched", "step_saved_us"]


def measure(case: MlaDecodeCase, sg, calls: int, repeats: int, gpu: bool, layers_in_model: int) -> dict:
    gen = torch.Generator().manual_seed(case.batch * 7 + len(case.o_proj))
    path = MlaDecodePath(case, gen, sg)
    x = make_inputs(case, gen)
    fb = path.forward_batch(x)
    with path.hip():
        runs = ab_runs(lambda: path.step(x, fb), {"unpatched": (), "patched": (PATCH,)}, calls, repeats, gpu)
    row = {"o_proj": case.o_proj, "batch": case.batch}
    for arm, r in runs.items():
        row[f"copies_{arm}"] = f"{r.audit.total_count / case.layers:g} ({r.audit.total_bytes // case.layers} B)"
    if not gpu:
        return row
    out = torch.randn(case.heads, case.batch, case.v_head_dim, device="cuda").to(torch.bfloat16)
    copy_graph = timing.capture(lambda: out.transpose(0, 1).flatten(1, 2), calls)
    samples = {arm: [v / case.layers for v in r.samples] for arm, r in runs.items()}
    samples.update(timing.time_graphs({"copy": copy_graph}, calls, repeats))
    t = {k: timing.summarise(v) for k, v in samples.items()}
    saving = timing.paired_saving(samples["unpatched"], samples["patched"])
    row.update(
        unpatched_us=str(t["unpatched"]), patched_us=str(t["patched"]), saved_us=str(saving),
        flatten_copy_us=str(t["copy"]) if case.batch > 1 else "none (B=1: a view)",
        **{"patched/unpatched": round(t["patched"].median_us / t["unpatched"].median_us, 4)},
        kernels_unpatched=runs["unpatched"].kernels / case.layers, kernels_patched=runs["patched"].kernels / case.layers,
        step_saved_us=round(saving.median_us * layers_in_model, 1),
    )
    return row


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--config", help="the model's config.json (default: Kimi-K2's published shapes)")
        parser.add_argument("--tp", type=int, default=8, help="tensor parallel size for the per-rank head count")
        parser.add_argument("--batches", help="comma-separated batch sizes")

    args = bench_args(__doc__, argv, extra=extra)
    gpu = torch.cuda.is_available()
    shapes = model_shapes(KIMI_K2, args.config)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 4] if args.quick else list(BATCHES))
    sg = import_sglang()
    rows = []
    for o_proj in ("bf16", "fp8", "mxfp4"):
        for batch in batches:
            case = MlaDecodeCase(
                batch=batch, heads=shapes["heads"] // args.tp, attention="aiter", w_vc="mxfp4", o_proj=o_proj,
                topk=2048 if gpu else 32, context=8192 if gpu else 64, kv_lora_rank=shapes["kv_lora_rank"],
                rope_dim=shapes["rope_dim"], v_head_dim=shapes["v_head_dim"], hidden=shapes["hidden"] if gpu else 64,
                layers=2 if batch >= 64 else 4, device="cuda" if gpu else "cpu",
            )
            rows.append(measure(case, sg, calls=8 if batch >= 64 else 16, repeats=args.repeats, gpu=gpu,
                                layers_in_model=shapes["layers"]))
            print(rows[-1], file=sys.stderr, flush=True)
    result = {
        "benchmark": f"mxfp4-vbmm-layout (Kimi-K2 per rank at TP{args.tp}, {shapes['layers']} layers, MXFP4 w_vc)",
        "device": timing.device_name() + ("" if gpu else " (copy audit only; times come from a GPU)"),
        "providers": providers.describe_used(),
        "columns": COLUMNS if gpu else ["o_proj", "batch", "copies_unpatched", "copies_patched"],
        "rows": rows,
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

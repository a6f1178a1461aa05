"""Decode benchmark for nsa-cat-skip: the same path as test/test_nsa_cat_skip.py, unpatched vs patched.

Runs the real sglang 0.5.11 ``forward_absorb_core`` -> ``RadixAttention`` -> ``forward_decode`` with
the HIP flags forced and the kernels from the provider table (``sglang_hip_decode.testing.mla_decode``), at GLM-5
per-rank shapes: TP8 (8 heads) and DP attention (64 heads), batch 1..256, top-k 2048 over an 8k
context. Per layer: µs median [p20, p80] of each arm (CUDA graphs, arms interleaved), the saving,
a standalone ``torch.cat`` of the same q (the copy the patch removes) timed in the same run, the
saving as the median [p20, p80] of per-round paired differences (drift cancels) and its ratio to the cat,
GPU kernels per layer (torch.profiler), copy ops and bytes (copy audit); per decode step: the saving
times the model's layers.

Run:  python benchmark/decode/bench_nsa_cat_skip.py [--quick] [--json out.json] [--config config.json]
On the CPU only the copy audit is reported (absolute times come from a GPU only).
"""

from __future__ import annotations

import sys

import torch

from sglang_hip_decode.testing import providers
from sgl_hip_kernels.testing import timing
from sglang_hip_decode.testing.ab import ab_runs
from sgl_hip_kernels.testing.report import bench_args, emit
from sglang_hip_decode.testing.mla_decode import GLM5, MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs, model_shapes
from sglang_hip_decode.patches.nsa_cat_skip import PATCH

BATCHES = (1, 4, 16, 64, 128, 256)
COLUMNS = [
    "heads", "batch", "kv", "unpatched_us", "patched_us", "saved_us", "cat_us", "saved/cat", "patched/unpatched",
    "kernels_unpatched", "kernels_patched", "cats_unpatched", "cats_patched", "cat_bytes", "cat_GBps",
    "step_saved_us",
]


def measure(case: MlaDecodeCase, sg, calls: int, repeats: int, gpu: bool) -> dict:
    gen = torch.Generator().manual_seed(case.batch * 1000 + case.heads)
    path = MlaDecodePath(case, gen, sg)
    x = make_inputs(case, gen)
    fb = path.forward_batch(x)
    row = {"heads": case.heads, "batch": case.batch, "kv": case.kv_dtype}
    with path.hip():
        step = lambda: path.step(x, fb)  # noqa: E731
        runs = ab_runs(step, {"unpatched": (), "patched": (PATCH,)}, calls, repeats, gpu)
    audits = {arm: r.audit for arm, r in runs.items()}
    cats = {arm: audits[arm].counts["cat"] / case.layers for arm in audits}
    row.update(cats_unpatched=cats["unpatched"], cats_patched=cats["patched"],
               cat_bytes=(audits["unpatched"].bytes["cat"] - audits["patched"].bytes["cat"]) // case.layers)
    if not gpu:
        return row
    # The copy the patch removes, alone: cat of the two views of a q_cat of the same shape.
    q_cat = torch.randn(case.batch, case.heads, 576, device="cuda").to(x.kv_caches[0].dtype)
    cat_graph = timing.capture(lambda: torch.cat([q_cat[..., :512], q_cat[..., 512:]], -1), calls)
    samples = {arm: [v / case.layers for v in r.samples] for arm, r in runs.items()}  # per layer
    samples.update(timing.time_graphs({"cat": cat_graph}, calls, repeats))
    kernels = {arm: r.kernels / case.layers for arm, r in runs.items()}
    t = {name: timing.summarise(values) for name, values in samples.items()}
    saving = timing.paired_saving(samples["unpatched"], samples["patched"])
    saved = saving.median_us
    moved = 2 * row["cat_bytes"]  # the cat reads q_nope and q_rope and writes q_all
    row.update(
        unpatched_us=str(t["unpatched"]), patched_us=str(t["patched"]), saved_us=str(saving), cat_us=str(t["cat"]),
        **{"saved/cat": round(saved / t["cat"].median_us, 2),
           "patched/unpatched": round(t["patched"].median_us / t["unpatched"].median_us, 4)},
        kernels_unpatched=kernels["unpatched"], kernels_patched=kernels["patched"],
        cat_GBps=round(moved / (t["cat"].median_us * 1e-6) / 1e9, 1),
    )
    return row


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--config", help="the model's config.json (default: GLM-5's published shapes)")
        parser.add_argument("--tp", type=int, default=8, help="tensor parallel size for the per-rank head count")
        parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
        parser.add_argument("--kv", default="bf16", choices=["bf16", "fp8_e4m3"])

    args = bench_args(__doc__, argv, extra=extra)

    gpu = torch.cuda.is_available()
    shapes = model_shapes(GLM5, args.config)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 4] if args.quick else list(BATCHES))
    head_counts = [shapes["heads"] // args.tp] + ([] if args.quick else [shapes["heads"]])  # TP8, DP attention
    sg = import_sglang()
    rows = []
    for heads in head_counts:
        for batch in batches:
            case = MlaDecodeCase(
                batch=batch, heads=heads, kv_dtype=args.kv, impl="tilelang", device="cuda" if gpu else "cpu",
                topk=shapes["topk"] if gpu else 64, context=8192 if gpu else 128,
                kv_lora_rank=shapes["kv_lora_rank"], rope_dim=shapes["rope_dim"], v_head_dim=shapes["v_head_dim"],
                layers=2 if batch >= 64 else 4, hidden=1024,
            )
            row = measure(case, sg, calls=8 if batch >= 64 else 16, repeats=args.repeats, gpu=gpu)
            if gpu:
                saved = float(row["saved_us"].split()[0])
                row["step_saved_us"] = round(saved * shapes["layers"], 1)
            rows.append(row)
            print({k: row.get(k, "") for k in COLUMNS}, file=sys.stderr, flush=True)
    result = {
        "benchmark": f"nsa-cat-skip (GLM-5 per rank, {shapes['layers']} layers, top-k {shapes['topk']}, kv {args.kv})",
        "device": timing.device_name() + ("" if gpu else " (copy audit only; times come from a GPU)"),
        "providers": providers.describe_used(),
        "columns": COLUMNS if gpu else ["heads", "batch", "kv", "cats_unpatched", "cats_patched", "cat_bytes"],
        "rows": rows,
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

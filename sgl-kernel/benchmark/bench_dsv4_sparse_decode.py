"""Benchmark: DeepSeek-V4 sparse decode and the NSA decode stand-in vs upstream's Triton kernels and torch.

DeepSeek-V4 (``sgl_hip_kernels.dsv4.sparse_decode``; FP8 584 B/token cache, sink, two scopes): the
SWA scope (top-k 128, pages of 256 tokens: a window of consecutive slots) plus the compressed scope
(top-k 512 for h_q 64, 1024 for h_q 128, pages of 64 tokens, random tokens), and the SWA scope alone;
batch 1..256, s_q 1 and 2. Arms, in one run:
* ``ours`` — this project's kernel (the fixed launch rule);
* ``upstream`` — sglang 0.5.13's Triton DSV4 decode, ``triton_sparse_attn_decode`` (the function its
  HIP backend calls under ``SGLANG_HACK_FLASHMLA_BACKEND=triton``; its own dispatch picks the fused,
  fused dual-scope (split-K or not) or gather + unified path, named in the table), imported from the
  release wheel (``--upstream-dsv4``), autotuned by a warm-up before capture. Its dispatch
  thresholds were tuned on an MI355X (256 CUs), not on the GPU this runs on;
* ``torch`` — the reference in bf16 (``sparse_decode_ref``: gather, dequantise, attention);
* ``floor`` — one launch of an empty Triton kernel.

NSA stand-in (``standins.sparse_mla_decode``, TileLang's ``tilelang_sparse_fwd`` contract): GLM-5
shapes, 8 and 64 heads (TP8 and TP1), top-k 2048, bf16 and fp8 cache, batch 1..256, vs sglang
0.5.23's Triton sparse MLA decode (``triton_sparse_mla_decode``, the same contract; ``--upstream-nsa``)
and torch.

Every arm's outputs are checked against the fp64 reference first (max abs error in the table).
Each timing replays a CUDA graph of ``calls`` calls that rotate over ``calls`` independent query and
index sets over caches of several times L2 (and L2 is flushed before every replay); µs per call,
median [p20, p80], arms interleaved. Bytes, term by term: per valid key its 584 (DSV4) or 576 x
element size (NSA) bytes, the indices (4 B each), q and out (2 B per value), the LSE (4 B); GB/s and
% of the device-to-device copy bandwidth measured in the same run. TFLOP/s counts the QK and PV
dots (4 x 512 FLOPs per head and valid key; NSA: 2 x (576 + 512)).

Run:  python sgl-kernel/benchmark/bench_dsv4_sparse_decode.py [--quick] [--json out.json]
          [--upstream-dsv4 sglang-0.5.13.post1-*.whl] [--upstream-nsa sglang-0.5.23-*.whl] [--sweep]
On the CPU nothing is timed: the kernels (interpreter) are checked against the reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import types

import torch
import triton

from sgl_hip_kernels import splitk
from sgl_hip_kernels.dsv4 import page_bytes, quantize_kv, sparse_decode
from sgl_hip_kernels.dsv4.sparse_decode import launch_rule
from sgl_hip_kernels.dsv4.sparse_decode_ref import sparse_decode_ref
from sgl_hip_kernels.standins.sparse_mla_decode import launch_rule as nsa_launch_rule
from sgl_hip_kernels.standins.sparse_mla_decode import sparse_mla_decode
from sgl_hip_kernels.standins.sparse_mla_decode_ref import sparse_mla_decode_ref
from sgl_hip_kernels.testing import timing, upstream
from sgl_hip_kernels.testing.report import bench_args, emit

DSV4_DIR = "sglang/srt/layers/attention/nsa/triton_decode"
NSA_DIR = "sglang/kernels/ops/attention/dsa"
BATCHES = (1, 2, 4, 64, 74, 128, 256)
SWA_TOPK, SWA_BLOCK, X_BLOCK = 128, 256, 64


def load_upstream_dsv4(source):
    mods = upstream.load(source, DSV4_DIR, ["triton_mla_kernels_decode_optimized"])
    return mods["triton_mla_kernels_decode_optimized"]


def load_upstream_nsa(source):
    def unused(*a, **k):
        raise RuntimeError("not on the decode path")

    stubs = {
        "sglang.kernels.ops.attention.metadata": {"q8kv8_topk_length_from_indices": unused},
        "sglang.kernels.ops.quantization.fp8_kernel": {"is_fp8_fnuz": lambda: False},  # NVIDIA: OCP fp8
        "sglang.srt.utils": {"get_device_core_count": lambda i=0: torch.cuda.get_device_properties(i).multi_processor_count,
                             "is_gfx95_supported": lambda: False},
    }
    mods = upstream.load(source, NSA_DIR, ["triton_sparse_mla", "triton_sparse_mla_decode"], stubs=stubs,
                         aliases={"sglang.kernels.ops.attention.dsa.triton_sparse_mla": "triton_sparse_mla"})
    return mods["triton_sparse_mla_decode"]


# --- DeepSeek-V4 ------------------------------------------------------------------------------

@dataclasses.dataclass
class Dsv4Shape:
    h: int
    batch: int
    s_q: int
    x_topk: int  # 0: the SWA scope alone

    @property
    def name(self):
        return f"h{self.h} b{self.batch} s_q{self.s_q} " + (f"swa{SWA_TOPK}+c{self.x_topk}" if self.x_topk else f"swa{SWA_TOPK}")


def dsv4_caches(shape: Dsv4Shape, gen, calls: int, l2_bytes: int):
    """Two caches big enough that ``calls`` calls' keys do not share L2 lines, filled with real FP8 pages."""
    tokens_needed = max(4 * l2_bytes // 584, calls * shape.batch * shape.s_q * (SWA_TOPK + shape.x_topk))
    main_pages = max(shape.batch * 2, tokens_needed // SWA_BLOCK // (2 if shape.x_topk else 1) + 1)
    x_pages = max(2, tokens_needed // X_BLOCK // 2 + 1) if shape.x_topk else 0
    def fill(pages, block):
        cache = torch.empty(pages, page_bytes(block), dtype=torch.uint8, device="cuda")
        chunk = max(1, (64 << 20) // (block * 512 * 4))
        for p in range(0, pages, chunk):
            n = min(chunk, pages - p)
            cache[p : p + n] = quantize_kv(torch.randn(n, block, 512, generator=gen, device="cuda"), block)
        return cache
    return fill(main_pages, SWA_BLOCK), (fill(x_pages, X_BLOCK) if shape.x_topk else None)


def dsv4_set(shape: Dsv4Shape, main, extra, gen):
    b, s_q = shape.batch, shape.s_q
    main_tokens = main.shape[0] * SWA_BLOCK
    start = torch.randint(0, main_tokens - SWA_TOPK, (b, s_q, 1), generator=gen, device="cuda")
    s = {"q": torch.randn(b, s_q, shape.h, 512, generator=gen, device="cuda").bfloat16(),
         "indices": (start + torch.arange(SWA_TOPK, device="cuda")).to(torch.int32),
         "topk_length": torch.full((b,), SWA_TOPK, dtype=torch.int32, device="cuda"),
         "sink": torch.randn(shape.h, generator=gen, device="cuda")}
    if extra is not None:
        x_tokens = extra.shape[0] * X_BLOCK
        s["x_indices"] = torch.randint(0, x_tokens, (b, s_q, shape.x_topk), generator=gen, device="cuda").to(torch.int32)
        s["x_length"] = torch.randint(shape.x_topk // 2, shape.x_topk + 1, (b,), generator=gen, device="cuda").to(torch.int32)
    return s


def dsv4_kwargs(s, extra):
    kw = {"topk_length": s["topk_length"], "attn_sink": s["sink"]}
    if extra is not None:
        kw.update(extra_k_cache=extra, extra_indices=s["x_indices"], extra_block_size=X_BLOCK, extra_topk_length=s["x_length"])
    return kw


def upstream_dsv4_call(mod, s, main, extra, scale):
    def scope(cache, block, idx, length):
        view = torch.as_strided(cache, (cache.shape[0], block, 1, 584), (cache.stride(0), 584, 584, 1))
        return types.SimpleNamespace(blocked_k=view, blocked_k_quantized=view, indices_in_kvcache=idx, topk_length=length)
    main_scope = scope(main, SWA_BLOCK, s["indices"], s["topk_length"])
    extra_scope = scope(extra, X_BLOCK, s["x_indices"], s["x_length"]) if extra is not None else None
    return mod.triton_sparse_attn_decode(s["q"], main_scope, extra_scope, scale, 512, s["sink"])


def upstream_dsv4_path(mod, shape: Dsv4Shape) -> str:
    """Which of upstream's paths its dispatch takes at this shape (its own predicates)."""
    tokens, total = shape.batch * shape.s_q, SWA_TOPK + shape.x_topk
    if not shape.x_topk:
        return "fused" if SWA_TOPK < 8192 else "gather+unified"
    if mod._should_use_fused_nosplitk(tokens, shape.h, total):
        return "dual (no split-K)"
    if mod._should_use_fused_dual_scope(tokens, shape.h, total):
        return "dual low-overhead"
    return "gather+unified"


def dsv4_bytes(shape: Dsv4Shape, s) -> int:
    t = shape.batch * shape.s_q
    keys = t * SWA_TOPK
    idx = t * SWA_TOPK * 4
    if shape.x_topk:
        keys += int(s["x_length"].long().sum()) * shape.s_q
        idx += t * shape.x_topk * 4
    lengths = (2 if shape.x_topk else 1) * shape.batch * 4
    return keys * 584 + idx + t * shape.h * 512 * 2 * 2 + t * shape.h * 4 + lengths + shape.h * 4  # + the sink


def dsv4_flops(shape: Dsv4Shape, s) -> int:
    keys = shape.batch * shape.s_q * SWA_TOPK + (int(s["x_length"].long().sum()) * shape.s_q if shape.x_topk else 0)
    return keys * shape.h * 4 * 512


def sig(x: float) -> float:
    return float(f"{x:.2e}")


def max_err(got, ref):
    """The larger of the out and LSE errors; NaN if either has a NaN (Python's max would drop it)."""
    out, lse = got
    finite = torch.isfinite(ref[1])
    errs = torch.stack([(out.double() - ref[0]).abs().max(), (lse.double() - ref[1])[finite].abs().max()])
    return errs.max().item() if not errs.isnan().any() else float("nan")


def measure_dsv4(shape: Dsv4Shape, up, repeats: int, copy_gbps: float, l2: int) -> dict:
    calls = 8
    gen = torch.Generator(device="cuda").manual_seed(shape.h * 1000 + shape.batch * 10 + shape.s_q)
    main, extra = dsv4_caches(shape, gen, calls, l2)
    sets = [dsv4_set(shape, main, extra, gen) for _ in range(calls)]
    scale = 512**-0.5
    ours = lambda s: sparse_decode(s["q"], main, s["indices"], SWA_BLOCK, scale, **dsv4_kwargs(s, extra))  # noqa: E731
    ref_torch = lambda s: sparse_decode_ref(s["q"], main, s["indices"], SWA_BLOCK, scale, work=torch.bfloat16,  # noqa: E731
                                            **dsv4_kwargs(s, extra))
    s0 = sets[0]
    ref = sparse_decode_ref(s0["q"].double(), main, s0["indices"], SWA_BLOCK, scale, **dsv4_kwargs(s0, extra))
    row = {"shape": shape.name, "err_ours": sig(max_err(ours(s0), ref)), "err_torch": sig(max_err(ref_torch(s0), ref))}
    arms = {"ours": ours, "torch": ref_torch}
    if up is not None:
        up_one = lambda s: upstream_dsv4_call(up, s, main, extra, scale)  # noqa: E731
        for s in sets:  # autotune every kernel it will launch, before capture
            up_one(s)
        torch.cuda.synchronize()
        row["err_upstream"] = sig(max_err(up_one(s0), ref))
        row["upstream_path"] = upstream_dsv4_path(up, shape)
        arms["upstream"] = up_one
    moved = sum(dsv4_bytes(shape, s) for s in sets) // calls
    flops = sum(dsv4_flops(shape, s) for s in sets) // calls
    p = launch_rule(shape.batch * shape.s_q, shape.h, SWA_TOPK + shape.x_topk, "cuda")
    row.update(timing.arms_vs_ours(arms, sets, repeats, "q", moved, copy_gbps, flops), splits=p.splits)
    return row


# --- NSA stand-in ------------------------------------------------------------------------------

NSA_TOPK = 2048


def nsa_inputs(h: int, batch: int, fp8: bool, calls: int, l2: int):
    """A GLM-5 NSA decode: a cache over 4x the L2 (bf16 or fp8 rows of 576) and ``calls`` input sets
    of q (batch, h, 576) and top-2048 slot lists."""
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(h * 1000 + batch + fp8)
    slots = max(4 * l2 // (576 * dtype.itemsize), calls * batch * NSA_TOPK // 2, 4 * NSA_TOPK)
    kv = (torch.randn(slots, 1, 576, generator=gen, device="cuda") * 0.5).to(dtype)
    sets = [{"q": (torch.randn(batch, h, 576, generator=gen, device="cuda") * 0.5).to(dtype),
             "indices": torch.stack([torch.randperm(slots, generator=gen, device="cuda")[:NSA_TOPK]
                                     for _ in range(batch)]).to(torch.int32)[:, None, :]} for _ in range(calls)]
    return kv, sets


def measure_nsa(h: int, batch: int, fp8: bool, up, repeats: int, copy_gbps: float, l2: int) -> dict:
    calls, topk = 8, NSA_TOPK
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    kv, sets = nsa_inputs(h, batch, fp8, calls, l2)
    scale = 576**-0.5
    ours = lambda s: sparse_mla_decode(s["q"], kv, s["indices"], scale)  # noqa: E731
    torch_arm = lambda s: sparse_mla_decode_ref(s["q"].to(torch.bfloat16), kv.to(torch.bfloat16), s["indices"], scale)  # noqa: E731
    s0 = sets[0]
    ref = sparse_mla_decode_ref(s0["q"].double(), kv.double(), s0["indices"], scale).double()
    err = lambda out: sig((out.double() - ref).abs().max().item())  # noqa: E731
    row = {"shape": f"h{h} b{batch} {'fp8' if fp8 else 'bf16'}", "err_ours": err(ours(s0)), "err_torch": err(torch_arm(s0))}
    arms = {"ours": ours, "torch": torch_arm}
    if up is not None:
        up_one = lambda s: up.triton_sparse_mla_decode(s["q"][..., :512], s["q"][..., 512:], kv, s["indices"], scale, 512)  # noqa: E731
        for s in sets:
            up_one(s)
        torch.cuda.synchronize()
        row["err_upstream"] = err(up_one(s0)[0])
        arms["upstream"] = up_one
    moved = batch * topk * (576 * dtype.itemsize + 4) + batch * h * (576 * dtype.itemsize + 512 * 2)
    row.update(timing.arms_vs_ours(arms, sets, repeats, "q", moved, copy_gbps, batch * topk * h * 2 * (576 + 512)))
    return row


# --- the launch-rule sweep (how the fixed rule was chosen) ------------------------------------

def _time_rules(shape: str, rules: dict, call, sets: list, repeats: int) -> list[dict]:
    """One sweep table block: every rule (name -> SplitPlan) of ``call(set, rule)``, graphs interleaved."""
    rows, graphs = [], {}
    for name, p in rules.items():
        try:
            graphs[name] = timing.capture(lambda p=p: [call(s, p) for s in sets], 1)
        except Exception as exc:  # a config that does not compile (shared memory): skipped, said
            rows.append({"shape": shape, "config": name, "us": f"failed: {type(exc).__name__}"})
    t = {name: timing.summarise(v).median_us for name, v in timing.time_graphs(graphs, len(sets), repeats).items()}
    best = sorted(t.items(), key=lambda kv: kv[1])
    for name, us in best:
        rows.append({"shape": shape, "config": name, "us": round(us, 2), "vs_best": round(us / best[0][1], 3)})
    print(f"  sweep {shape}: best {best[0][0]} {best[0][1]:.2f} us, rule {t.get('rule', float('nan')):.2f} us",
          file=sys.stderr, flush=True)
    return rows


def _alternatives(tokens: int, heads: int, keys: int, configs) -> dict:
    """Plans for (block_h, block_n, warps, stages, split factor): the split count the rule's formula
    gives for that block_h, times the factor (more or fewer, shorter or longer splits)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rules = {}
    for bh, bn, warps, stages, factor in configs:
        want = triton.cdiv(splitk.WAVES * sms, tokens * triton.cdiv(heads, bh))
        sp = max(1, min(want, triton.cdiv(keys, splitk.MIN_KEYS), splitk.MAX_SPLITS))
        sp = max(1, min(int(sp * factor), splitk.MAX_SPLITS))
        rules[f"bh{bh} bn{bn} w{warps} s{stages} x{factor}"] = splitk.plan(tokens, heads, keys, "cuda", bh, bn, warps,
                                                                          stages, splits=sp)
    return rules


def sweep(repeats: int, l2: int, only: str | None) -> list[dict]:
    rows, calls = [], 4
    if only in (None, "dsv4"):
        configs = [(16, 32, 8, 2, 1), (16, 64, 4, 2, 1), (16, 64, 8, 2, 1), (32, 64, 8, 2, 1), (64, 32, 8, 2, 1),
                   (64, 64, 8, 2, 1), (64, 64, 8, 3, 1), (64, 64, 8, 2, 2), (64, 64, 8, 2, 0.5)]
        for shape in (Dsv4Shape(64, 1, 1, 512), Dsv4Shape(64, 64, 2, 512), Dsv4Shape(64, 128, 1, 512),
                      Dsv4Shape(128, 128, 2, 1024)):
            gen = torch.Generator(device="cuda").manual_seed(shape.batch)
            main, extra = dsv4_caches(shape, gen, calls, l2)
            sets = [dsv4_set(shape, main, extra, gen) for _ in range(calls)]
            tokens, keys = shape.batch * shape.s_q, SWA_TOPK + shape.x_topk
            rules = {"rule": launch_rule(tokens, shape.h, keys, "cuda"), **_alternatives(tokens, shape.h, keys, configs)}
            call = lambda s, p: sparse_decode(s["q"], main, s["indices"], SWA_BLOCK, 0.04, rule=p,  # noqa: E731
                                              **dsv4_kwargs(s, extra))
            rows += _time_rules(f"dsv4 {shape.name}", rules, call, sets, repeats)
    if only in (None, "nsa"):
        configs = [(16, 32, 4, 2, 1), (16, 64, 4, 2, 1), (16, 64, 8, 2, 1), (16, 32, 4, 3, 1), (16, 64, 4, 3, 1),
                   (16, 32, 8, 2, 2), (16, 64, 4, 2, 2), (32, 32, 8, 2, 1), (32, 64, 8, 2, 1)]
        for h, batch, fp8 in ((8, 1, False), (8, 64, False), (64, 64, False), (64, 64, True)):
            kv, sets = nsa_inputs(h, batch, fp8, calls, l2)
            rules = {"rule": nsa_launch_rule(batch, h, NSA_TOPK, "cuda"),
                     **_alternatives(batch, h, NSA_TOPK, [c for c in configs if c[0] <= max(16, h)])}
            call = lambda s, p, kv=kv: sparse_mla_decode(s["q"], kv, s["indices"], 576**-0.5, rule=p)  # noqa: E731
            rows += _time_rules(f"nsa h{h} b{batch} {'fp8' if fp8 else 'bf16'}", rules, call, sets, repeats)
    return rows


def cpu_check() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    cache = quantize_kv(torch.randn(4, 16, 512, generator=gen), 16)
    idx = torch.randint(0, 64, (2, 2, 96), generator=gen, dtype=torch.int32)  # 96 keys: 3 splits of 32, combined
    q = torch.randn(2, 2, 5, 512, generator=gen)
    sink = torch.randn(5, generator=gen)
    got = sparse_decode(q, cache, idx, 16, 0.05, attn_sink=sink, splits=3)
    ref = sparse_decode_ref(q.double(), cache, idx, 16, 0.05, attn_sink=sink)
    rows = [{"kernel": "dsv4", "shape": "h5 b2 s_q2 topk96 3 splits (fp32 q)", "err_ours": sig(max_err(got, ref))}]
    kv = torch.randn(128, 1, 576, generator=gen)
    nidx = torch.randint(0, 128, (3, 1, 64), generator=gen, dtype=torch.int32)  # 2 splits of 32
    nq = torch.randn(3, 8, 576, generator=gen)
    err = (sparse_mla_decode(nq, kv, nidx, 0.05, splits=2).double() - sparse_mla_decode_ref(nq.double(), kv.double(), nidx, 0.05))
    rows.append({"kernel": "nsa", "shape": "h8 b3 topk64 2 splits (fp32)", "err_ours": sig(err.abs().max().item())})
    return rows


def progress(row: dict) -> None:
    """One stderr line per measured row (a run cut off by a time limit still shows what it measured)."""
    keys = ("ours_us", "upstream_us", "upstream_path", "upstream/ours", "pct_copy_bw", "TFLOPs", "ours/floor", "err_ours",
            "err_upstream", "err_torch")
    print(f"  {row['kernel']} {row['shape']}: " + ", ".join(f"{k} {row[k]}" for k in keys if k in row), file=sys.stderr,
          flush=True)


COLUMNS = ["kernel", "shape", "upstream_path", "splits", "ours_us", "upstream_us", "torch_us", "floor_us", "upstream/ours",
           "torch/ours", "ours/floor", "bytes", "GBps", "pct_copy_bw", "TFLOPs", "err_ours", "err_upstream", "err_torch"]


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--upstream-dsv4", default=upstream.release_wheel("0.5.13.post1"),
                            help="sglang 0.5.13(.post1) wheel or unpacked release: its Triton DSV4 decode is the peer")
        parser.add_argument("--upstream-nsa", default=upstream.release_wheel("0.5.23"),
                            help="sglang 0.5.23 wheel or unpacked release: its Triton sparse MLA decode is the NSA peer")
        parser.add_argument("--sweep", action="store_true", help="time the launch-rule alternatives instead")
        parser.add_argument("--only", choices=("dsv4", "nsa"), help="one of the two tables")
        parser.add_argument("--heads", type=int, choices=(64, 128), help="dsv4: only the shapes with this head count")
        parser.add_argument("--batches", help="dsv4: comma-separated batch sizes (default: all)")
        parser.add_argument("--swa-only", action="store_true", help="dsv4: only the shapes without the compressed scope")
    args = bench_args(__doc__, argv, repeats=30, extra=extra)
    if args.swa_only and args.heads == 128:
        raise SystemExit("--swa-only measures h_q 64 only (the SWA-only shapes): drop --heads 128")
    if not torch.cuda.is_available():
        emit({"benchmark": "sparse decode: dsv4 and the NSA stand-in", "device": "cpu (no timing; interpreter check only)",
              "providers": "triton (interpreter) vs fp64 reference", "columns": ["kernel", "shape", "err_ours"],
              "rows": cpu_check()},
             args.json)
        return 0
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    if args.sweep:
        emit({"benchmark": "sparse decode launch-rule sweep (dsv4 and the NSA stand-in)", "device": timing.device_name(),
              "providers": "triton",
              "columns": ["shape", "config", "us", "vs_best"], "rows": sweep(args.repeats, l2, args.only)}, args.json)
        return 0
    copy_gbps = timing.copy_bandwidth(args.repeats)
    rows, providers = [], []
    if args.only in (None, "dsv4"):
        up = load_upstream_dsv4(args.upstream_dsv4) if args.upstream_dsv4 else None
        batches = [int(b) for b in args.batches.split(",")] if args.batches else None
        shapes = [] if args.swa_only else [
            Dsv4Shape(h, b, s_q, 512 if h == 64 else 1024) for h in ((args.heads,) if args.heads else (64, 128))
            for b in (batches or ((1, 64) if args.quick else BATCHES)) for s_q in (1, 2)]
        if args.heads in (None, 64):
            shapes += [Dsv4Shape(64, b, 1, 0) for b in (batches or ((1,) if args.quick else (1, 64, 256)))]
        for shape in shapes:
            rows.append(dict(measure_dsv4(shape, up, args.repeats, copy_gbps, l2), kernel="dsv4"))
            progress(rows[-1])
        providers.append("dsv4: triton (sgl_hip_kernels.dsv4.sparse_decode) vs triton (sglang 0.5.13.post1 "
                         f"triton_sparse_attn_decode{'' if up else ': not given'}) vs torch (bf16)")
    if args.only in (None, "nsa"):
        up = load_upstream_nsa(args.upstream_nsa) if args.upstream_nsa else None
        for h, fp8 in itertools.product((8, 64), (False, True)):
            for b in ((1, 64) if args.quick else (1, 4, 16, 64, 128, 256)):
                rows.append(dict(measure_nsa(h, b, fp8, up, args.repeats, copy_gbps, l2), kernel="nsa"))
                progress(rows[-1])
        providers.append("nsa: triton (sgl_hip_kernels.standins.sparse_mla_decode) vs triton (sglang 0.5.23 "
                         f"triton_sparse_mla_decode{'' if up else ': not given'}) vs torch (bf16)")
    emit({"benchmark": f"sparse decode: dsv4 (FP8 584 B/token, sink, bf16 q) and the NSA stand-in (top-k 2048, d 576); "
                       f"copy bandwidth {copy_gbps:.0f} GB/s",
          "device": timing.device_name(), "providers": "; ".join(providers), "columns": COLUMNS, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

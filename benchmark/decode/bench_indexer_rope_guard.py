"""Benchmark for indexer-rope-guard: the NSA indexer's q/k RoPE write-back, three ways.

The same path as test/test_indexer_rope_guard.py: the real sglang 0.5.11 ``Indexer._get_q_k_bf16``
(``sglang_hip_decode.testing.nsa_indexer``) at GLM-5 / DeepSeek-V3.2 indexer shapes (64 index heads, head dim 128,
rope 64), tokens 1..4096, with an in-place RoPE (returns views: the HIP case) and an out-of-place one:
* ``0.5.10`` — the form before sglang#22232, ``query[..., :rope] = q_rope.clone()`` (reconstructed with a
  bench-only edit of the same function);
* ``0.5.11`` — upstream's data_ptr guard; ``patched`` — this project's exact guard.
Per call: copy ops and bytes (copy audit), GPU kernels, µs median [p20, p80] (CUDA graphs, arms
interleaved), the µs saved against 0.5.10, and the host-side cost of the guard call itself in eager
mode (what prefill pays; a CUDA graph replays none of it). A second table counts the kernels of
0.5.11's head-gate functions eager vs ``torch.compile`` (inductor, as on HIP since sglang#22232).

Run:  python benchmark/decode/bench_indexer_rope_guard.py [--quick] [--json out.json]
On the CPU only the copy audit is reported (absolute times come from a GPU only).
"""

from __future__ import annotations

import json
import sys
import time
import types

import torch

from sglang_hip_decode import patching
from sgl_hip_kernels.testing import timing
from sglang_hip_decode.testing.ab import ab_runs
from sglang_hip_decode.testing.sglang_import import swap_attrs
from sglang_hip_decode.testing.nsa_indexer import IndexerCase, IndexerPath, _Linear, import_indexer
from sgl_hip_kernels.testing.report import bench_args, render
from sglang_hip_decode.patches.indexer_rope_guard import PATCH
from sglang_hip_decode.patching import Edit, Hunk, Patch

TOKENS = (1, 16, 64, 256, 1024, 4096)
ARMS = ("0.5.10", "0.5.11", "patched")
# Before sglang#22232 (up to 0.5.10.post1) the write-back always cloned and copied.
BEFORE_22232 = Patch(
    name="bench-0.5.10-writeback", summary="bench only", gate="any", default=False,
    edits=(Edit("sglang.srt.layers.attention.nsa.nsa_indexer:Indexer._get_q_k_bf16", (
        Hunk("self._update_rope_guarded(query[..., : self.rope_head_dim], q_rope)",
             "query[..., : self.rope_head_dim] = q_rope.clone()"),
        Hunk("self._update_rope_guarded(key[..., : self.rope_head_dim], k_rope)",
             "key[..., : self.rope_head_dim] = k_rope.clone()"),
    )),),
)
ARM_PATCH = {"0.5.10": BEFORE_22232, "0.5.11": None, "patched": PATCH}


def measure(case: IndexerCase, ni, gpu: bool, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(case.tokens)
    path = IndexerPath(case, gen, ni)
    q_lora, x, positions = path.inputs(gen)
    call = lambda: path.q_k(q_lora, x, positions)  # noqa: E731
    row = {"tokens": case.tokens, "rope": "in place" if case.in_place_rope else "out of place"}
    arms = {arm: (ARM_PATCH[arm],) if ARM_PATCH[arm] is not None else () for arm in ARMS}
    with path.rotate_stand_in():
        runs = ab_runs(call, arms, 8, repeats, gpu)
    for arm, r in runs.items():
        row[f"copies_{arm}"] = f"{r.audit.total_count} ({r.audit.total_bytes} B)"
    if gpu:
        for arm, r in runs.items():
            row[f"us_{arm}"] = str(timing.summarise(r.samples))
            row[f"kernels_{arm}"] = r.kernels
        row["saved_vs_0.5.10_us"] = str(timing.paired_saving(runs["0.5.10"].samples, runs["patched"].samples))
        row["patched-0.5.11_us"] = str(timing.paired_saving(runs["patched"].samples, runs["0.5.11"].samples))
    return row


def guard_host_cost(ni, device: str, n: int = 20000, rounds: int = 7) -> dict:
    """Host µs per eager call of the guard alone, in the alias case (the in-place RoPE result):
    the installed release's upstream guard and the patched one, rounds interleaved, the best round
    of each (the least-disturbed estimate of a pure host cost)."""
    buf = torch.randn(64, 64, 128, device=device, dtype=torch.bfloat16)
    dst = buf[..., :64]
    release = patching.format_release(patching.installed_release())
    arms = ((f"upstream {release}", ()), ("patched", (PATCH,)))
    guards = {}
    for arm, patches in arms:
        with patching.applied(*patches):
            guards[arm] = ni.Indexer.__dict__["_update_rope_guarded"].__func__
    assert guards["patched"].__code__.co_filename.endswith("(patched by sglang-hip-decode: indexer-rope-guard)")
    best = {arm: float("inf") for arm in guards}
    for _ in range(rounds):
        for arm, guard in guards.items():
            for _ in range(200):
                guard(dst, buf[..., :64])
            start = time.perf_counter()
            for _ in range(n):
                guard(dst, buf[..., :64])
            best[arm] = min(best[arm], (time.perf_counter() - start) / n * 1e6)
    return best


def head_gate_fusion(ni, tokens: int = 64) -> list[dict]:
    """Kernels of 0.5.11's compiled head-gate functions, eager vs torch.compile (inductor)."""
    rows = []
    hidden, heads = 6144, 64
    weight = (torch.randn(heads, hidden, device="cuda") * hidden**-0.5).to(torch.bfloat16)
    self = types.SimpleNamespace(n_heads=heads, softmax_scale=128**-0.5, weights_proj=_Linear(weight))
    with swap_attrs((ni, "_is_hip", True)):  # the HIP branch of _weights_proj_bf16_in_fp32_out: bf16 out
        self._weights_proj_bf16_in_fp32_out = lambda x: ni.Indexer._weights_proj_bf16_in_fp32_out(self, x)
        x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
        q_scale = torch.rand(tokens, heads, 1, device="cuda")
        for name, args in (("_project_and_scale_head_gates", (x,)), ("_get_logits_head_gate", (x, q_scale))):
            original = ni.Indexer.__dict__[name]._torchdynamo_orig_callable
            eager = lambda: original(self, *args)  # noqa: E731
            torch._dynamo.reset()
            compiled_fn = torch.compile(lambda *a: original(self, *a), dynamic=True)
            compiled = lambda: compiled_fn(*args)  # noqa: E731
            want = eager()
            got = compiled()
            names_eager, names_compiled = timing.gpu_kernels(eager), timing.gpu_kernels(compiled)
            rows.append({
                "function": name, "tokens": tokens,
                "kernels_eager": len(names_eager), "kernels_compiled": len(names_compiled),
                "max_abs_diff": float((got.float() - want.float()).abs().max()),
                "eager": " | ".join(n[:60] for n in names_eager), "compiled": " | ".join(n[:60] for n in names_compiled),
            })
    return rows


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--head-gates-only", action="store_true", help="only the compile-fusion table (GPU)")
        p.add_argument("--guard-host-only", action="store_true",
                       help="only the guard's host cost, upstream's (the installed release's) vs patched")

    args = bench_args(__doc__, argv, extra=extra)
    gpu = torch.cuda.is_available()
    ni = import_indexer()
    if args.guard_host_only:  # any release: its upstream guard against the patched one
        host = guard_host_cost(ni, "cuda" if gpu else "cpu")
        (upstream, up_us), (_, ours_us) = host.items()
        shown = {k: round(v, 3) for k, v in host.items()} if gpu else "absolute times come from a GPU host only"
        result = {"benchmark": "indexer-rope-guard host cost per eager call (alias case, bf16 (64, 64, 64) view)",
                  "device": timing.device_name(), "us_per_call": shown, "patched / upstream": round(ours_us / up_us, 3),
                  "upstream": upstream}
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
        return 0
    if args.head_gates_only:
        rows = head_gate_fusion(ni)
        print(json.dumps(rows, indent=1))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        return 0
    tokens = (1, 16) if args.quick else TOKENS
    rows = []
    for in_place in (True, False):
        for t in tokens:
            case = IndexerCase(tokens=t, in_place_rope=in_place, device="cuda" if gpu else "cpu",
                               **({} if gpu else dict(q_lora_rank=256, hidden=256)))
            rows.append(measure(case, ni, gpu, args.repeats))
            print(rows[-1], file=sys.stderr, flush=True)
    columns = ["tokens", "rope"] + [f"copies_{a}" for a in ARMS]
    if gpu:
        columns += [f"us_{a}" for a in ARMS] + ["saved_vs_0.5.10_us", "patched-0.5.11_us"] + [f"kernels_{a}" for a in ARMS]
    host = guard_host_cost(ni, "cuda" if gpu else "cpu")
    result = {
        "benchmark": "indexer-rope-guard (GLM-5/DeepSeek-V3.2 indexer: 64 heads x 128, rope 64; _get_q_k_bf16)",
        "device": timing.device_name() + ("" if gpu else " (copy audit only; times come from a GPU)"),
        "providers": "torch stand-ins (RoPE, Hadamard), torch linears",
        "columns": columns,
        "rows": rows,
        "guard_host_us_per_call": {k: round(v, 3) for k, v in host.items()} if gpu else "not timed on the CPU",
    }
    if gpu:
        result["head_gate_fusion"] = head_gate_fusion(ni)
    text = render(result)
    if gpu:
        text += f"\nguard host cost per eager call (alias case): {result['guard_host_us_per_call']}"
        text += "\n" + render({"benchmark": "head-gate torch.compile fusion (inductor on the H100 as the HIP proxy)",
                               "device": result["device"], "providers": "inductor",
                               "columns": ["function", "tokens", "kernels_eager", "kernels_compiled", "max_abs_diff"],
                               "rows": result["head_gate_fusion"]})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

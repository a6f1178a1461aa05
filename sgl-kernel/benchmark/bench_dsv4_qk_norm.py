"""Benchmark: fused QK RMSNorm (DeepSeek-V4 attention) vs the unfused torch sequence and a one-launch floor.

DeepSeek-V4 shapes (its published config): 64 q heads without weight, 1 k head with weight, head dim 512,
bf16; decode batch 1..256 tokens and prefill 8192 tokens. Per shape, in one run on the GPU, each as a
CUDA graph of ``calls`` calls (µs per call, median [p20, p80], replays interleaved):
* ``fused`` — sgl_hip_kernels.dsv4.qk_norm.fused_qk_norm (one launch);
* ``torch`` — the unfused torch ops (q norm, then k norm with its weight);
* ``floor`` — an empty Triton kernel launched the same way (what one launch costs);
bytes moved term by term (read q, k, weight; write q, k) -> GB/s and % of the device-to-device copy
bandwidth measured in the same run (a 1 GiB ``copy_``).

Run:  python sgl-kernel/benchmark/bench_dsv4_qk_norm.py [--quick] [--json out.json]
On the CPU: nothing is timed (absolute times come from a GPU only); the kernel's result is checked.
"""

from __future__ import annotations

import sys

import torch

from sgl_hip_kernels.testing import timing
from sgl_hip_kernels.testing.report import bench_args, emit
from sgl_hip_kernels.dsv4.qk_norm import fused_qk_norm
from sgl_hip_kernels.dsv4.qk_norm_ref import fused_qk_norm_ref

HQ, HK, D = 64, 1, 512
DECODE = (1, 4, 16, 64, 128, 256)
PREFILL = 8192


def unfused(q, k, w, eps=1e-6):
    def norm(x, weight):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y if weight is None else y * weight).to(x.dtype)

    return norm(q, None), norm(k, w)


def measure(tokens: int, repeats: int, copy_gbps: float) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(tokens, HQ, D, generator=gen).to(torch.bfloat16).cuda()
    k = torch.randn(tokens, HK, D, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(D, generator=gen) * 0.1 + 1).cuda()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    want = fused_qk_norm_ref(q, k, None, w, 1e-6)
    fused_qk_norm(q, k, None, w, 1e-6, q_out=q_out, k_out=k_out)
    err = max((q_out.float() - want[0].float()).abs().max().item(), (k_out.float() - want[1].float()).abs().max().item())
    calls = 16 if tokens <= 256 else 4
    graphs = {
        "fused": timing.capture(lambda: fused_qk_norm(q, k, None, w, 1e-6, q_out=q_out, k_out=k_out), calls),
        "torch": timing.capture(lambda: unfused(q, k, w), calls),
        "floor": timing.capture(lambda: timing.empty_launch(q_out), calls),
    }
    t = {name: timing.summarise(v) for name, v in timing.time_graphs(graphs, calls, repeats).items()}
    moved = 2 * (q.numel() + k.numel()) * 2 + w.numel() * 4  # read + write q and k (bf16), read w (fp32)
    gbps = moved / (t["fused"].median_us * 1e-6) / 1e9
    return {
        "tokens": tokens, "fused_us": str(t["fused"]), "torch_us": str(t["torch"]), "floor_us": str(t["floor"]),
        "fused/floor": round(t["fused"].median_us / t["floor"].median_us, 2),
        "torch/fused": round(t["torch"].median_us / t["fused"].median_us, 2),
        "bytes": moved, "GBps": round(gbps, 1), "pct_copy_bw": round(100 * gbps / copy_gbps, 1),
        "max_abs_err_vs_ref": err,
        "kernels_fused": timing.count_gpu_kernels(lambda: fused_qk_norm(q, k, None, w, 1e-6, q_out=q_out, k_out=k_out)),
        "kernels_torch": timing.count_gpu_kernels(lambda: unfused(q, k, w)),
    }


def main(argv=None) -> int:
    args = bench_args(__doc__, argv)
    if not torch.cuda.is_available():
        # The CPU has no timing to offer; check the kernel (interpreter) against the reference instead.
        gen = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, HQ, D, generator=gen), torch.randn(2, HK, D, generator=gen)
        w = torch.randn(D, generator=gen)
        got, want = fused_qk_norm(q, k, None, w, 1e-6), fused_qk_norm_ref(q, k, None, w, 1e-6)
        err = max((a - b).abs().max().item() for a, b in zip(got, want))
        emit({"benchmark": "dsv4 fused QK RMSNorm (64 q heads, 1 k head, D 512)",
              "device": "cpu (no timing; interpreter check only)",
              "providers": "triton (interpreter)", "columns": ["tokens", "max_abs_err_vs_ref"],
              "rows": [{"tokens": 2, "max_abs_err_vs_ref": err}]}, args.json)
        return 0
    copy_gbps = timing.copy_bandwidth(args.repeats)
    tokens = (1, 64) if args.quick else DECODE + (PREFILL,)
    rows = [measure(t, args.repeats, copy_gbps) for t in tokens]
    emit({
        "benchmark": f"dsv4 fused QK RMSNorm (64 q heads, 1 k head, D 512, bf16); copy bandwidth {copy_gbps:.0f} GB/s",
        "device": timing.device_name(), "providers": "triton (sgl_hip_kernels.dsv4.qk_norm) vs torch ops",
        "columns": ["tokens", "fused_us", "torch_us", "floor_us", "fused/floor", "torch/fused", "bytes", "GBps", "pct_copy_bw",
                    "kernels_fused", "kernels_torch", "max_abs_err_vs_ref"],
        "rows": rows,
    }, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

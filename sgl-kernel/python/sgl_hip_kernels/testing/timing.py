"""Timing for microsecond GPU work: CUDA graphs, interleaved arms, median with p20/p80.

Decode work is microseconds long, so each measurement replays a CUDA graph that holds ``calls``
invocations and divides by ``calls``; the arms of an A/B comparison are replayed alternately so that
clock and thermal drift fall on both. Warm-up replays are excluded. Before every replay a read of
twice the L2 size flushes the cache (so one arm's dirty lines do not slow the next, and the replay's
submission is hidden behind it). Absolute times only come from a GPU: on the CPU these helpers
refuse to time.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Sequence

import torch
import triton


@triton.jit
def _empty_kernel(x_ptr):
    pass


def empty_launch(x: torch.Tensor, programs: int = 1) -> None:
    """One launch of an empty Triton kernel on ``programs`` programs: the floor a benchmark's
    one-launch kernels are measured against."""
    _empty_kernel[(programs,)](x)


@dataclasses.dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float

    def __str__(self) -> str:
        return f"{self.median_us:.2f} [{self.p20_us:.2f}, {self.p80_us:.2f}]"


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarise(samples_us: Sequence[float]) -> Timing:
    return Timing(statistics.median(samples_us), _quantile(samples_us, 0.2), _quantile(samples_us, 0.8))


def capture(fn: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` back-to-back invocations of ``fn`` (after an eager warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return graph


_FLUSH: dict = {}


def _flush_l2() -> None:
    if "buf" not in _FLUSH:
        size = 2 * max(torch.cuda.get_device_properties(0).L2_cache_size, 32 << 20)
        _FLUSH["buf"] = torch.ones(size // 4, dtype=torch.float32, device="cuda")
        _FLUSH["out"] = torch.empty((), dtype=torch.float32, device="cuda")
    torch.sum(_FLUSH["buf"], dim=0, out=_FLUSH["out"])


def time_graphs(graphs: dict[str, torch.cuda.CUDAGraph], calls: int, repeats: int = 50,
                warmup: int = 5) -> dict[str, list[float]]:
    """Replay every graph ``repeats`` times, interleaved, and return the µs-per-call samples of each
    (sample i of every graph comes from the same round, so paired differences cancel drift)."""
    if not torch.cuda.is_available():
        raise RuntimeError("absolute times come from a GPU only")
    samples: dict[str, list[float]] = {name: [] for name in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(warmup + repeats):
        for name, graph in graphs.items():
            # Read a buffer twice L2's size first: the previous arm's dirty lines are written back
            # now, not during this arm (a heavy arm would otherwise slow the next one down), and the
            # GPU is busy while the CPU submits the replay, so the start event does not time that.
            _flush_l2()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            if i >= warmup:
                samples[name].append(start.elapsed_time(end) * 1000.0 / calls)
    return samples


def paired_saving(before: Sequence[float], after: Sequence[float]) -> Timing:
    """Median [p20, p80] of the per-round differences ``before[i] - after[i]``."""
    return summarise([b - a for b, a in zip(before, after)])


def gpu_kernels(fn: Callable[[], object]) -> list[str]:
    """Names of the GPU kernels (and device copies) one eager call of ``fn`` launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def count_gpu_kernels(fn: Callable[[], object]) -> int:
    return len(gpu_kernels(fn))


def copy_bandwidth(repeats: int, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy GB/s (bytes read + written) of ``nbytes`` (fp32 ``copy_``), measured now:
    the bandwidth a bandwidth-bound kernel is reported against."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    us = summarise(time_graphs({"copy": capture(lambda: dst.copy_(src), 2)}, 2, repeats)["copy"]).median_us
    return 2 * nbytes / (us * 1e-6) / 1e9


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def arms_vs_ours(arms: dict, sets: list, repeats: int, floor_on: str, moved: int, copy_gbps: float,
                 flops: int | None = None) -> dict:
    """Time ``arms`` (name -> one call on an input set; ``ours`` among them) and the one-launch floor
    (an empty launch on ``set[floor_on]``), each a CUDA graph of one call per set, replays interleaved.
    Returns the table columns: ``<arm>_us`` (median [p20, p80]), ``<arm>/ours``, ``ours/floor``, and
    ``moved`` bytes as GB/s and % of ``copy_gbps`` (plus TFLOP/s for ``flops``)."""
    arms = dict(arms, floor=lambda s: empty_launch(s[floor_on]))
    graphs = {name: capture(lambda fn=fn: [fn(s) for s in sets], 1) for name, fn in arms.items()}
    t = {name: summarise(v) for name, v in time_graphs(graphs, len(sets), repeats).items()}
    us = t["ours"].median_us
    gbps = moved / (us * 1e-6) / 1e9
    columns = {f"{name}_us": str(v) for name, v in t.items()}
    columns.update({f"{name}/ours": round(v.median_us / us, 2) for name, v in t.items() if name not in ("ours", "floor")})
    columns.update({"ours/floor": round(us / t["floor"].median_us, 2), "bytes": moved, "GBps": round(gbps, 1),
                    "pct_copy_bw": round(100 * gbps / copy_gbps, 1)})
    if flops is not None:
        columns["TFLOPs"] = round(flops / (us * 1e-6) / 1e12, 1)
    return columns

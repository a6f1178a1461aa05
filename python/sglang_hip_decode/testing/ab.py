"""Patched-vs-unpatched runs of one call, for the decode benchmarks: a copy audit of one eager call per
arm and, on a GPU, the kernels of one call and interleaved CUDA-graph timings."""

from __future__ import annotations

import dataclasses
from typing import Callable

from sgl_hip_kernels.testing import timing

from .. import patching
from .audit import CopyAudit


@dataclasses.dataclass
class ArmResult:
    audit: object  # a CopyAudit of one eager call
    kernels: float | None  # GPU kernels per call (None on the CPU)
    samples: list[float] | None  # µs per call, one per round (None on the CPU)


def ab_runs(call: Callable[[], object], arms: dict, calls: int, repeats: int, gpu: bool) -> dict[str, ArmResult]:
    """Run ``call`` under each arm (``{name: patches to apply}``): a copy audit of one eager call, and
    on a GPU the kernels of one call and µs-per-call samples from interleaved CUDA-graph replays
    (``calls`` calls per graph)."""
    audits, kernels, graphs = {}, {}, {}
    for name, patches in arms.items():
        with patching.applied(*patches):
            with CopyAudit() as audit:
                call()
            audits[name] = audit
            if gpu:
                kernels[name] = timing.count_gpu_kernels(call)
                graphs[name] = timing.capture(call, calls)
    samples = timing.time_graphs(graphs, calls, repeats) if gpu else {}
    return {name: ArmResult(audits[name], kernels.get(name), samples.get(name)) for name in arms}


def upstream_vs_ours_row(runs: dict[str, ArmResult], errors: dict[str, float], **fields) -> dict:
    """One row of a GPU patch benchmark whose arms are ``"upstream"`` and ``"ours"``: ``fields``, the
    ratio of their medians (``speedup``: upstream/ours), then each arm's median, p20 and p80 µs, its
    GPU kernels per call and its ``errors`` entry."""
    t = {arm: timing.summarise(r.samples) for arm, r in runs.items()}
    row = dict(fields, speedup=t["upstream"].median_us / t["ours"].median_us)
    for arm, r in runs.items():
        row.update({f"{arm}_us": t[arm].median_us, f"{arm}_p20_us": t[arm].p20_us, f"{arm}_p80_us": t[arm].p80_us,
                    f"{arm}_kernels": r.kernels, f"err_{arm}": errors[arm]})
    return row

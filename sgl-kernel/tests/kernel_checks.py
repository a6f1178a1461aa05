"""Helpers shared by the kernel tests: tolerances derived from torch's own error, and CUDA-graph
replay checks."""

from __future__ import annotations

import torch


def assert_within_torch_error(out: torch.Tensor, ref: torch.Tensor, torch_same: torch.Tensor, what: str = "") -> None:
    """``|out - ref| <= 2 * max|torch_same - ref| + floor`` elementwise-max, where ``ref`` is the fp32
    (or fp64) reference and ``torch_same`` is torch computing the same thing in ``out``'s precision.
    The floor is the rounding of the reference itself to ``out``'s dtype ((ref + 0.3 - 0.3) - ref in
    that dtype), so exact-at-rounding outputs are never refused."""
    ref = ref.double()
    err = (out.double() - ref).abs()
    torch_err = (torch_same.double() - ref).abs().max()
    floor = ((ref.to(out.dtype) + 0.3 - 0.3).double() - ref).abs().max()
    bound = 2 * torch_err + floor
    assert not torch.isnan(out).any() or torch.equal(torch.isnan(out), torch.isnan(ref)), f"{what}: NaN where the reference has none"
    worst = err.nan_to_num(0).max().item()
    assert worst <= bound.item(), f"{what}: max err {worst:.3e} > bound {bound.item():.3e} (torch's own {torch_err.item():.3e})"


def poison(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


def graph_replay_equals_eager(fn, outputs) -> None:
    """Poison ``outputs`` (NaN), run ``fn`` eagerly, poison again, capture ``fn`` in a CUDA graph,
    poison, replay: the replay must equal the eager run bit for bit (and so write what eager wrote)."""
    poison(*outputs)
    fn()
    torch.cuda.synchronize()
    eager = [t.clone() for t in outputs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    poison(*outputs)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outputs, eager):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), "CUDA-graph replay differs from eager"

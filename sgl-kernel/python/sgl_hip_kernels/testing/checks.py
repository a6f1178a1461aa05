"""The checks every test here uses: bit equality, two named accuracy bounds, poisoned outputs and
CUDA-graph replay. Which accuracy bound a test uses says what it claims:

* :func:`assert_within_torch_error` — the kernel errs at most twice as much as torch computing the same
  thing in the kernel's own precision (``torch_same``), plus one rounding of the reference to the
  output's real dtype;
* :func:`assert_within_one_rounding` — the kernel computes in fp32 (at most twice torch's fp32 error)
  and rounds its result once to the output's dtype (bf16, fp8): ``ref32`` is torch's fp32 result.
"""

from __future__ import annotations

import torch


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Same shape, same dtype, the same bytes (any element size: compared as raw bytes)."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731 - 0-d tensors too
    assert torch.equal(as_bytes(a), as_bytes(b)), f"{what}: bits differ"


def _rounding(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest error of rounding ``ref`` once to ``dtype`` (its real dtype, not a widened copy)."""
    return (ref.to(dtype).double() - ref).abs().max()


def _check(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str, detail: str) -> None:
    err = (out.double() - ref).abs()
    nan_ok = not torch.isnan(out).any() or torch.equal(torch.isnan(out), torch.isnan(ref))
    assert nan_ok, f"{what}: NaN where the reference has none"
    worst = err.nan_to_num(0).max().item()
    assert worst <= bound.item(), f"{what}: max err {worst:.3e} > bound {bound.item():.3e} ({detail})"


def assert_within_torch_error(out: torch.Tensor, ref: torch.Tensor, torch_same: torch.Tensor, what: str = "") -> None:
    """``max|out - ref| <= 2 * max|torch_same - ref| + one rounding of ref to out.dtype``: ``ref`` the
    fp64 (or fp32) reference, ``torch_same`` torch computing the same thing in ``out``'s precision.
    Pass ``out`` in its real dtype (a bf16 output as bf16): the rounding floor is taken there."""
    ref = ref.double()
    torch_err = (torch_same.double() - ref).abs().max()
    _check(out, ref, 2 * torch_err + _rounding(ref, out.dtype), what, f"torch's own {torch_err.item():.3e}")


def assert_within_one_rounding(out: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor, what: str = "") -> None:
    """``max|out - ref64| <= 2 * max|ref32 - ref64| + one rounding of ref64 to out.dtype``: a kernel that
    computes in fp32 (``ref32``: torch's fp32 result) and stores in ``out``'s dtype."""
    ref64 = ref64.double()
    fp32_err = (ref32.double() - ref64).abs().max()
    _check(out, ref64, 2 * fp32_err + _rounding(ref64, out.dtype), what, f"torch's fp32 {fp32_err.item():.3e}")


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
    assert len(outputs) == len(eager) and outputs, "no outputs to compare"
    for got, want in zip(outputs, eager):
        assert_bits_equal(got, want, "CUDA-graph replay vs eager")

"""The pytest set-up every test suite of this repository shares (registered by both conftest.py files):
seeds, the ``gpu`` marker, the Triton interpreter on the CPU, and no false greens.

* Every test starts from ``torch.manual_seed(0)``; ``rng`` gives a CPU ``torch.Generator`` seeded
  from the test's file name and id, so each case gets its own fresh inputs, identical on every
  machine and from either the repository root or ``sgl-kernel/``.
* ``@pytest.mark.gpu`` tests are skipped where no GPU is visible; there, Triton kernels run under
  ``TRITON_INTERPRET=1`` (fp32: the interpreter's bf16/fp8 arithmetic is not trustworthy).
* Under the interpreter ``tl.dot`` of floating-point operands is computed in fp64 (torch's matmul)
  plus the accumulator, rounded once to the accumulator's dtype: fp32 matmuls, numpy's or torch's,
  round in an order that depends on the BLAS build and the CPU (numpy's erred up to 4x torch's on
  an AVX2-only CPU; torch's 64-long tiles put a kernel's log-sum-exp 2.4 ulp off on an AVX-512 CI
  machine and within the bound on another), so a kernel's error measured against "torch's own
  error" would depend on the machine. The interpreter then tests a kernel's algorithm (its tiles,
  online softmax, split combine, roundings) with exact dots; the GPU tests cover the hardware's.
* Under the interpreter a float conversion to a narrower type (fp32 -> bf16 / fp16 / fp8, implicit
  in a store too) rounds to nearest even, as the GPUs do, through torch; e4m3 saturates finite
  values and infinities to +-max as NVIDIA's ``satfinite`` does (AMD's saturation not checked);
  e5m2 overflows to inf (torch's rule); other rounding modes (RTZ) keep the interpreter's own
  (truncation, unsaturated). The interpreter's own RTNE-less path truncates to bf16 and gets fp8
  wrong (0.4916 -> 0.25, 7.77 -> 4.0 in e4m3), so a kernel that quantises, or one of upstream's
  Triton store kernels run on the CPU, would be tested against values no GPU makes.
* The run fails when tests were collected and every one of them was skipped: a green suite that
  tested nothing on this machine is a false green (decided by the controller under pytest-xdist,
  which receives every worker's reports).
"""

from __future__ import annotations

import inspect
import os
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; it must be on before any
# @triton.jit kernel module is imported (triton reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _torch_dot():
    """The interpreter's ``create_dot`` with torch's matmul for floating-point operands."""
    import numpy as np
    from triton.runtime import interpreter

    numpy_dot = interpreter.InterpreterBuilder.create_dot
    expected = ["self", "a", "b", "d", "input_precision", "max_num_imprecise_acc"]
    if list(inspect.signature(numpy_dot).parameters) != expected:
        raise RuntimeError(f"the Triton interpreter's create_dot is not {expected}: update _torch_dot for this Triton")

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        floating = all(np.issubdtype(x.data.dtype, np.floating) for x in (a, b, d))
        if not floating or 8 in (a.dtype.primitive_bitwidth, b.dtype.primitive_bitwidth):
            # integer dots are exact; bf16 and fp8 operands (stored as uint16 / uint8 arrays) keep the
            # interpreter's own conversion and numpy's matmul
            return numpy_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        x, y = (torch.from_numpy(np.ascontiguousarray(t.data)).double() for t in (a, b))
        acc = (torch.matmul(x, y) + torch.from_numpy(np.ascontiguousarray(d.data)).double()).numpy()
        return interpreter.TensorHandle(acc.astype(d.data.dtype), d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _torch_float_casts():
    """The interpreter's ``_convert_float`` through torch for the float types torch has (RTNE)."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    own = interpreter._convert_float
    as_torch = {getattr(tl, t).name: getattr(torch, n) for t, n in
                (("float8e4nv", "float8_e4m3fn"), ("float8e4b8", "float8_e4m3fnuz"), ("float8e5", "float8_e5m2"),
                 ("float8e5b16", "float8_e5m2fnuz"), ("bfloat16", "bfloat16"), ("float16", "float16"),
                 ("float32", "float32"), ("float64", "float64")) if hasattr(torch, n)}
    e4m3 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n)}
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

    def convert(input, input_dtype, output_dtype, rounding_mode):
        src, dst = as_torch.get(input_dtype.name), as_torch.get(output_dtype.name)
        if src is None or dst is None or rounding_mode not in (None, ir.ROUNDING_MODE.RTNE):
            return own(input, input_dtype, output_dtype, rounding_mode)
        raw = torch.from_numpy(np.ascontiguousarray(input).view(np.uint8).copy())
        x = raw.view(src) if src.itemsize == 1 else raw.view(ints[src.itemsize]).view(src)
        if dst in e4m3 and x.dtype not in e4m3:  # saturate (NaN stays NaN)
            top = torch.finfo(dst).max
            x = torch.where(x.isnan(), x, x.clamp(-top, top))
        y = x.to(dst)
        out = y.view(torch.uint8) if dst.itemsize == 1 else y.view(ints[dst.itemsize])
        width = output_dtype.primitive_bitwidth
        return out.numpy().view(getattr(np, f"uint{width}")).reshape(np.shape(input))

    interpreter._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _torch_dot()
    _torch_float_casts()

_outcomes = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA/ROCm GPU (skipped elsewhere)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def rng(request):
    """A CPU generator seeded from the test's file name and id (not its path, so the inputs do not
    depend on where pytest was started): fresh inputs per case, the same on every run."""
    gen = torch.Generator(device="cpu")
    key = request.node.path.name + "::" + request.node.nodeid.split("::", 1)[1]
    gen.manual_seed(zlib.crc32(key.encode()))
    return gen


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[report.outcome] = _outcomes.get(report.outcome, 0) + 1


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return  # a pytest-xdist worker: its reports reach the controller, which decides for the run
    ran = _outcomes["passed"] + _outcomes["failed"]
    if session.testscollected and ran == 0 and _outcomes["skipped"]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        _outcomes["all_skipped"] = True


def pytest_terminal_summary(terminalreporter):
    if _outcomes.get("all_skipped"):
        terminalreporter.write_line("FAILED: every collected test was skipped on this machine", red=True)

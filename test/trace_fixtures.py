"""Chrome traces as torch.profiler writes them, built in code: CPU step spans and launches, GPU kernels
tied to their launch by correlation (eager, or one graph launch for a whole step). Used by the
trace-diff tests and by the stand-in server's /start_profile."""

from __future__ import annotations

import gzip
import json

CAT_CUDA = ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, "
            "unsigned int, 3, {n}, 64>(at::native::(anonymous namespace)::OpaqueType<2u>*, at::native::(anonymous "
            "namespace)::CatArrInputTensorMetadata<at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, "
            "{n}, 64>, at::native::(anonymous namespace)::TensorSizeStride<unsigned int, 4u>, int, unsigned int)")
COPY_CUDA = ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::"
             "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::"
             "operator()() const::{lambda(c10::BFloat16)#1}>(at::TensorIteratorBase&, at::native::direct_copy_kernel_cuda"
             "(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::"
             "{lambda(c10::BFloat16)#1} const&)::{lambda(int)#1}>(int, at::native::gpu_kernel_impl_nocast<...>)")
FILL = ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >"
        "(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)")


def event(cat, name, ts, dur, pid, tid, **args) -> dict:
    """One complete ("X") chrome-trace event."""
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid,
            **({"args": args} if args else {})}


class Trace:
    """A chrome trace as torch.profiler writes one: CPU step spans and launches, GPU kernels by correlation."""

    def __init__(self, rocm: bool):
        self.rocm, self.events, self.t, self.corr = rocm, [], 1000.0, 1

    def event(self, cat, name, ts, dur, pid, tid, **args):
        self.events.append(event(cat, name, ts, dur, pid, tid, **args))

    def step(self, label: str, kernels: list[tuple[str, float]], graph: bool = False, gpu_span_only: bool = False):
        """One forward: a span on the scheduler thread, launches inside it, the kernels on the stream after it."""
        start = self.t
        launch = ("hipGraphLaunch" if self.rocm else "cudaGraphLaunch") if graph else \
                 ("hipLaunchKernel" if self.rocm else "cudaLaunchKernel")
        gpu_t = start + 5
        gcorr = self.corr
        for i, (name, dur) in enumerate(kernels):
            if not graph or i == 0:
                corr = self.corr
                self.corr += 1
                self.event("cuda_runtime", launch, start + 1 + i, 0.5, 100, 1, correlation=corr)
            corr = gcorr if graph else corr
            args = {} if gpu_span_only else {"correlation": corr}
            self.event("kernel", name, gpu_t, dur, 0, 7, stream=7, **args)
            gpu_t += dur + 0.25
        self.event("user_annotation", label, start, len(kernels) + 2, 100, 1)
        self.event("gpu_user_annotation", label, start + 5, gpu_t - start - 5, 0, 7)
        self.t = gpu_t + 10

    def write(self, path, gz: bool = False):
        text = json.dumps({"schemaVersion": 1, "traceEvents": self.events + [{"ph": "M", "name": "process_name"}]})
        if gz:
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
        return path

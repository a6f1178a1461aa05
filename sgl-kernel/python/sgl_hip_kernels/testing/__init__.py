"""Benchmark infrastructure (CUDA-graph timing, result tables): used by the benchmarks of this package
and of sglang-hip-decode, never by a kernel."""

"""Upstream code paths assembled from their real pieces, shared by parity tests and benchmarks."""

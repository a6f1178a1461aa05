"""Test set-up for test/ and sgl-kernel/tests/: the shared plugin (seeds, ``rng``, the ``gpu`` marker,
the Triton interpreter on the CPU, no false greens: ``sgl_hip_kernels.testing.pytest_plugin``), and
the kernel providers resolved during the session, printed at the end."""

from __future__ import annotations

pytest_plugins = ["sgl_hip_kernels.testing.pytest_plugin"]


def pytest_terminal_summary(terminalreporter):
    try:
        from sglang_hip_decode.testing import providers

        terminalreporter.write_line(f"kernel providers used: {providers.describe_used()}")
    except Exception as exc:  # reporting must not hide the real result
        terminalreporter.write_line(f"kernel providers: unavailable ({exc})")

"""Test set-up for test/ and sgl-kernel/tests/: the shared plugin (seeds, ``rng``, the ``gpu`` marker,
the Triton interpreter on the CPU, no false greens: ``sgl_hip_kernels.testing.pytest_plugin``), and
the kernel providers resolved during the session, printed at the end (under pytest-xdist, those of
every worker)."""

from __future__ import annotations

import pytest

pytest_plugins = ["sgl_hip_kernels.testing.pytest_plugin"]

_worker_providers: dict[str, str] = {}


def _providers():
    from sglang_hip_decode.testing import providers

    return providers


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand its providers to the controller
        session.config.workeroutput["providers"] = _providers().used()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _worker_providers.update(getattr(node, "workeroutput", {}).get("providers", {}))


def pytest_terminal_summary(terminalreporter):
    try:
        providers = _providers()
        terminalreporter.write_line(f"kernel providers used: {providers.describe({**providers.used(), **_worker_providers})}")
    except Exception as exc:  # reporting must not hide the real result
        terminalreporter.write_line(f"kernel providers: unavailable ({exc})")

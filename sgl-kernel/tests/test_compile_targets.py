"""Every Triton kernel a patch runs on a ROCm server compiles for gfx950 (MI355X), gfx942 (MI300X /
MI325X) and sm_90 (``sgl_hip_kernels.testing.compile_targets``, one subprocess per architecture:
without the interpreter, which the CPU suite runs under and which compiles nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = ("gfx950", "gfx942", "sm90")
N_KERNELS = 19  # 3 sparse decode / combine; decode: 4 compress into out, 5 into the caches; prefill: 5 into the caches, 2 copies


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_kernels_compile_for(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sgl_hip_kernels.testing.compile_targets", arch], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == N_KERNELS, proc.stdout + proc.stderr[-2000:]
    failed = [f"{r['kernel']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, f"{arch}:\n" + "\n".join(failed)

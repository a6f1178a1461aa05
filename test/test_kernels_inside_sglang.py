"""Every Triton kernel of ``sgl_hip_kernels`` can still be launched once SGLang is imported.

SGLang rebinds ``triton.next_power_of_2`` to a plain Python function when ``sglang.srt.utils.common``
is imported (every release here). Triton refuses a jit body that calls a plain function ("Unsupported
function referenced", raised while it hashes the kernel for its cache, before any compile), so a kernel
calling ``triton.next_power_of_2`` inside its body works in the kernel tests and fails at its first
launch inside a server. The H200 run of dsv4-fused-compress found it; the kernel tests never import SGLang.

The check is Triton's own: each kernel's ``cache_key`` (the dependency walk a launch starts with), in a
subprocess without ``TRITON_INTERPRET`` (interpreted kernels are not ``JITFunction``s), after SGLang's
import has done its rebinding. CPU only; no GPU is needed to hash a kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import importlib, json, pkgutil
import triton
from triton.runtime.jit import JITFunction
import sgl_hip_kernels
from sglang_hip_decode.testing.sglang_import import import_modules

modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(sgl_hip_kernels.__path__, "sgl_hip_kernels.")]
original = triton.next_power_of_2
import_modules("sglang.srt.utils.common")
report = {"rebound": triton.next_power_of_2 is not original, "kernels": 0, "failures": []}
for module in modules:
    for name, value in sorted(vars(module).items()):
        if isinstance(value, JITFunction) and value.__module__ == module.__name__:
            report["kernels"] += 1
            try:
                value.cache_key
            except Exception as e:  # the report is the point
                report["failures"].append(f"{module.__name__}.{name}: {type(e).__name__}: {e}")
print(json.dumps(report))
"""


def test_every_kernel_hashes_after_sglangs_triton_rebinding():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rebound"], "SGLang no longer rebinds triton.next_power_of_2: this test checks nothing; revisit it"
    assert report["kernels"] >= 30, report  # 35 when written: every module's kernels were found
    assert not report["failures"], "\n".join(report["failures"])

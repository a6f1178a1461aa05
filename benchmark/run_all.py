"""`make bench`: run every decode and kernel benchmark, then print one table.

Each ``benchmark/decode/bench_*.py`` and ``sgl-kernel/benchmark/bench_*.py`` is run as its own
process with ``--json FILE`` (plus ``--quick`` unless ``--full`` is given: production shapes take
minutes on a GPU and far longer on the CPU). A benchmark writes
``{"benchmark", "device", "providers", "columns", "rows"}``; this script prints each table under a
heading that names the device and the providers, and exits non-zero if any benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sgl_hip_kernels.testing.report import render

ROOT = Path(__file__).resolve().parents[1]
SEARCH = (ROOT / "benchmark" / "decode", ROOT / "sgl-kernel" / "benchmark")


def discover() -> list[Path]:
    return sorted(p for d in SEARCH if d.is_dir() for p in d.glob("bench_*.py"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="production shapes (default: --quick)")
    parser.add_argument("--only", default="", help="substring filter on benchmark file names")
    args = parser.parse_args(argv)
    scripts = [s for s in discover() if args.only in s.name]
    if not scripts:
        print("no benchmarks found under " + ", ".join(str(d.relative_to(ROOT)) for d in SEARCH))
        return 0
    failed = []
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():  # the kernel benchmarks check their kernels under the interpreter
        env.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        for script in scripts:
            out = Path(tmp) / (script.stem + ".json")
            cmd = [sys.executable, str(script), "--json", str(out)] + ([] if args.full else ["--quick"])
            proc = subprocess.run(cmd, cwd=ROOT, env=env)
            if proc.returncode != 0 or not out.exists():
                failed.append(script.name)
                continue
            print(render(json.loads(out.read_text())))
            print()
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

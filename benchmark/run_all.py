"""`make bench`: run every decode and kernel benchmark, then print one table.

Each ``benchmark/decode/bench_*.py`` and ``sgl-kernel/benchmark/bench_*.py`` is run as its own
process with ``--json FILE`` (plus ``--quick`` unless ``--full`` is given: production shapes take
minutes on a GPU and far longer on the CPU). A benchmark writes
``{"benchmark", "device", "providers", "columns", "rows"}``; this script prints a progress line per
benchmark (stderr), then each table under a heading that names the device and the providers (units in
the column headers), then a summary, and exits non-zero if any benchmark failed (its output shown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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
    failed, tables = [], []
    # sglang's modules warn at import about what this machine lacks (Triton, AWQ, GGUF on the CPU):
    # not the benchmark's business. Failures still print the benchmark's whole stderr.
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:  # the kernel benchmarks check their kernels under the interpreter
        env.setdefault("TRITON_INTERPRET", "1")
    print(f"make bench: {len(scripts)} benchmarks, {'production' if args.full else '--quick'} shapes, on "
          + (f"{torch.cuda.get_device_name(0)}: times are measured" if gpu else
             "the CPU: only copy audits, kernel counts and the Triton kernels' correctness under the interpreter "
             "are measured here; times come from a GPU"), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, script in enumerate(scripts, 1):
            out = Path(tmp) / (script.stem + ".json")
            cmd = [sys.executable, str(script), "--json", str(out)] + ([] if args.full else ["--quick"])
            start = time.monotonic()
            shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
            print(f"[{i}/{len(scripts)}] {shown} ...", end=" ", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            took = time.monotonic() - start
            if proc.returncode != 0 or not out.exists():
                print(f"FAILED after {took:.0f} s (exit {proc.returncode})", file=sys.stderr, flush=True)
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                failed.append(script.name)
                continue
            result = json.loads(out.read_text())
            print(f"ok, {len(result['rows'])} rows, {took:.0f} s", file=sys.stderr, flush=True)
            tables.append(render(result))
    print("\n\n".join(tables))
    print(f"\nsummary: {len(scripts) - len(failed)} of {len(scripts)} benchmarks ran"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Pack an installed sglang release (``.releases/<version>``, from ``make releases``) for the GPU
machine: its Python files, its JIT kernel sources (``.cuh``/``.h``/``.cu``: upstream's DSV4 kernels
compile there at first use) and its ``dist-info`` (the plugin reads the release from it), into
``.releases/device/sglang-<version>.zip`` (9 MB for 0.5.13.post1, 19 MB for 0.5.23: carry that path
beside ``.whl`` (38 MB); the whole wheel would not fit in one 64 MB carry). On the device: ``python3
-c "import zipfile; zipfile.ZipFile(Z).extractall(D)"`` and put ``D`` first on PYTHONPATH (before
``/tmp/site``, which holds 0.5.11).

Usage: tools/pack-release-for-device.py 0.5.23 [0.5.13.post1 ...]
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP = (".py", ".cuh", ".h", ".cu", ".cpp", ".hpp")


def pack(version: str) -> Path:
    tree = ROOT / ".releases" / version
    if not (tree / "sglang").is_dir():
        raise SystemExit(f"{tree} has no sglang: run `make releases` (it installs the parity releases)")
    dist = [p for p in tree.glob(f"sglang-{version}.dist-info")]
    if not dist:
        raise SystemExit(f"{tree} has no sglang-{version}.dist-info")
    out = ROOT / ".releases" / "device" / f"sglang-{version}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    files = [p for p in (tree / "sglang").rglob("*") if p.is_file() and p.suffix in KEEP]
    files += [p for p in dist[0].rglob("*") if p.is_file()]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(files):
            z.write(p, p.relative_to(tree).as_posix())
    print(f"{out.relative_to(ROOT)}: {len(files)} files, {out.stat().st_size / 1e6:.1f} MB")
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for v in sys.argv[1:]:
        pack(v)

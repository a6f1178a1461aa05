"""`make wheel`: build the pure-Python wheel of both packages (sglang_hip_decode and sgl_hip_kernels)
into a folder, offline (no build isolation: setuptools and wheel come from the environment), from a
copy of the sources so the checkout is left as it was. Prints the wheel's path.

    python tools/build_wheel.py OUT_DIR
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "python", "sgl-kernel/python"]


def build(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-src-") as tmp:
        src = Path(tmp) / "src"
        for rel in SOURCES:
            target = src / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / rel).is_dir():
                shutil.copytree(ROOT / rel, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(ROOT / rel, target)
        before = set(out_dir.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "-w", str(out_dir), str(src)], check=True)
    made = sorted(set(out_dir.glob("sglang_hip_decode-*.whl")) - before) or sorted(out_dir.glob("sglang_hip_decode-*.whl"))
    if not made or not made[-1].name.endswith("-py3-none-any.whl"):
        raise SystemExit(f"build_wheel: no pure-Python wheel in {out_dir}: {[p.name for p in made]}")
    return made[-1]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(build(Path(sys.argv[1])))

"""The offline install a GPU host does: `make wheel`'s pure-Python wheel into a bare venv with
`pip install --no-deps --no-index`, no network and no torch; the plugin imports, SGLang's entry point
and the CLI are there, and the kernel library ships whole."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import build_wheel  # noqa: E402


def _build_leftovers() -> set[Path]:
    return {p for p in [ROOT / "build", *ROOT.glob("**/*.egg-info")] if p.exists() and ".venv" not in p.parts}


def test_offline_wheel_installs_into_a_bare_venv(tmp_path):
    before = _build_leftovers()
    wheel = build_wheel.build(tmp_path / "dist")
    assert _build_leftovers() == before  # built from a copy: the checkout gets no build/ or egg-info
    assert wheel.name.startswith("sglang_hip_decode-") and wheel.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("sglang_hip_decode/__init__.py", "sglang_hip_decode/patches/nsa_cat_skip.py",
                   "sgl_hip_kernels/__init__.py", "sgl_hip_kernels/kernels/splitk.py",
                   "sgl_hip_kernels/dsv4/kernels/sparse_decode.py", "sgl_hip_kernels/indexer_k_cache.py"):
        assert module in names, module
    assert not [n for n in names if n.startswith(("test/", "tests/")) or "__pycache__" in n]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # pip from ensurepip: offline
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check",
                    str(wheel)], check=True)
    code = ("import importlib.metadata as m, importlib.util as u, sglang_hip_decode, sgl_hip_kernels;"
            "eps = [e.value for e in m.entry_points(group='sglang.srt.plugins')];"
            "assert eps == ['sglang_hip_decode:register'], eps;"
            "assert u.find_spec('torch') is None;"
            "print(len(sgl_hip_kernels.PROVIDERS))")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True).stdout
    assert int(out) >= 7
    cli = subprocess.run([str(venv / "bin" / "sglang-hip-decode"), "--help"], capture_output=True, text=True)
    assert cli.returncode == 0 and "status" in cli.stdout

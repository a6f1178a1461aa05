"""testing.upstream: the benchmarks' loader of upstream kernels from a release wheel, on a wheel made
here (two files that import each other relatively and absolutely, one absolute sglang import answered
by a stand-in, and an import-time TRITON_CACHE_DIR side effect like 0.5.13's DSV4 decode)."""

from __future__ import annotations

import os
import sys
import zipfile

import pytest

from sgl_hip_kernels.testing import upstream

PKG = "sglang/kernels/ops/fake"
FILES = {
    f"{PKG}/base.py": "import os\nfrom sglang.srt.utils import core_count\n"
                      "os.environ.setdefault('TRITON_CACHE_DIR', '/nowhere')\nCORES = core_count()\n"
                      "def twice(x):\n    return 2 * x\n",
    f"{PKG}/top.py": "from .base import twice\nfrom sglang.kernels.ops.fake.base import CORES\n"
                     "def run(x):\n    return twice(x) + CORES\n",
    "sglang/other.py": "raise RuntimeError('must not be imported')\n",
}


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / "sglang-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in FILES.items():
            z.writestr(name, text)
    return path


def test_loads_from_a_wheel_without_leaving_sglang_behind(wheel, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    sglang_before = {name: mod for name, mod in sys.modules.items() if name == "sglang" or name.startswith("sglang.")}
    mods = upstream.load(str(wheel), PKG, ["base", "top"], stubs={"sglang.srt.utils": {"core_count": lambda: 3}},
                         aliases={"sglang.kernels.ops.fake.base": "base"})
    assert mods["top"].run(5) == 13
    # No sglang module added or replaced (the real sglang may be imported in this process already).
    assert {name: mod for name, mod in sys.modules.items() if name == "sglang" or name.startswith("sglang.")} == sglang_before
    assert "TRITON_CACHE_DIR" not in os.environ  # the upstream module's setdefault is undone


def test_a_folder_and_clear_errors(wheel, tmp_path):
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(folder)
    mods = upstream.load(str(folder), PKG, ["base"], stubs={"sglang.srt.utils": {"core_count": lambda: 1}})
    assert mods["base"].twice(4) == 8 and mods["base"].CORES == 1
    assert mods["base"].__file__.startswith(str(folder))
    with pytest.raises(FileNotFoundError, match="has no sglang/absent"):
        upstream.load(str(wheel), "sglang/absent", ["x"])
    with pytest.raises(FileNotFoundError, match="neither a folder nor a wheel"):
        upstream.load(str(tmp_path / "missing.whl"), PKG, ["base"])

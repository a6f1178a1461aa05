"""Dependencies point one way: the kernel library imports nothing of the plugin (every module of it
imported with ``sglang_hip_decode`` made unimportable), and its tests and benchmarks run that way
from ``sgl-kernel/`` on their own; the runtime imports neither torch nor sglang nor its own test
infrastructure; a patch file imports only the declarations."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run first in a child Python: makes the plugin package unimportable, as if only sgl-kernel/ were installed.
BLOCK_PLUGIN = textwrap.dedent("""
    import sys
    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name == "sglang_hip_decode" or name.startswith("sglang_hip_decode."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: the kernel library must stand alone)")
            return None
    sys.meta_path.insert(0, _Blocked())
""")


def run_python(code: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_module_imports_without_the_plugin():
    proc = run_python(BLOCK_PLUGIN + textwrap.dedent("""
        import importlib, pkgutil
        import sgl_hip_kernels
        names = [m.name for m in pkgutil.walk_packages(sgl_hip_kernels.__path__, "sgl_hip_kernels.")]
        for name in names:
            importlib.import_module(name)
        assert not any(m.startswith("sglang_hip_decode") for m in sys.modules), sorted(sys.modules)
        print("IMPORTED", len(names))
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 20  # every module of the package, counted


def test_kernel_tests_and_benchmarks_run_from_sgl_kernel_alone():
    proc = run_python(BLOCK_PLUGIN + "import pytest\nsys.exit(pytest.main(['-q', '-p', 'no:cacheprovider']))",
                      cwd=ROOT / "sgl-kernel", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 50, summary
    benches = sorted((ROOT / "sgl-kernel" / "benchmark").glob("bench_*.py"))
    assert len(benches) >= 2, benches
    for bench in benches:
        proc = run_python(BLOCK_PLUGIN + f"import runpy\nsys.argv = [{str(bench)!r}, '--quick']\n"
                          f"runpy.run_path({str(bench)!r}, run_name='__main__')", cwd=ROOT / "sgl-kernel")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert proc.stdout.startswith("## "), proc.stdout[:500]  # the shared table format


def test_the_runtime_imports_neither_torch_nor_sglang_nor_its_test_infrastructure():
    proc = run_python(textwrap.dedent("""
        import sys
        import sglang_hip_decode, sglang_hip_decode.gates, sglang_hip_decode.patching, sglang_hip_decode.patches
        import sglang_hip_decode.tracediff, sglang_hip_decode.profiling  # trace-diff runs where torch is absent
        from sglang_hip_decode.patches import catalog
        catalog()  # every patch file
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "sglang", "sgl_hip_kernels")
               or m.startswith("sglang_hip_decode.testing")]
        assert not bad, bad
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]


def imports_of(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against ``package``."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            # ``from .. import x`` may import a submodule x: count both forms
            found |= {module} | ({f"{module}.{alias.name}" for alias in node.names} if not node.module else set())
    return found


def test_patch_files_import_only_the_declarations():
    files = sorted((ROOT / "python" / "sglang_hip_decode" / "patches").glob("*.py"))
    assert len(files) >= 4
    for path in files:
        imported = imports_of(path, "sglang_hip_decode.patches")
        ours = {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names}
        assert ours <= {"sglang_hip_decode.declare"}, (path.name, ours)


def test_the_import_check_catches_what_it_should(tmp_path):
    # The checker itself, on the imports a patch file must not have.
    for line in ("from .. import patching", "from sglang_hip_decode.patching import Patch", "import torch",
                 "from ..testing import audit"):
        bad = tmp_path / "bad.py"
        bad.write_text(line + "\n")
        imported = imports_of(bad, "sglang_hip_decode.patches")
        assert {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names} - {"sglang_hip_decode.declare"}, line


def test_both_distributions_list_every_package():
    # setuptools installs only the packages pyproject names; the editable install maps the top-level
    # ones, so a subpackage missing from the list would import in every test and be absent from the
    # wheel.
    import tomllib

    def packages_under(root: Path, name: str) -> set[str]:
        return {".".join(p.relative_to(root).parts[:-1]) for p in (root / name).rglob("__init__.py")}

    root_toml = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    kernel_toml = tomllib.loads((ROOT / "sgl-kernel" / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    plugin = packages_under(ROOT / "python", "sglang_hip_decode")
    kernels = packages_under(ROOT / "sgl-kernel" / "python", "sgl_hip_kernels")
    assert set(kernel_toml) == kernels
    assert set(root_toml) == plugin | kernels

"""Import upstream sglang's Triton kernels from a release wheel (or an unpacked release) for a
benchmark to time beside ours, without installing sglang or importing its package tree.

The files of one upstream folder are loaded under a private package name (their relative imports
resolve among themselves); absolute imports of other sglang modules are answered, during the
import only, by the small stand-ins the caller names (``stubs``), and nothing is left in
``sys.modules`` under an ``sglang`` name. Side effects an upstream module has at import on the
environment (0.5.13's DSV4 decode sets ``TRITON_CACHE_DIR`` into its own folder) are undone.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import types
import zipfile
from pathlib import Path

_TEMP = []  # extracted folders live as long as the process (the modules' Triton caches point there)
_LOADS = [0]  # each load gets its own private package name: two sources never share modules


def _folder(source: str, package_dir: str) -> Path:
    """``package_dir`` (e.g. ``sglang/srt/layers/...``) inside ``source``: a wheel or a folder holding ``sglang/``."""
    path = Path(source)
    if path.is_dir():
        found = path / package_dir
        if not found.is_dir():
            raise FileNotFoundError(f"{found} does not exist (is {source} an unpacked sglang release?)")
        return found
    if not zipfile.is_zipfile(path):
        raise FileNotFoundError(f"{source} is neither a folder nor a wheel")
    tmp = tempfile.TemporaryDirectory(prefix="upstream-kernels-")
    _TEMP.append(tmp)
    with zipfile.ZipFile(path) as whl:
        members = [m for m in whl.namelist() if m.startswith(package_dir + "/") and m.endswith(".py")]
        if not members:
            raise FileNotFoundError(f"{source} has no {package_dir}/")
        whl.extractall(tmp.name, members)
    return Path(tmp.name) / package_dir


@contextlib.contextmanager
def _stubbed(stubs: dict[str, dict]):
    saved = {name: sys.modules.get(name) for name in stubs}
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def load(source: str, package_dir: str, modules: list[str], stubs: dict[str, dict] | None = None,
         aliases: dict[str, str] | None = None) -> dict[str, types.ModuleType]:
    """Import ``modules`` (file stems in ``package_dir``) from ``source``; ``aliases`` maps the absolute
    name an upstream file imports a sibling by to that sibling's stem."""
    folder = _folder(source, package_dir)
    _LOADS[0] += 1
    private = f"_upstream{_LOADS[0]}_" + package_dir.replace("/", "_")
    package = types.ModuleType(private)
    package.__path__ = [str(folder)]
    sys.modules[private] = package
    env_before = os.environ.get("TRITON_CACHE_DIR")
    loaded: dict[str, types.ModuleType] = {}
    try:
        for stem in modules:
            extra = {alias: loaded[target].__dict__ for alias, target in (aliases or {}).items() if target in loaded}
            with _stubbed({**(stubs or {}), **extra}):
                loaded[stem] = importlib.import_module(f"{private}.{stem}")
    finally:
        if env_before is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = env_before
    return loaded


def release_wheel(version: str) -> str | None:
    """The sglang ``version`` wheel ``make releases`` fetched into the repository's ``.releases/wheels``
    (None when it is not there)."""
    import glob

    root = Path(__file__).resolve().parents[4]
    found = sorted(glob.glob(str(root / ".releases" / "wheels" / f"sglang-{version}-*.whl")))
    return found[0] if found else None


class PoolShape:
    """The two fields of SGLang's DSA token pool that upstream's index-K store and gather read (page
    64, head_dim 128: the only geometry they take)."""

    index_page_size = 64
    index_head_dim = 128


def dsa_index_k_cache(source: str, preshuffle: bool) -> types.ModuleType:
    """sglang 0.5.23's ``sglang/kernels/ops/kvcache/dsa_index_k_cache.py`` (its Triton index-K cache
    store ``SetKAndS.triton`` and gather ``GetKAndS.triton``) as on a GPU whose indexer is
    (``preshuffle``) or is not on the preshuffled page-64 path, the module's import-time switch;
    OCP fp8 (not fnuz); aiter's gather is a stub that raises."""
    import torch

    def unused(*a, **k):
        raise RuntimeError("aiter's gather is not available here")

    stubs = {
        "sglang.kernels.ops.quantization.fp8_kernel": {"is_fp8_fnuz": lambda: False, "fp8_dtype": torch.float8_e4m3fn},
        "sglang.srt.layers.attention.dsa.utils": {"INDEXER_K_CACHE_PRESHUFFLE_TILE": 16,
                                                  "aiter_can_use_preshuffle_paged_mqa": lambda: preshuffle},
        "sglang.srt.utils": {"is_hip": lambda: False, "is_xpu": lambda: False},
        "aiter.ops.cache": {"cp_gather_indexer_k_quant_cache": unused},
    }
    return load(source, "sglang/kernels/ops/kvcache", ["dsa_index_k_cache"], stubs=stubs)["dsa_index_k_cache"]

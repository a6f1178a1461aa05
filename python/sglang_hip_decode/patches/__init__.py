"""The patch set: one module per patch, each defining ``PATCH`` (a ``patching.Patch``).

``PLANNED`` is the whole set in the order patches are applied, with the module that holds each and
its planned default; a planned patch whose module does not exist yet reports ``not implemented``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Sequence

from ..declare import Patch


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    module: str
    default: bool  # the planned default; an implemented patch's own ``default`` must agree
    patch: Patch | None  # None: not implemented yet


PLANNED: tuple[tuple[str, str, bool], ...] = (
    ("nsa-cat-skip", "nsa_cat_skip", True),
    ("mxfp4-vbmm-layout", "mxfp4_vbmm_layout", True),
    ("indexer-rope-guard", "indexer_rope_guard", True),
    ("hip-alt-stream", "hip_alt_stream", False),
    ("hip-dual-stream-av4", "hip_dual_stream_av4", False),
    ("dsv4-sparse-decode", "dsv4_sparse_decode", False),
    ("dsv4-fused-compress", "dsv4_fused_compress", False),
    ("dsv4-fused-compress-prefill", "dsv4_fused_compress_prefill", False),
)

NAMES: tuple[str, ...] = tuple(name for name, _, _ in PLANNED)


def catalog() -> list[Entry]:
    """Every planned patch, loading the modules that exist. Raises if a patch file is broken:
    that is a bug in this package, which ``register()`` turns into a status."""
    entries = []
    for name, module, default in PLANNED:
        full = f"{__name__}.{module}"
        patch = None
        if importlib.util.find_spec(full) is not None:
            patch = importlib.import_module(full).PATCH
            if patch.name != name or patch.default != default:
                raise ValueError(f"{full}.PATCH says {patch.name!r}/default={patch.default}, expected {name!r}/{default}")
        entries.append(Entry(name, module, default, patch))
    return entries


def pick(names: Sequence[str]) -> list[Entry]:
    """The implemented patches ``names``, in application order; raises ValueError naming any that
    is unknown or not implemented yet."""
    entries = {e.name: e for e in catalog()}
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise ValueError(f"unknown patch {', '.join(unknown)} (known: {', '.join(entries)})")
    missing = [n for n in names if entries[n].patch is None]
    if missing:
        raise ValueError(f"not implemented yet: {', '.join(missing)}")
    return [e for e in entries.values() if e.name in names]

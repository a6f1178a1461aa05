"""sglang's modules imported on any machine, and module attributes forced for a while.

On CUDA, sglang's modules import ``sgl_kernel`` (a 326 MB native package this project does not need):
:func:`import_modules` hides CUDA during the import only, so module flags come out as on a CPU host
(CUDA tensors and Triton work afterwards). :func:`swap_attrs` is how every test and benchmark forces
the HIP flags on an imported module (``_use_aiter_gfx95`` and friends) and injects kernels: set,
run, put back (also on errors), deleting what did not exist before.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Iterator

_MISSING = object()


@contextlib.contextmanager
def swap_attrs(*changes: tuple[object, str, object]) -> Iterator[None]:
    """Set ``setattr(obj, name, value)`` for each change; restore every one afterwards, in reverse."""
    saved = [(obj, name, getattr(obj, name, _MISSING)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def import_modules(*names: str) -> list[types.ModuleType]:
    """Import ``names`` with ``torch.cuda.is_available`` returning False during the import only."""
    import torch

    with swap_attrs((torch.cuda, "is_available", lambda: False)):
        return [importlib.import_module(name) for name in names]

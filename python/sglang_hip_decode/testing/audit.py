"""Copy audit: count the aten ops that materialise copies, and the bytes they write.

``CopyAudit`` is a ``TorchDispatchMode``: it sees every aten op below autograd, so composite ops
arrive decomposed (``x.contiguous()`` of a non-contiguous tensor arrives as ``clone``,
``reshape``/``flatten`` that cannot view arrive as ``clone`` or ``_unsafe_view`` after one, ``x.to(dtype)``
as ``_to_copy``). Views (``transpose``, ``view``, slicing, ``contiguous()`` of a contiguous tensor)
do not arrive as copies and are not counted.

Bytes are the bytes an op *writes*: the output's ``numel * element_size`` for out-of-place ops and
in-place copies (``copy_`` writes all of its destination); for the scatter family, the elements it
addresses (``index_put_`` writes ``values`` broadcast to the indexed shape, not all of ``self``).

Audits nest: an inner audit's ops are seen by every outer audit too.

Kernels are opaque: wrap a provider with :func:`opaque` and the audit records one ``kernels`` call
for it instead of the torch ops its reference implementation happens to use, so the counts describe
the upstream code around the kernels, as a ROCm trace would show it (one kernel, no copies).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode_stack

aten = torch.ops.aten

# Ops that write a new or existing buffer with data from another: what a decode path should not
# do twice. (fill_/zero_ write constants, not copies; factory ops allocate without writing.)
COPY_OPS = {
    "cat",
    "stack",
    "copy",
    "copy_",
    "_copy_from",
    "_copy_from_and_resize",
    "clone",
    "_to_copy",
    "contiguous",
    "index_put",
    "index_put_",
    "_index_put_impl_",
    "index_copy",
    "index_copy_",
    "scatter",
    "scatter_",
    "masked_scatter",
    "masked_scatter_",
    "slice_scatter",
    "select_scatter",
    "as_strided_scatter",
    "repeat",
    "repeat_interleave",
    "constant_pad_nd",
    "flip",
    "roll",
    "_unsafe_index",
    "index",
    "gather",
    "index_select",
}


@dataclasses.dataclass(frozen=True)
class CopyEvent:
    op: str
    bytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _written(op: str, args, kwargs, out) -> tuple[int, torch.Tensor | None]:
    """Bytes written by one call, and the tensor that describes it."""
    if op in ("index_put", "index_put_", "_index_put_impl_"):
        self, indices = args[0], args[1]
        consumed, whole, index_shapes = 0, 1, []
        for index in indices:
            if index is None:  # a whole dimension
                whole *= self.shape[consumed]
                consumed += 1
            elif index.dtype == torch.bool:  # a mask over index.dim() dimensions
                index_shapes.append((int(index.sum()),))
                consumed += index.dim()
            else:
                index_shapes.append(tuple(index.shape))
                consumed += 1
        count = math.prod(torch.broadcast_shapes(*index_shapes)) * whole * math.prod(self.shape[consumed:])
        return count * self.element_size(), self
    if op in ("index_copy", "index_copy_"):
        source = args[3]
        return _nbytes(source), source
    if op in ("scatter", "scatter_"):
        self, index = args[0], args[2]
        return index.numel() * self.element_size(), self
    outs = list(_tensors(out))
    return sum(_nbytes(t) for t in outs), (outs[0] if outs else None)


class CopyAudit(TorchDispatchMode):
    """Count copy ops and written bytes inside a ``with`` block.

    >>> with CopyAudit() as audit:
    ...     y = torch.cat([a, b])
    >>> audit.counts["cat"], audit.bytes["cat"]
    """

    def __init__(self, ops: set[str] | None = None) -> None:
        super().__init__()
        self.ops = COPY_OPS if ops is None else set(ops)
        self.events: list[CopyEvent] = []
        self.all_ops: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()

    def saw_kernel(self, name: str, args, kwargs, result) -> None:
        """An :func:`opaque` kernel ran (with its arguments and result)."""
        self.kernels[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = func.overloadpacket.__name__
        self.all_ops[op] += 1
        if op in self.ops:
            nbytes, ref = _written(op, args, kwargs, out)
            shape = tuple(ref.shape) if ref is not None else ()
            dtype = ref.dtype if ref is not None else torch.float32
            self.events.append(CopyEvent(op, nbytes, shape, dtype))
        return out

    @property
    def counts(self) -> collections.Counter[str]:
        return collections.Counter(e.op for e in self.events)

    @property
    def bytes(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for e in self.events:
            total[e.op] += e.bytes
        return total

    @property
    def total_count(self) -> int:
        return len(self.events)

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.events)

    def summary(self) -> str:
        if not self.events:
            return "no copies"
        return ", ".join(f"{op}x{n} ({self.bytes[op]} B)" for op, n in sorted(self.counts.items()))


def opaque(name: str, fn: Callable) -> Callable:
    """``fn`` as one opaque kernel for every active :class:`CopyAudit` (its own ops are not seen)."""

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        audits = [m for m in _get_current_dispatch_mode_stack() if isinstance(m, CopyAudit)]
        if not audits:
            return fn(*args, **kwargs)
        with _disable_current_modes():
            result = fn(*args, **kwargs)
        for audit in audits:
            audit.saw_kernel(name, args, kwargs, result)
        return result

    return kernel

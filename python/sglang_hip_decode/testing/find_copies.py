"""Redundant-copy finder: copies whose output already exists, found by value while the code runs.

``RedundantCopyFinder`` is a :class:`~sglang_hip_decode.testing.audit.CopyAudit` (a
``TorchDispatchMode``) that keeps a weak reference to every tensor it sees (op inputs and outputs,
and what the kernels marked :func:`~sglang_hip_decode.testing.audit.opaque` take and return), and
for every op that materialises a copy (the audit's ``COPY_OPS``: cat, clone, _to_copy, copy_ into
a buffer made in the same call, index/gather, ...) checks two things:

* **duplicate**: the output equals, byte for byte and in the same dtype, the whole buffer of a
  tensor alive at that moment (the buffer read contiguously in the output's shape; the tensor may be
  a view of it, as the halves of a fused kernel's output are) that shares no memory with it (hash
  first, the bytes compared on a hash hit). A view of that buffer could replace the copy. A clone
  of a tensor that nobody changes afterwards is one too (its twin is its own source).
* **relayout**: the copy's input is a non-contiguous view of the whole of a buffer produced in
  the same call, and the output is that buffer's bytes in another order (e.g. ``.flatten()`` of a
  transposed GEMM output). The producer could write the consumer's layout directly.

A copy is only redundant if neither it nor its twin changes while the copy is in use. At the end
of each call (``with finder.call():``) every duplicate is checked again: one whose copy or twin was
written by an op the finder saw, or whose bytes no longer match (a kernel wrote one of them in
place), is moved to ``finder.excluded`` with the reason ("overwritten later in the call"), not
reported. Constant-valued outputs (every element equal) and outputs under ``min_bytes`` are not
examined: they match unrelated tensors by coincidence.

Limits: an output that is not contiguous (a clone that kept a transposed view's strides) is not
examined; "overwritten later" looks within the call only, so a snapshot of a call input that the
*next* call overwrites (state carried between decode steps) is reported: check the twin's origin
("an input of the call") before calling such a copy redundant.

Findings are grouped per call site: the op, the innermost frame inside the upstream package
(``root``, default ``sglang``; file:line relative to the package's parent) and the stack trimmed to
upstream frames. Each site reports its bytes per occurrence and how many times per call it happened.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import traceback
import weakref

import torch

from .audit import COPY_OPS, CopyAudit, _tensors

_IN_PLACE_COPIES = {"copy_", "index_put_", "_index_put_impl_", "index_copy_", "scatter_", "masked_scatter_"}
_LAYOUT_COPIES = {"clone", "_to_copy", "copy_", "contiguous", "_unsafe_view"}  # ops that may be a pure relayout


@dataclasses.dataclass
class Finding:
    kind: str  # "duplicate" or "relayout"
    op: str
    site: str  # innermost upstream frame, "sglang/srt/...py:123 in func"
    stack: tuple[str, ...]  # upstream frames, outermost first
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    twin: str  # what the output duplicates (its producer), or the buffer it relays out
    twin_op: str  # the op or kernel that made that buffer ("an input of the call" if it came from outside)
    in_upstream: bool
    excluded: str = ""

    def key(self) -> tuple:
        return self.kind, self.op, self.site, self.nbytes, self.shape


@dataclasses.dataclass
class _Pending:
    finding: Finding
    copy: torch.Tensor
    twin: torch.Tensor | None
    written: bool = False


def _digest(t: torch.Tensor) -> tuple[int, int]:
    """A cheap content hash of a contiguous tensor's bytes (equality is checked on a match)."""
    b = t.reshape(-1).view(torch.uint8).to(torch.int64)
    w = torch.arange(b.numel(), device=b.device, dtype=torch.int64) % 251 + 1
    return int(b.sum()), int((b * w).sum())


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class RedundantCopyFinder(CopyAudit):
    """Report copies whose output already exists (see the module docstring)."""

    def __init__(self, root: str = "sglang", min_bytes: int = 64):
        super().__init__()
        import importlib.util

        spec = importlib.util.find_spec(root)
        base = os.path.dirname(spec.origin) if spec and spec.origin else None
        self.root_dir = base + os.sep if base else None
        self.root_parent = os.path.dirname(base) + os.sep if base else ""
        self.min_bytes = min_bytes
        self._live: dict[tuple, dict[int, list]] = collections.defaultdict(dict)  # (device, storage bytes) -> ptr -> refs
        self._origin: dict[int, str] = {}  # storage ptr -> what produced it ("op at site")
        self._fresh: set[int] = set()  # storages produced during the current call
        self._pending: list[_Pending] = []
        self.findings: list[Finding] = []
        self.excluded: list[Finding] = []
        self.calls = 0
        self._in_call = False

    # --- what is alive ---------------------------------------------------------------------------
    def _track(self, t: torch.Tensor, origin: str | None = None, new: bool = False) -> None:
        """Remember ``t`` as alive; ``new``: its memory was just allocated by ``origin`` (the caching
        allocator reuses addresses, so a new buffer replaces whatever was known at its address)."""
        if t.layout != torch.strided or t.is_sparse or t.device.type == "meta":
            return
        ptr = _storage(t)
        if origin is not None and not new and ptr in self._origin and not self._holds(ptr):
            new = True  # a dead buffer's address, reused: what is known about it is stale
        if new or (origin is not None and ptr not in self._origin):
            self._origin[ptr] = origin or "?"
            if new:
                for bucket in self._live.values():
                    bucket.pop(ptr, None)
            if self._in_call and new and origin != "an input of the call":
                self._fresh.add(ptr)
        size = t.untyped_storage().nbytes()
        if size >= self.min_bytes:
            refs = self._live[(t.device, size)].setdefault(ptr, [])
            if not any(r() is t for r in refs):
                refs.append(weakref.ref(t))

    def _holds(self, ptr: int) -> bool:
        """Whether a tensor the finder saw at ``ptr`` is still alive."""
        return any(r() is not None for bucket in self._live.values() for r in bucket.get(ptr, ()))

    def _alive(self, device, nbytes: int) -> list[torch.Tensor]:
        """One live tensor per storage of exactly ``nbytes`` on ``device`` (pruning the dead)."""
        bucket = self._live.get((device, nbytes), {})
        out = []
        for ptr, refs in list(bucket.items()):
            refs[:] = [r for r in refs if r() is not None]
            if refs:
                out.append(refs[-1]())
            else:
                del bucket[ptr]
        return out

    @staticmethod
    def _as(storage_of: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The whole storage of ``storage_of`` as a contiguous tensor shaped and typed like ``like``."""
        return torch.empty(0, dtype=like.dtype, device=like.device).set_(storage_of.untyped_storage(), 0, like.shape)

    # --- where ---------------------------------------------------------------------------------
    def _where(self) -> tuple[str, tuple[str, ...], bool]:
        frames = traceback.extract_stack()[:-3]
        upstream = [f for f in frames if self.root_dir and f.filename.startswith(self.root_dir)]
        fmt = lambda f: f"{f.filename.removeprefix(self.root_parent)}:{f.lineno} in {f.name}"  # noqa: E731
        if upstream:
            return fmt(upstream[-1]), tuple(fmt(f) for f in upstream), True
        from . import audit

        own = [f for f in frames if f.filename not in (__file__, audit.__file__) and "/torch/" not in f.filename]
        return (fmt(own[-1]) if own else "?"), (), False

    # --- the dispatch hook -----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_dispatch__(func, types, args, kwargs)
        op = func.overloadpacket.__name__
        inputs = list(_tensors(list(args) + list(kwargs.values())))
        for t in inputs:
            self._track(t, "an input of the call")
        written = self._written_args(func, args, kwargs)
        for t in written:
            self._mark_written(t)
        outs = list(_tensors(out))
        if op in COPY_OPS and self._in_call:
            site = None
            for o in outs:
                if op in _IN_PLACE_COPIES and _storage(o) not in self._fresh:
                    continue  # a copy into a buffer that outlives the call (a cache, a graph input): needed
                site = site or self._where()
                self._check(op, o, inputs, site)
        site_text = None
        in_ptrs = {_storage(t) for t in inputs}
        for o in outs:
            if _storage(o) in in_ptrs:  # a view, or the op's own (in-place / out=) argument
                self._track(o)
            else:
                site_text = site_text or self._where()[0]
                self._track(o, f"{op} at {site_text}", new=True)
        return out

    def saw_kernel(self, name: str, args, kwargs, result) -> None:
        """An opaque kernel ran (``audit.opaque``): its tensors are alive, and any of them may have been written."""
        super().saw_kernel(name, args, kwargs, result)
        site = self._where()[0]
        inputs = list(_tensors(list(args) + list(kwargs.values())))
        for t in inputs:
            self._track(t, "an input of the call")
        in_ptrs = {_storage(t) for t in inputs}
        for t in _tensors(result):
            self._track(t, f"kernel {name} at {site}", new=_storage(t) not in in_ptrs)

    @staticmethod
    def _written_args(func, args, kwargs) -> list[torch.Tensor]:
        out = []
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(a.name)
                out += list(_tensors(value))
        return out

    def _mark_written(self, t: torch.Tensor) -> None:
        ptr = _storage(t)
        for p in self._pending:
            if _storage(p.copy) == ptr or (p.twin is not None and _storage(p.twin) == ptr):
                p.written = True

    def _check(self, op: str, o: torch.Tensor, inputs: list[torch.Tensor], site) -> None:
        nbytes = o.numel() * o.element_size()
        if nbytes < self.min_bytes or not o.is_contiguous() or o.layout != torch.strided:
            return
        where, stack, in_upstream = site
        meta = dict(op=op, site=where, stack=stack, nbytes=nbytes, shape=tuple(o.shape),
                    dtype=str(o.dtype).removeprefix("torch."), in_upstream=in_upstream)
        flat = o.reshape(-1)
        if flat.numel() and bool((flat == flat[0]).all()):
            return  # constant-valued: would match any other tensor of that constant
        try:
            flat.view(torch.uint8)
        except RuntimeError:
            return  # no byte view (a quantized or otherwise special dtype): not examined
        # relayout: a non-contiguous view of the whole of a buffer made in this call, copied out
        for src in inputs if op in _LAYOUT_COPIES else ():
            if (not src.is_contiguous() and _storage(src) in self._fresh and src.dtype == o.dtype
                    and src.untyped_storage().nbytes() == nbytes and src.numel() == o.numel()
                    and torch.equal(src.reshape(-1), o.reshape(-1))):  # the same values, another order
                origin = self._origin.get(_storage(src), "?")
                twin = f"{origin} (its {tuple(src.shape)} view, strides {src.stride()})"
                self._pending.append(_Pending(Finding("relayout", twin=twin, twin_op=origin.split(" at ")[0], **meta),
                                              o, None))
                return
        digest = None
        for cand in self._alive(o.device, nbytes):
            if _storage(cand) == _storage(o) or cand.dtype != o.dtype:
                continue
            whole = self._as(cand, o)
            if digest is None:
                digest = _digest(o)
            if _digest(whole) == digest and _same_bytes(whole, o):
                whole_input = any(i.is_contiguous() and _storage(i) == _storage(cand) and i.numel() == o.numel()
                                  for i in inputs)
                viewed = any(_storage(i) == _storage(cand) for i in inputs)
                how = "its own source, " if whole_input else "the buffer its inputs are views of, " if viewed else ""
                origin = self._origin.get(_storage(cand), "?")
                self._pending.append(_Pending(Finding("duplicate", twin=how + origin, twin_op=origin.split(" at ")[0],
                                                      **meta), o, whole))
                return

    # --- calls ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def call(self):
        """One call of the code under test: findings are confirmed at its end."""
        self._in_call, self._fresh = True, set()
        try:
            yield self
        finally:
            self._in_call = False
            self.calls += 1
            for p in self._pending:
                f = p.finding
                if p.written:
                    f.excluded = "overwritten later in the call (an op wrote the copy or its twin)"
                elif p.twin is not None and not _same_bytes(p.twin, p.copy):
                    f.excluded = "overwritten later in the call (the copy and its twin differ at the end)"
                (self.excluded if f.excluded else self.findings).append(f)
            self._pending = []

    def report(self) -> list[dict]:
        """One row per call site: kind, op, site, stack, bytes, times per call, twin."""
        if not self.calls:
            raise RuntimeError("no call was run under the finder (use `with finder.call(): ...`)")
        groups: dict[tuple, list[Finding]] = collections.defaultdict(list)
        for f in self.findings:
            groups[f.key()].append(f)
        rows = []
        for fs in groups.values():
            f = fs[0]
            rows.append({"kind": f.kind, "op": f.op, "site": f.site, "stack": list(f.stack), "bytes": f.nbytes,
                         "shape": list(f.shape), "dtype": f.dtype, "per_call": len(fs) / self.calls,
                         "twin": f.twin, "twin_op": f.twin_op, "in_upstream": f.in_upstream})
        return sorted(rows, key=lambda r: (not r["in_upstream"], r["site"], r["op"]))

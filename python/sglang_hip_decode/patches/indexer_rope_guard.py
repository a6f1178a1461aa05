"""indexer-rope-guard: an exact alias test for the NSA indexer's RoPE write-back.

Removes: nothing new on the happy path; it keeps upstream's saving (no copy kernel when an in-place
RoPE kernel returns a view of its input) and closes the holes in how 0.5.11 decides it.

0.5.11 (sglang#22232) writes the rotated q/k rope slices back with ``Indexer._update_rope_guarded(dst,
src)``, which returns early when ``src.data_ptr() == dst.data_ptr()``. That compares start addresses
only:
* a ``src`` with the same start but another shape or stride (a rotated copy laid out differently in
  the same buffer), or a negated / conjugated view of ``dst`` (same memory, other values), skips a
  copy it needed: silently wrong;
* a ``src`` that partially overlaps ``dst`` reaches ``dst.copy_(src)``, which torch refuses
  ("some elements of the input tensor and the written-to tensor refer to a single memory location");
* under ``torch.compile`` tracing, ``data_ptr()`` of a fake tensor is not meaningful.

Edit (the one function every call site uses: ``_get_q_k_bf16`` twice, ``_get_k_bf16`` once): skip only
when ``dst`` and ``src`` are the same view (same storage, offset, sizes, strides, dtype, and the same
negative and conjugate bits: ``x._neg_view()`` and ``x.conj()`` share x's memory but read other
values); copy through
a temporary when their byte ranges in one storage meet otherwise (conservative: interleaved views
that never share an element also take the temporary); while compiling, a plain ``copy_``.

Why it is bit-identical where upstream is right: the true alias case still skips (the values are
already in place), and every case upstream copied is still a ``copy_`` of the same values. The
changed outcomes are the ones where upstream is wrong (same start, other layout, dtype or
neg/conj bit: now copied) or raises (partial overlap: now through a temporary). Where upstream skips
a same-start ``src`` that cannot be copied into ``dst`` at all (its shape does not broadcast to
``dst``'s: ``copy_`` would raise), this guard skips it too, so it never raises where upstream does not.

Host cost: the alias case (the common one: HIP's RoPE kernels rotate in place) costs one
``is_set_to`` (storage, offset, sizes, strides; False for a negated or conjugated view, which torch
materialises first) and a dtype identity test after the compile check: more than upstream's two
``data_ptr()`` calls (×1.19–1.41 on the H200's host, about 0.5 µs per call; eager mode only;
``benchmark/decode/bench_indexer_rope_guard.py --guard-host-only`` measures both).

Per release: the edit on 0.5.11 ... 0.5.12.post1 (``nsa/nsa_indexer.py``, the same text); from 0.5.13
on ``dsa/dsa_indexer.py``, where upstream guards with ``not torch.compiler.is_compiling() and
src.data_ptr() == dst.data_ptr()`` (the compile bypass ours has too, the start-address test still),
through 0.5.23 and later. Delete this patch when upstream's guard compares the whole view.
"""

from ..declare import Edit, Hunk, Patch, Releases

# The guard both forms of upstream's are replaced with.
_GUARD = """
# sglang-hip-decode indexer-rope-guard: skip only a true alias (the same view: is_set_to compares
# storage, offset, sizes and strides and is False for a negated or conjugated view; the dtype
# beside it); data_ptr() alone misses shape/stride and means nothing while compiling.
if torch.compiler.is_compiling():
    dst.copy_(src)
    return
if dst.is_set_to(src) and dst.dtype is src.dtype:
    return
if dst.data_ptr() == src.data_ptr():
    try:
        fits = torch.broadcast_shapes(src.shape, dst.shape) == dst.shape
    except RuntimeError:
        fits = False
    if not fits:  # no copy_ of src into dst exists (it would raise); upstream skips it, so does this
        return
if dst.untyped_storage().data_ptr() == src.untyped_storage().data_ptr() and dst.device == src.device:
    # Byte ranges [lo, hi) of both views; where they meet, copy through a temporary (torch
    # refuses, or gets wrong, a copy_ between partially overlapping views).
    d_lo = dst.storage_offset() * dst.element_size()
    s_lo = src.storage_offset() * src.element_size()
    d_hi = d_lo + (sum((n - 1) * st for n, st in zip(dst.shape, dst.stride())) + 1) * dst.element_size()
    s_hi = s_lo + (sum((n - 1) * st for n, st in zip(src.shape, src.stride())) + 1) * src.element_size()
    if dst.numel() and src.numel() and d_lo < s_hi and s_lo < d_hi:
        src = src.clone()
dst.copy_(src)
"""

PATCH = Patch(
    name="indexer-rope-guard",
    summary="NSA indexer RoPE write-back skips only a true alias; overlap and torch.compile stay correct",
    gate="hip",
    default=True,
    upstream="sglang#22232 (sglang 0.5.11) in a data_ptr-only form",
    releases=(
        Releases("0.5.11", "0.5.12.post1", edits=(
            Edit("sglang.srt.layers.attention.nsa.nsa_indexer:Indexer._update_rope_guarded", (Hunk(
                before="""
                if src.data_ptr() == dst.data_ptr():
                    return
                dst.copy_(src)
                """,
                after=_GUARD,
            ),)),
        )),
        Releases("0.5.13", None, edits=(
            Edit("sglang.srt.layers.attention.dsa.dsa_indexer:Indexer._update_rope_guarded", (Hunk(
                before="""
                if not torch.compiler.is_compiling() and src.data_ptr() == dst.data_ptr():
                    return
                dst.copy_(src)
                """,
                after=_GUARD,
            ),)),
        )),
    ),
)

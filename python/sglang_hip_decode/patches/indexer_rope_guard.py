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

Why it is bit-identical where 0.5.11 is right: the true alias case still skips (the values are
already in place), and every case 0.5.11 copied is still a ``copy_`` of the same values; the only
changed outcomes are the two where 0.5.11 is wrong or raises.

Upstream: the data_ptr-only form is still there in 0.5.23 (``dsa_indexer.py``). Delete this patch
when upstream's guard compares the whole view.
"""

from ..declare import Edit, Hunk, Patch

PATCH = Patch(
    name="indexer-rope-guard",
    summary="NSA indexer RoPE write-back skips only a true alias; overlap and torch.compile stay correct",
    gate="hip",
    default=True,
    upstream="sglang#22232 (sglang 0.5.11) in a data_ptr-only form",
    edits=(
        Edit(
            "sglang.srt.layers.attention.nsa.nsa_indexer:Indexer._update_rope_guarded",
            (
                Hunk(
                    before="""
                    if src.data_ptr() == dst.data_ptr():
                        return
                    dst.copy_(src)
                    """,
                    after="""
                    # sglang-hip-decode indexer-rope-guard: skip only a true alias (the same view);
                    # data_ptr() alone misses shape/stride and means nothing while compiling.
                    if torch.compiler.is_compiling():
                        dst.copy_(src)
                        return
                    if (
                        dst.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
                        and dst.device == src.device
                    ):
                        if (
                            dst.storage_offset() == src.storage_offset()
                            and dst.shape == src.shape
                            and dst.stride() == src.stride()
                            and dst.dtype == src.dtype
                            and dst.is_neg() == src.is_neg()
                            and dst.is_conj() == src.is_conj()
                        ):
                            return
                        # Byte ranges [lo, hi) of both views; where they meet, copy through a
                        # temporary (torch refuses a copy_ between partially overlapping views).
                        d_lo = dst.storage_offset() * dst.element_size()
                        s_lo = src.storage_offset() * src.element_size()
                        d_hi = d_lo + (sum((n - 1) * st for n, st in zip(dst.shape, dst.stride())) + 1) * dst.element_size()
                        s_hi = s_lo + (sum((n - 1) * st for n, st in zip(src.shape, src.stride())) + 1) * src.element_size()
                        if dst.numel() and src.numel() and d_lo < s_hi and s_lo < d_hi:
                            src = src.clone()
                    dst.copy_(src)
                    """,
                ),
            ),
        ),
    ),
)

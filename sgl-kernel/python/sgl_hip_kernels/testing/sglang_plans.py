"""SGLang's DeepSeek-V4 compressor prefill plan, as its planner builds it, for tests that drive
``dsv4.compress.compress_prefill_paged`` (and, through the plugin, SGLang's own method) with the
plan SGLang would hand them. Written from ``c_plan.cuh``'s host path (``plan_compress_prefill``);
a GPU test compares it with the release's planner byte for byte."""

from __future__ import annotations

from typing import Callable, Sequence


def prefill_plan_rows(requests: Sequence[tuple[int, int]], ratio: int, state_row: Callable[[int, int], int],
                      swa_page: int, ring: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """The rows of ``CompressorPrefillPlan.plan_c`` / ``plan_w`` (as int32) for one chunk.

    ``requests``: (tokens before the chunk, tokens in it) per batch row, in ragged order;
    ``state_row(b, t)``: the state row of batch row b's token t (SGLang's ring layout); ``ring``: the
    ring's rows where speculative decoding makes it longer than a block's window (the planner then
    also keeps the last ``ring - K + 2`` tokens). -> (blocks, writes): per token that closes a block,
    [seq_len, ragged row | rows still in the ring << 16, the state page of the previous block, of its
    own] (where no row is in the ring, the pages as the planner leaves them: -1 and the batch row); per
    token the ring keeps (at or after the last closed block's start, ratio 4: the block before it;
    ratio 4: the last block of every SWA page), [ragged row, state row]."""
    k = 8 if ratio == 4 else ratio
    blocks, writes, ragged = [], [], 0
    for b, (start, extend) in enumerate(requests):
        total = start + extend
        first_kept = ratio * (total // ratio) - (ratio if ratio == 4 else 0)
        if ring is not None and ring > k:
            first_kept = min(first_kept, total - (ring - k + 2))
        for j in range(extend):
            t = start + j
            if (t + 1) % ratio == 0:
                in_ring = k - min(j + 1, k)
                pages = [state_row(b, max(t - ratio, 0)) // ratio, state_row(b, t) // ratio] if in_ring else [-1, b]
                blocks.append([t + 1, (ragged + j) | in_ring << 16] + pages)
            if t >= first_kept or (ratio == 4 and t % swa_page >= swa_page - ratio):
                writes.append([ragged + j, state_row(b, t)])
        ragged += extend
    return blocks, writes

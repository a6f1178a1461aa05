"""Host logic of the DeepSeek-V4 compressor: each ratio's geometry and the ragged-prefill planner.

The planner decides, per batch, which blocks close in the chunk and which rows the ring must keep,
and whether the kept-row stores may ride in the compress launch (they may not when one would land
on a ring slot a block of the same chunk still reads); it is tested against a brute force over
every small (prefix, extend) in ``sgl-kernel/tests/test_dsv4_plan.py``.
"""

from __future__ import annotations

import dataclasses

import torch


def ratio_geometry(ratio: int) -> tuple[int, int, int]:
    """(rows per block K, ring pages, raw-row width in units of d) of a compress ratio; raises for
    any ratio but 4 and 128."""
    if ratio == 4:
        return 8, 2, 4
    if ratio == 128:
        return 128, 1, 2
    raise ValueError(f"dsv4 compress: ratio must be 4 or 128, got {ratio}")


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """``blocks`` (NB, 4) int32: (first token position r*n, ragged row of the block's last token,
    rows of the block that are new, request) per emitted block, in request order, padding rows -1;
    ``writes`` (NW, 3) int32: (ragged row, request, token position) per row the ring must keep;
    ``writes_in_same_launch``: no kept row lands on a ring slot that a block reads (always so for a
    request without prefix), so the stores ride in the compress launch instead of a second one.
    Built once per batch on the host; every compressor layer of that ratio reuses it."""

    ratio: int
    blocks: torch.Tensor
    writes: torch.Tensor
    n_blocks: int
    writes_in_same_launch: bool
    n_requests: int  # what the plan was made for: compress_prefill checks its inputs against these
    n_rows: int
    max_position: int


def plan_prefill(prefix_lens, extend_lens, ratio, device=None, pad_blocks_to=None) -> PrefillPlan:
    """Plan a ragged prefill: request i has ``prefix_lens[i]`` tokens already seen (their ring rows
    are in the state) and ``extend_lens[i]`` new rows, at ragged rows ``sum(extend_lens[:i]) ...``.
    ``pad_blocks_to`` fixes the number of plan rows (a fixed grid, e.g. for graphs). Vectorised over
    requests and blocks (host tensors), then moved to ``device``."""
    k, n_pages, _ = ratio_geometry(ratio)
    prefix = torch.as_tensor([int(x) for x in prefix_lens], dtype=torch.int64)
    extend = torch.as_tensor([int(x) for x in extend_lens], dtype=torch.int64)
    if prefix.shape != extend.shape or bool((prefix < 0).any()) or bool((extend < 0).any()):
        raise ValueError("dsv4 plan_prefill: one non-negative prefix and extend length per request")
    overlap, ring = (4 if ratio == 4 else 0), ratio * n_pages
    total = prefix + extend
    start = torch.cumsum(extend, 0) - extend  # ragged row of each request's first new token

    def expand(counts):  # (request, index within the request) of each of sum(counts) items
        req = torch.repeat_interleave(torch.arange(len(counts)), counts)
        return req, torch.arange(len(req)) - (torch.cumsum(counts, 0) - counts)[req]

    # Blocks n = prefix // ratio ... total // ratio - 1 of each request: those that close in the chunk.
    first_block = prefix // ratio
    req, idx = expand(total // ratio - first_block)
    n = first_block[req] + idx
    last = ratio * n + ratio - 1  # the token that closes block n
    n_new = torch.clamp(last - torch.maximum(prefix[req], ratio * n - overlap) + 1, max=k)
    blocks = torch.stack([ratio * n, start[req] + last - prefix[req], n_new, req], 1)
    # Rows the ring keeps: the open block and, for ratio 4, the last closed one (new tokens only).
    keep_from = torch.clamp(torch.maximum(prefix, ratio * (total // ratio) - overlap), min=0)
    wreq, widx = expand(total - keep_from)
    t = keep_from[wreq] + widx
    writes = torch.stack([start[wreq] + t - prefix[wreq], wreq, t], 1)
    # The blocks read old rows [read_from, prefix) (empty without a block); a kept row t overwrites
    # the slot of token t - m*ring. Both ranges are shorter than the ring.
    read_from = torch.where(total // ratio > first_block, torch.clamp(ratio * first_block - overlap, min=0), prefix)
    overlapping = bool(((t - read_from[wreq]) % ring < prefix[wreq] - read_from[wreq]).any())
    n_blocks = blocks.shape[0]
    if pad_blocks_to is not None:
        if pad_blocks_to < n_blocks:
            raise ValueError(f"dsv4 plan_prefill: {n_blocks} blocks do not fit pad_blocks_to={pad_blocks_to}")
        blocks = torch.cat([blocks, torch.full((pad_blocks_to - n_blocks, 4), -1, dtype=torch.int64)])
    max_total = int(total.max()) if len(total) else 0
    if max_total >= 2**31 or int(extend.sum()) >= 2**31:
        raise ValueError("dsv4 plan_prefill: positions and ragged rows must fit int32")
    as_plan = lambda x: x.to(torch.int32).contiguous().to(device)  # noqa: E731
    return PrefillPlan(ratio, as_plan(blocks), as_plan(writes), n_blocks, not overlapping, len(prefix), int(extend.sum()),
                       max_total - 1)

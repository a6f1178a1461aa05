"""Split-K launch rules and the combine launch shared by the sparse decode kernels here.

A decode step has few query tokens, so one program per (token, block of heads) leaves most of the
GPU idle while each program walks thousands of keys. The rule cuts the key list into ``splits``
ranges, enough that ``tokens x head blocks x splits`` covers the GPU ``WAVES`` times, but never
ranges shorter than ``MIN_KEYS`` keys (the combine would cost more than it saves). It depends only
on the shape and the device's SM count: fixed, no autotune, the same at every call (graph capture
safe).

Scratch (the partials) comes from torch's caching allocator on the current stream: a block a
stream has freed is reused only by that stream, so two streams never share a split's partials,
and under CUDA-graph capture it comes from the graph's private pool.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from .kernels.splitk import _splitk_combine_kernel

WAVES = 2
MIN_KEYS = 128
MAX_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """``splits`` programs per (token, head block), each over ``keys_per_split`` consecutive keys
    (``block_n`` times a power of two)."""

    block_h: int
    block_n: int
    splits: int
    keys_per_split: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(dev).multi_processor_count


def plan(tokens: int, heads: int, keys: int, device, block_h: int, block_n: int, num_warps: int, num_stages: int,
         splits: int | None = None) -> SplitPlan:
    """The launch for ``tokens`` query tokens x ``heads`` heads over ``keys`` key positions
    (``splits`` forces a split count: tests of the combine on the CPU, sweeps)."""
    head_blocks = triton.cdiv(heads, block_h)
    if splits is None:
        want = triton.cdiv(WAVES * _sm_count(str(device)), max(1, tokens * head_blocks))
        splits = max(1, min(want, triton.cdiv(keys, MIN_KEYS), MAX_SPLITS))
    splits = max(1, min(splits, triton.cdiv(max(keys, 1), block_n)))
    # A power of two times block_n: the kernels' trip count is a compile-time constant, and there
    # are only a few of them (one compile per power of two, not per batch size).
    keys_per_split = triton.next_power_of_2(triton.cdiv(triton.cdiv(max(keys, 1), splits), block_n)) * block_n
    splits = triton.cdiv(max(keys, 1), keys_per_split)
    return SplitPlan(block_h, block_n, splits, keys_per_split, num_warps, num_stages)


def partials(p: SplitPlan, tokens: int, heads: int, d: int, device):
    """Scratch for ``p.splits`` partials: outputs (splits, tokens, heads, d) and their statistics
    (2, splits, tokens, heads): the running max ``m`` ([0], where the kernels' lse pointer points)
    and the denominator ([1], ``den_offset(stats)`` elements later)."""
    return (torch.empty(p.splits, tokens, heads, d, dtype=torch.float32, device=device),
            torch.empty(2, p.splits, tokens, heads, dtype=torch.float32, device=device))


def den_offset(stats) -> int:
    return stats.stride(0)


def combine(part_o, stats, out, out_strides, s_q: int, sink=None, lse=None, lse_strides=(0, 0, 0)):
    """Merge the partials (``part_o`` and ``stats`` as :func:`partials` makes them) into ``out`` (token
    t = b * s_q + s at ``out_strides`` (b, s, h)) and ``lse`` (natural log, at ``lse_strides`` (b, h, s));
    ``sink`` (heads,) fp32 or None."""
    splits, tokens, heads, d = part_o.shape
    m = stats[0]
    block_h = 16
    _splitk_combine_kernel[(tokens, triton.cdiv(heads, block_h))](
        part_o, m, sink if sink is not None else m, out, lse if lse is not None else m,
        heads, s_q,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), m.stride(0), m.stride(1), den_offset(stats),
        *out_strides, *lse_strides,
        SPLITS=splits, D=d, BLOCK_H=block_h, HAS_SINK=sink is not None, HAS_LSE=lse is not None, num_warps=4,
    )

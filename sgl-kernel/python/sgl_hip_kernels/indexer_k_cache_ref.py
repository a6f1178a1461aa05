"""The NSA/DSA indexer's FP8 K cache (aiter's ``indexer_k_quant_and_cache`` layout, with and without
its MFMA-16x16 preshuffle, aiter #2879) in torch over the real bytes: the writer, the gather, the
paged MQA logits reader, and a layout probe that tells which layout a block was written in.

A cache block of ``block_size`` tokens, ``head_dim`` D, ``quant_block_size`` Q is
``block_size * (D + 4 * D / Q)`` bytes: the K region (``block_size * D`` fp8-e4m3fn bytes), then the
scale region (``D / Q`` fp32 scales per token, token o's at ``block_size * D + 4 * (D / Q) * o``),
which the preshuffle leaves alone. Byte of token o (its offset in the block), column c:

* row-major: ``o * D + c``;
* preshuffled: ``(o // 16) * 16 * D + (c // 16) * 256 + (o % 16) * 16 + c % 16`` (16-token groups of
  16x16 tiles, each a contiguous row-major 256 B tile).

Quantisation per token and Q-column group: ``s = max(amax, 1e-4) / 448``, with ``scale_fmt ==
"ue8m0"`` rounded up to a power of two (computed in fp32; still stored as an fp32), ``fp8 = x / s``.
The cache is ``(num_blocks, block_size, D + 4 * D / Q)`` of one-byte elements (uint8, or an fp8 view).
"""

from __future__ import annotations

import torch

from .scales_ref import pow2_ceil

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
TILE = 16


def row_bytes(head_dim: int, quant_block_size: int) -> int:
    return head_dim + 4 * (head_dim // quant_block_size)


def k_offsets(block_size: int, head_dim: int, preshuffle: bool, device=None) -> torch.Tensor:
    """(block_size, head_dim) int64: where each (token offset, column) byte sits in a block's K region."""
    o = torch.arange(block_size, device=device)[:, None]
    c = torch.arange(head_dim, device=device)[None, :]
    if not preshuffle:
        return o * head_dim + c
    return (o // TILE) * (TILE * head_dim) + (c // TILE) * (TILE * TILE) + (o % TILE) * TILE + c % TILE


def check_geometry(kv_cache: torch.Tensor, head_dim: int, quant_block_size: int, preshuffle: bool, what: str):
    """The cache's (num_blocks, block_size): one-byte elements, contiguous blocks, the row width
    ``head_dim + 4 * head_dim / quant_block_size``; the preshuffle needs both sizes multiples of 16."""
    if kv_cache.dim() != 3 or kv_cache.element_size() != 1:
        raise ValueError(f"{what}: kv_cache must be (num_blocks, block_size, row bytes) of one-byte elements, got "
                         f"{tuple(kv_cache.shape)} {kv_cache.dtype}")
    if kv_cache.dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise ValueError(f"{what}: kv_cache must be uint8 or float8_e4m3fn (OCP e4m3), got {kv_cache.dtype}")
    if quant_block_size <= 0 or head_dim % quant_block_size:
        raise ValueError(f"{what}: quant_block_size {quant_block_size} must divide head_dim {head_dim}")
    num_blocks, block_size, width = kv_cache.shape
    if width != row_bytes(head_dim, quant_block_size):
        raise ValueError(f"{what}: kv_cache rows are {width} B, head_dim {head_dim} with quant_block_size "
                         f"{quant_block_size} needs {row_bytes(head_dim, quant_block_size)}")
    if kv_cache.stride(2) != 1 or kv_cache.stride(1) != width:
        raise ValueError(f"{what}: each kv_cache block must be contiguous, got strides {kv_cache.stride()}")
    if preshuffle and (block_size % TILE or head_dim % TILE):
        raise ValueError(f"{what}: the preshuffled layout needs block_size ({block_size}) and head_dim ({head_dim}) "
                         f"to be multiples of {TILE}")
    return num_blocks, block_size


def _blocks(kv_cache: torch.Tensor) -> torch.Tensor:
    num_blocks, block_size, width = kv_cache.shape
    return torch.as_strided(kv_cache.view(torch.uint8), (num_blocks, block_size * width), (kv_cache.stride(0), 1))


def quantize_ref(k: torch.Tensor, quant_block_size: int, scale_fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """k (T, D) -> (fp8 bytes (T, D) uint8, scales (T, D / Q) fp32), the math in fp32."""
    t, d = k.shape
    groups = k.float().reshape(t, d // quant_block_size, quant_block_size)
    scale = groups.abs().amax(-1).clamp_min(AMAX_FLOOR) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = pow2_ceil(scale)
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).reshape(t, d)
    return q.to(torch.float8_e4m3fn).view(torch.uint8), scale


def write_plan(kv_cache, slot_mapping, head_dim, quant_block_size, preshuffle=False):
    """Where :func:`write_ref` puts each kept token (negative slots skipped): (kept token rows (N,),
    their blocks (N, 1), K byte positions (N, D), scale byte positions (N, 4 * D / Q)). Reading the
    slots' values makes this a host step; :func:`write_planned` is the rest (graph-capturable)."""
    _, block_size = check_geometry(kv_cache, head_dim, quant_block_size, preshuffle, "write_ref")
    rows = torch.nonzero(slot_mapping >= 0).flatten()
    slots = slot_mapping[rows].long()
    block, o = slots // block_size, slots % block_size
    n_sc = head_dim // quant_block_size
    scale_at = block_size * head_dim + 4 * n_sc * o[:, None] + torch.arange(4 * n_sc, device=slots.device)[None, :]
    return rows, block[:, None], k_offsets(block_size, head_dim, preshuffle, slots.device)[o], scale_at


def write_planned(k, kv_cache, plan, quant_block_size, scale_fmt) -> None:
    """Quantise ``k`` and store the tokens ``plan`` (:func:`write_plan`) keeps where it says."""
    rows, block, k_at, scale_at = plan
    if k.dim() != 2 or k.shape[1] != k_at.shape[1]:
        raise ValueError(f"write_planned: k {tuple(k.shape)} does not match a plan for head_dim {k_at.shape[1]}")
    codes, scales = quantize_ref(k, quant_block_size, scale_fmt)
    blocks = _blocks(kv_cache)
    blocks[block, k_at] = codes.index_select(0, rows)
    blocks[block, scale_at] = scales.index_select(0, rows).contiguous().view(torch.uint8).reshape(scale_at.shape)


def write_ref(k, kv_cache, slot_mapping, quant_block_size, scale_fmt, preshuffle=False) -> None:
    """aiter's ``indexer_k_quant_and_cache``: token i goes to slot ``slot_mapping[i]`` (block
    ``slot // block_size``, offset ``slot % block_size``); negative slots are skipped."""
    plan = write_plan(kv_cache, slot_mapping, k.shape[1], quant_block_size, preshuffle)
    write_planned(k, kv_cache, plan, quant_block_size, scale_fmt)


def read_tokens(kv_cache, block, offset, head_dim, quant_block_size, preshuffle):
    """The fp8 bytes (N, D) uint8 and the scales (N, D / Q) fp32 of the tokens at (block, offset)."""
    block_size = kv_cache.shape[1]
    blocks = _blocks(kv_cache)
    block, offset = block.long(), offset.long()
    codes = blocks[block[:, None], k_offsets(block_size, head_dim, preshuffle, kv_cache.device)[offset]]
    n_sc = head_dim // quant_block_size
    scale_at = block_size * head_dim + 4 * n_sc * offset[:, None] + torch.arange(4 * n_sc, device=kv_cache.device)[None, :]
    scales = blocks[block[:, None], scale_at].contiguous().view(torch.float32)
    return codes, scales


def gather_plan(kv_cache, block_table, cu_seq_lens, head_dim, quant_block_size, preshuffle=False):
    """The (block, offset) of every token :func:`gather_ref` returns, in order (a host step: it reads
    the sequence lengths); :func:`read_tokens` is the rest (graph-capturable)."""
    check_geometry(kv_cache, head_dim, quant_block_size, preshuffle, "gather_ref")
    block_size = kv_cache.shape[1]
    lens = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    pos = torch.arange(int(lens.sum()), device=lens.device) - cu_seq_lens[:-1].long()[seq]
    return block_table.long()[seq, pos // block_size], pos % block_size


def gather_ref(kv_cache, block_table, cu_seq_lens, head_dim, quant_block_size, preshuffle=False):
    """aiter's ``cp_gather_indexer_k_quant_cache``: the tokens of every sequence, in order ->
    (fp8 bytes (T, D) uint8, scale bytes (T, 4 * D / Q) uint8)."""
    block, offset = gather_plan(kv_cache, block_table, cu_seq_lens, head_dim, quant_block_size, preshuffle)
    codes, scales = read_tokens(kv_cache, block, offset, head_dim, quant_block_size, preshuffle)
    return codes, scales.view(torch.uint8).reshape(len(block), -1)


def cp_gather_indexer_k_quant_cache_ref(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens, preshuffle=False) -> None:
    """:func:`gather_ref` with aiter's signature: into ``dst_k`` (T, D) and ``dst_scale`` (T, 4 * D / Q) bytes."""
    scale_bytes = dst_scale.view(torch.uint8)
    groups = scale_bytes.shape[1] // 4
    codes, scales = gather_ref(kv_cache, block_table, cu_seq_lens, dst_k.shape[1], dst_k.shape[1] // groups, preshuffle)
    dst_k.view(torch.uint8)[: len(codes)] = codes
    scale_bytes[: len(scales)] = scales


indexer_k_quant_and_cache_ref = write_ref  # aiter's name and signature: the CPU provider


def mqa_logits_ref(q_fp8, kv_cache, weights, context_lens, block_table, max_model_len, preshuffle, block_size,
                   work=torch.float64):
    """DeepGEMM's / aiter's paged MQA logits: q (B, next_n, H, D) fp8, weights (B * next_n, H) fp32 ->
    logits (B * next_n, max_model_len) fp32, ``logit[t, j] = sum_h relu(<q[t, h], k[j]> * sf[j]) *
    w[t, h]`` for ``j <= context_len - next_n + i`` (query i of its row), -inf elsewhere."""
    b, next_n, h, d = q_fp8.shape
    check_geometry(kv_cache, d, d, preshuffle, "mqa_logits_ref")
    if kv_cache.shape[1] != block_size:
        raise ValueError(f"mqa_logits_ref: kv_cache blocks hold {kv_cache.shape[1]} tokens, block_size is {block_size}")
    out = torch.full((b * next_n, max_model_len), float("-inf"), dtype=work, device=q_fp8.device)
    for row in range(b):
        ctx = int(context_lens[row])
        if ctx <= 0:
            continue
        pos = torch.arange(ctx, device=q_fp8.device)
        block = block_table.long()[row, pos // block_size]
        codes, scales = read_tokens(kv_cache, block, pos % block_size, d, d, preshuffle)
        keys = codes.view(torch.float8_e4m3fn).to(work) * scales.to(work)
        for i in range(next_n):
            last = ctx - next_n + i
            if last < 0:
                continue
            dots = q_fp8[row, i].to(work) @ keys[: last + 1].T  # (H, last + 1)
            out[row * next_n + i, : last + 1] = (dots.relu() * weights[row * next_n + i].to(work)[:, None]).sum(0)
    return out


def mqa_logits_torch(q_fp8, kv_cache, weights, context_lens, block_table, max_model_len, preshuffle, block_size):
    """The same logits batched in torch ops (fp32; the benchmark's torch arm): every row's keys
    gathered through the block table up to the longest context, then one einsum."""
    b, next_n, h, d = q_fp8.shape
    longest = block_table.shape[1] * block_size
    pos = torch.arange(min(longest, max_model_len), device=q_fp8.device)
    block = block_table.long()[:, pos // block_size].clamp_min(0)  # (B, P); masked below
    codes, scales = read_tokens(kv_cache, block.flatten(), (pos % block_size).repeat(b), d, d, preshuffle)
    keys = (codes.view(torch.float8_e4m3fn).float() * scales).reshape(b, len(pos), d)
    dots = torch.einsum("bihd,bpd->bihp", q_fp8.float(), keys).relu()
    logits = (dots * weights.reshape(b, next_n, h, 1)).sum(2).reshape(b * next_n, len(pos))
    last = (context_lens.long()[:, None] - next_n + torch.arange(next_n, device=q_fp8.device)).reshape(-1, 1)
    out = torch.full((b * next_n, max_model_len), float("-inf"), device=q_fp8.device)
    out[:, : len(pos)] = torch.where(pos[None, :] <= last, logits, float("-inf"))
    return out


class LayoutMismatchError(RuntimeError):
    """A cache block was written in one K layout and is about to be read in the other."""


LAYOUTS = {False: "row-major", True: "preshuffled (MFMA 16x16 tiles)"}


def layout_probe(head_dim: int, device=None) -> torch.Tensor:
    """A (1, head_dim) probe token whose fp8 codes differ from column to column (any writer with
    either scale format stores it exactly: powers-of-two multiples of distinct e4m3 values), so
    where its bytes land says which layout wrote them."""
    col = torch.arange(head_dim)
    codes = col % 118 + 8 + 128 * ((col // 118) % 2)  # normal codes 8..125 (0x7F is NaN), then negated: distinct for D <= 236
    values = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    values[0] = 448.0  # sets amax: the scale is exactly 1 in both formats
    return values[None, :].to(device)


def detect_layout(kv_cache, slot: int, probe: torch.Tensor, quant_block_size: int, scale_fmt) -> bool | None:
    """After a writer stored ``probe`` at ``slot``: True if the block holds it preshuffled, False if
    row-major, None if in neither place (not written, or another format)."""
    d = probe.shape[1]
    block_size = kv_cache.shape[1]
    want, _ = quantize_ref(probe, quant_block_size, scale_fmt)
    block = torch.tensor([slot // block_size], device=kv_cache.device)
    offset = torch.tensor([slot % block_size], device=kv_cache.device)
    found = [pre for pre in (False, True)
             if torch.equal(read_tokens(kv_cache, block, offset, d, quant_block_size, pre)[0], want.to(kv_cache.device))]
    return found[0] if len(found) == 1 else None


def check_layout(kv_cache, slot: int, probe: torch.Tensor, quant_block_size: int, scale_fmt, preshuffle: bool) -> None:
    """Raise :class:`LayoutMismatchError` naming both layouts unless the probe at ``slot`` was written
    in the layout a reader with ``preshuffle`` expects (the sglang #31563 pairing: a row-major writer
    and a ``Preshuffle=True`` reader)."""
    written = detect_layout(kv_cache, slot, probe, quant_block_size, scale_fmt)
    if written is None:
        raise LayoutMismatchError(f"the layout probe at slot {slot} is in neither layout (was it written there?)")
    if written != preshuffle:
        raise LayoutMismatchError(f"the cache was written {LAYOUTS[written]}, the reader expects {LAYOUTS[preshuffle]}")

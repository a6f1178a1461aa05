"""Portable DeepSeek-V4 KV compressor (the contract and its layouts are written out in
``compress_ref``): per emitted block, APE bias + per-channel online-softmax pooling + RMSNorm + GPT-J
RoPE on the last 64 channels (+ the indexer's Walsh-Hadamard rotation) in one Triton program.

State: ``state`` (S, W) fp32, W = 4d (ratio 4) or 2d (ratio 128), the raw rows of each request's
recent tokens, pages of ``ratio`` rows. Request b's ring is ``state_pages[b]``: 2 pages for ratio 4
(the current block and the previous one), 1 for ratio 128; token t lives on page
``state_pages[b, (t // ratio) % n_pages]``, slot ``t % ratio``.

* :func:`compress_decode`: one new token per request. Stores its row in the ring and emits the
  block when ``seq_len % ratio == 0`` (out[b] = 0 otherwise); one launch. A request that does not
  emit touches only its own slot; ``seq_len <= 0`` (a padded slot) touches nothing.
* :func:`plan_prefill` + :func:`compress_prefill`: a ragged batch of new tokens after a prefix whose
  rows are in the ring. Emits every block that closes in the chunk, then stores the rows the ring
  must keep (the open block, and for ratio 4 the last closed block): one launch, or two where a
  kept row would overwrite a ring slot that a block of the same chunk still reads.
* :func:`compress_prefill_paged`: a prefill chunk as SGLang plans it, its plan read in place (each
  block's ring pages and each kept row's state row come from the plan), blocks into ``out`` or the
  compressed cache (:class:`CacheStore`), then the kept rows copied (always a second launch).

Where a block's channels are split over several programs (``launch_rule``), they meet in a
``CompressWorkspace`` whose counters reset themselves; the default one is made on first use for
each (device, ratio, d), so make the first call outside CUDA-graph capture (a warm-up does).

What is checked, and when (the launchers trust nothing they are handed):
* always, on the host, free: shapes, dtypes, strides, devices, ``eps`` (finite, > 0: an all-invalid
  block pools to 0 and RMSNorm must not divide 0 by 0), ``out`` (u's dtype and device);
* the index values, on the host with one device->host read (a min/max/duplicate reduction),
  unless a CUDA graph is being captured (the values do not exist yet) or ``check_indices=False``:
  every ring page id of a request that touches the state is inside the state (``0 <= id < S //
  ratio``), no two requests (nor one request's two ratio-4 pages) share a page, and every token
  position is inside the RoPE table (prefill: checked from the plan, always);
* on the device, always: a request with a ring page id outside the state stores nothing (no load
  or store ever leaves ``state``) and gets an out row of NaN; a block whose RoPE position is at or
  past the table's end gets a NaN row (its ring row is still stored); a prefill plan row naming a
  request or ragged rows that do not exist reads and writes nothing. ``compress_prefill_paged``: a
  block that would read a ring page outside the state, name ragged rows outside ``u``, hold
  ``buffer_len >= K``, close no block or sit past the RoPE table gets a NaN row, written to ``out``
  or, with a store, to the cache at ``loc[ragged]`` (a NaN row the attention then shows, not a stale
  one) where that ragged row exists; a kept row outside ``u`` or the state is not copied. Shared pages cannot be seen
  from one program: under capture they are the caller's contract.
* a caller that runs many compressor layers over one batch may check the page ids once and pass
  ``check_indices=False`` to the other layers (each eager check is one device->host read).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .plan import PrefillPlan, plan_prefill, ratio_geometry  # noqa: F401 (re-exported)
from .kernels.compress import (_dsv4_compress_decode_kernel, _dsv4_compress_prefill_kernel, _dsv4_compress_prefill_paged_kernel,
                              _dsv4_state_copy_kernel, _dsv4_state_write_kernel)


@dataclasses.dataclass(frozen=True)
class LaunchRule:
    """How a launch is cut (``rule=`` on the launchers overrides the fixed rule: sweeps, and tests
    of the multi-tile path that the production rules do not take)."""

    split: int  # programs per block, each pooling d / split channels (a power of two, <= 16)
    rows_per_tile: int  # rows each loop step loads (a power of two dividing the block's rows)
    num_warps: int


def launch_rule(ratio: int, d: int, prefill: bool, batch: int = 1) -> LaunchRule:
    """Fixed launch rules (no runtime autotune), from a sweep of split x rows per tile x warps on the
    H100 with L2 flushed before every replay (decode batch 1/16/64 with every request emitting, batch
    64 mixed, prefill 8k): the rule best or within ~10% of the best at each shape. On the H200
    (``benchmark/gpu/sweep_dsv4_compress_rule.py``, storing into the cache) the prefill rules over
    SGLang's plan (8192 tokens, a first chunk) and the ratio-128 decode rule (batch 1 ... 256) were
    the fastest of those swept. Ratio-4 attention
    decode from batch 16 (``batch``: the decode launch's requests) is one program per block: on the
    H200, storing into the cache (``benchmark/gpu/sweep_dsv4_compress_rule.py``), split 1 took 3.79 /
    4.00 / 4.89 µs at batch 16 / 64 / 256 where split 16 took 3.98 / 5.80 / 11.36 (at batch 1 split 16
    stays best: 3.54 µs)."""
    if ratio == 4 and d >= 512:
        if prefill:
            return LaunchRule(split=8, rows_per_tile=8, num_warps=1)
        return LaunchRule(split=16 if batch < 16 else 1, rows_per_tile=8, num_warps=4)
    if ratio == 4:
        return LaunchRule(split=1, rows_per_tile=8, num_warps=1) if prefill else LaunchRule(split=4, rows_per_tile=8, num_warps=1)
    return LaunchRule(split=min(16, max(1, d // 32)), rows_per_tile=128, num_warps=4)


class CompressWorkspace:
    """Where the programs of one block meet when its channels are split (``LaunchRule.split > 1``):
    pooled channels and partial sums of squares (scratch) and one ticket counter per block row,
    zero between launches (the last program of a block resets it). One workspace must not serve two
    launches that run at the same time; the default is one per (device, ratio, d), so the attention
    and indexer compressors never share one; pass ``workspace=`` to run two compressors of one shape
    concurrently on different streams."""

    MAX_SPLIT = 16

    def __init__(self, rows: int, d: int, device):
        self.rows, self.d = rows, d
        self.pooled = torch.empty(rows, d, dtype=torch.float32, device=device)
        self.sum_sq = torch.empty(rows, self.MAX_SPLIT, dtype=torch.float32, device=device)
        self.count = torch.zeros(rows, dtype=torch.int32, device=device)

    def fits(self, rows: int, d: int) -> bool:
        return rows <= self.rows and d <= self.d


# (device, ratio, d) -> every workspace made for it, the newest (largest) last. Outgrown ones are
# kept: a CUDA graph captured with one still points at it.
_WORKSPACES: dict = {}


def workspace_fits(rows: int, d: int, ratio: int, device, rule: LaunchRule) -> bool:
    """Whether a launch of ``rows`` blocks under ``rule`` can run without making a workspace (none
    is needed with one program per block): a caller that may be inside CUDA-graph capture, where
    none can be made, asks first."""
    made = _WORKSPACES.get((str(device), ratio, d))
    return rule.split == 1 or bool(made and made[-1].fits(rows, d))


def _scratch(workspace, rows: int, d: int, ratio: int, device, rule: LaunchRule, ints):
    """(pooled, sum of squares, counters) of a launch: the workspace's, or, with one program per
    block (the kernel then touches none of them), ``ints`` (any int32 tensor) standing in."""
    if rule.split == 1 and workspace is None:
        return ints, ints, ints
    ws = _workspace(workspace, rows, d, ratio, device)
    return ws.pooled, ws.sum_sq, ws.count


def _workspace(workspace, rows: int, d: int, ratio: int, device) -> CompressWorkspace:
    if workspace is not None:
        if not workspace.fits(rows, d) or workspace.count.device != device:
            raise ValueError(f"dsv4 compress: workspace ({workspace.rows} rows of {workspace.d}) does not fit {rows} rows of {d} "
                             f"on {device}")
        return workspace
    made = _WORKSPACES.setdefault((str(device), ratio, d), [])
    if not made or not made[-1].fits(rows, d):
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("dsv4 compress: no workspace this large while capturing a CUDA graph: run the call once "
                               "eagerly before capture (the usual warm-up), or pass workspace=CompressWorkspace(...)")
        made.append(CompressWorkspace(max([rows] + [w.rows for w in made]), d, device))
    return made[-1]


def _check(u, state, state_pages, bias, norm_w, cos, sin, eps, ratio):
    k, n_pages, width = ratio_geometry(ratio)
    for name, t in (("state", state), ("state_pages", state_pages), ("bias", bias), ("norm weight", norm_w), ("cos", cos),
                    ("sin", sin)):
        if t is not None and t.device != u.device:
            raise ValueError(f"dsv4 compress: {name} is on {t.device}, u on {u.device}")
    try:
        eps = float(eps)  # a Python, numpy or 0-d tensor scalar
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"dsv4 compress: eps must be a number, got {eps!r}") from None
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"dsv4 compress: eps must be a finite number > 0 (an all-invalid block pools to 0), got {eps!r}")
    if u.dim() != 2 or u.dtype not in (torch.float32, torch.bfloat16) or u.stride(1) != 1:
        raise ValueError(f"dsv4 compress: u must be (rows, W) fp32/bf16 with contiguous rows, got {tuple(u.shape)} {u.dtype}")
    if u.shape[1] % width:
        raise ValueError(f"dsv4 compress: ratio {ratio} rows are {width}*d wide, got width {u.shape[1]}")
    d = u.shape[1] // width
    if d < 64 or d & (d - 1):
        raise ValueError(f"dsv4 compress: d must be a power of two >= 64 (RoPE on the last 64), got {d}")
    if state.dim() != 2 or state.shape[1] != u.shape[1] or state.dtype != torch.float32 or state.stride(1) != 1:
        raise ValueError(f"dsv4 compress: state must be (S, {u.shape[1]}) fp32 with contiguous rows")
    if state_pages is not None and (state_pages.dim() != 2 or state_pages.shape[1] != n_pages or state_pages.dtype != torch.int32
            or state_pages.stride(1) != 1):
        raise ValueError(f"dsv4 compress: state_pages must be (requests, {n_pages}) int32 with contiguous rows for ratio {ratio}")
    if tuple(bias.shape) != (k, d) or not bias.is_contiguous() or bias.dtype != torch.float32:
        raise ValueError(f"dsv4 compress: bias must be contiguous fp32 ({k}, {d}) (ratio 4: the hot-fixed ape rows)")
    if tuple(norm_w.shape) != (d,) or norm_w.dtype != torch.float32 or not norm_w.is_contiguous():
        raise ValueError(f"dsv4 compress: norm weight must be contiguous fp32 ({d},)")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != 32 or cos.stride() != sin.stride() or cos.stride(1) < 1 \
            or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError("dsv4 compress: cos/sin must be fp32 (max_pos, 32) tables with one layout (any strides: e.g. "
                         "the two halves of torch.view_as_real of a complex table)")
    return d, k, n_pages, eps


def _check_rule(rule: LaunchRule, ratio: int, d: int) -> LaunchRule:
    k, _, _ = ratio_geometry(ratio)
    ok = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    if not (ok(rule.split) and rule.split <= CompressWorkspace.MAX_SPLIT and d // rule.split >= 1 and ok(rule.rows_per_tile)
            and rule.rows_per_tile <= k and ok(rule.num_warps)):
        raise ValueError(f"dsv4 compress: bad launch rule {rule} for ratio {ratio}, d {d}")
    return rule


def _out(out, rows, d, dtype, device):
    """``out`` as given (fp32 or bf16: the kernel rounds its fp32 result once to it), or a new one
    in ``dtype`` (u's)."""
    if out is None:
        return torch.empty(rows, d, dtype=dtype, device=device)
    if tuple(out.shape) != (rows, d) or out.stride(1) != 1 or out.dtype not in (torch.float32, torch.bfloat16) \
            or out.device != device:
        raise ValueError(f"dsv4 compress: out must be ({rows}, {d}) fp32 or bf16 on {device} with contiguous rows, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


@dataclasses.dataclass(frozen=True)
class CacheStore:
    """Where :func:`compress_decode` / :func:`compress_prefill_paged` put the emitted rows instead of ``out``: SGLang's compressed
    KV cache, quantised as its HIP Triton store (``fused_store_cache`` on ROCm) writes it, in the
    same launch. Rows that emit nothing are not written (``loc`` need not name a slot for them).

    * ``kind``: ``"flashmla"`` (d 512: the V4 584 B/token layout of ``kv_cache``; the row is
      rounded to bf16 first, as that store's bf16 input is) or ``"indexer"`` (d 128: 128 fp8 bytes
      and an fp32 scale per token; fp32 rows);
    * ``cache``: (pages, page_bytes) uint8, a page's bytes contiguous (V4: ``page_size * 584 <=
      page_bytes``, a multiple of 2; indexer: ``page_size * 132 <= page_bytes``, a multiple of 4);
    * ``loc``: (B,) int32/int64, request b's compressed slot (page ``loc // page_size``); prefill:
      (T,), indexed by the ragged row of a block's last token (SGLang's ``out_loc``);
    * ``preshuffle``: indexer only, 0 (token-major) or the tile of the preshuffled layout (the
      aiter paged-MQA layout: ``page_size`` a multiple of it).
    The fp8 format is OCP e4m3 (``float8_e4m3fn``, max 448): not the gfx94x fnuz one."""

    kind: str
    cache: torch.Tensor
    loc: torch.Tensor
    page_size: int
    preshuffle: int = 0

    def check(self, rows: int, d: int, device) -> None:
        c, loc, ps = self.cache, self.loc, self.page_size
        if self.kind not in ("flashmla", "indexer") or d != (512 if self.kind == "flashmla" else 128):
            raise ValueError(f"dsv4 compress: store kind {self.kind!r} does not take d {d} (flashmla: 512, indexer: 128)")
        if not isinstance(ps, int) or isinstance(ps, bool) or ps < 1:
            raise ValueError(f"dsv4 compress: store page_size must be an int >= 1, got {ps!r}")
        token, align = (584, 2) if self.kind == "flashmla" else (132, 4)
        if (not isinstance(c, torch.Tensor) or c.dtype != torch.uint8 or c.dim() != 2 or c.stride(1) != 1
                or c.device != device or c.shape[1] < ps * token or c.shape[1] % align
                or (c.shape[0] > 1 and c.stride(0) != c.shape[1]) or c.data_ptr() % align):
            raise ValueError(f"dsv4 compress: store cache must be (pages, >= {ps * token}) contiguous uint8 on "
                             f"{device}, the page a multiple of {align} B, got {getattr(c, 'dtype', c)} "
                             f"{tuple(getattr(c, 'shape', ()))}")
        if (not isinstance(loc, torch.Tensor) or loc.shape != (rows,) or loc.dtype not in (torch.int32, torch.int64)
                or loc.device != device):
            raise ValueError(f"dsv4 compress: store loc must be ({rows},) int32/int64 on {device}")
        p = self.preshuffle
        if not isinstance(p, int) or p < 0 or (p and (self.kind != "indexer" or p & (p - 1) or ps % p or 128 % p)):
            raise ValueError(f"dsv4 compress: store preshuffle {p!r}: 0, or (indexer) a power of two dividing "
                             f"page_size {ps} and 128")


def _checking_values(check_indices: bool, device) -> bool:
    """Whether to read index values back to the host now: not while a CUDA graph is captured."""
    return check_indices and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _repeats(values, active):
    """How many of the ``active`` entries of ``values`` repeat one before them (a device scalar):
    inactive entries become distinct negative sentinels, so they neither collide nor count."""
    sentinels = -1 - torch.arange(values.numel(), device=values.device).view_as(values)
    ordered = torch.where(active, values, sentinels).flatten().sort().values
    return (ordered[1:] == ordered[:-1]).sum()


def _check_pages(state_pages, active, n_state_pages: int, what: str, extra=None, distinct: bool = True) -> list[int]:
    """One device->host read: the ring page ids of the ``active`` requests (at least one request)
    lie in [0, n_state_pages) and (``distinct``) are all distinct. ``extra``: more scalars read in
    the same trip."""
    pages = state_pages.to(torch.int64)
    act = active[:, None].expand_as(pages)
    far = torch.iinfo(torch.int64).max
    scalars = [torch.where(act, pages, far).amin(), torch.where(act, pages, -1).amax(), _repeats(pages, act)]
    values = torch.stack([x.to(torch.int64) for x in scalars + list(extra or [])]).tolist()
    lo, hi, shared = values[:3]
    if hi >= 0 and (lo < 0 or hi >= n_state_pages):
        raise ValueError(f"dsv4 {what}: state_pages holds page ids outside the state (min {lo}, max {hi}; the state has "
                         f"{n_state_pages} pages, ids 0..{n_state_pages - 1})")
    if shared and distinct:
        raise ValueError(f"dsv4 {what}: two requests (or one request's two ring pages) share a state page")
    return values[3:]


def compress_decode(u, state, state_pages, seq_lens, bias, norm_w, eps, cos, sin, ratio, rotate=False, out=None,
                    workspace=None, rule: LaunchRule | None = None, check_indices: bool = True,
                    page_order: str = "ring", store: CacheStore | None = None):
    """u (B, W) the new token's raw row per request; seq_lens (B,) int32 after appending it (any
    stride). Returns out (B, d) in u's dtype (``out``, if given: fp32 or bf16): the compressed
    vector of block ``seq_len // ratio - 1`` where ``seq_len % ratio == 0``, else 0. Writes ``state``.
    The page ids of requests with ``seq_len > 0`` and their positions are checked (module docstring)
    unless capturing or ``check_indices=False``; padded slots (``seq_len <= 0``) may hold any page ids.

    ``page_order``: ``"ring"`` (default), ``state_pages[b]`` is the request's ring (block n on page
    ``state_pages[b, n % 2]`` for ratio 4); ``"prev_cur"``, ``state_pages[b]`` is (the previous
    block's page, the current block's page) for this step only: a caller whose pages are not a fixed
    pair per request (SGLang's decode plan, where a block's page follows its SWA page). There the two
    may be one page (the first block has no previous one), so only the current pages of different
    requests must differ.

    ``store``: the emitted rows go to the cache it names instead (:class:`CacheStore`; ``out`` must
    then be None and None is returned). Its slots are checked with the page ids (``check_indices``):
    an emitting request's slot inside the cache."""
    if page_order not in ("ring", "prev_cur"):
        raise ValueError(f"dsv4 compress_decode: page_order must be 'ring' or 'prev_cur', got {page_order!r}")
    d, _, n_pages, eps = _check(u, state, state_pages, bias, norm_w, cos, sin, eps, ratio)
    b = u.shape[0]
    if seq_lens.shape != (b,) or seq_lens.dtype != torch.int32 or state_pages.shape[0] != b \
            or seq_lens.device != u.device:
        raise ValueError(f"dsv4 compress_decode: seq_lens must be ({b},) int32 on {u.device} and state_pages "
                         f"({b}, {n_pages})")
    if store is None:
        out = _out(out, b, d, u.dtype, u.device)
    elif out is not None:
        raise ValueError("dsv4 compress_decode: pass out or store, not both")
    else:
        store.check(b, d, u.device)
    n_state_pages = state.shape[0] // ratio
    if b and _checking_values(check_indices, u.device):
        live = seq_lens > 0
        slots = []  # the store's slots of the emitting requests (min, max), read in the same trip
        if store is not None:
            emitted = torch.where(live & (seq_lens % ratio == 0), store.loc.to(torch.int64), 0)
            slots = [emitted.amin(), emitted.amax()]
        if page_order == "prev_cur" and n_pages == 2:  # the previous pages: only inside the state
            _check_pages(state_pages[:, :1], live, n_state_pages, "compress_decode", distinct=False)
        last, *lo_hi = _check_pages(state_pages[:, n_pages - 1:] if page_order == "prev_cur" else state_pages, live,
                                    n_state_pages, "compress_decode", extra=[seq_lens.amax()] + slots)
        if lo_hi and (lo_hi[0] < 0 or lo_hi[1] >= store.cache.shape[0] * store.page_size):
            raise ValueError(f"dsv4 compress_decode: store loc of an emitting request outside the cache's "
                             f"{store.cache.shape[0] * store.page_size} slots (min {lo_hi[0]}, max {lo_hi[1]})")
        if last - 1 >= cos.shape[0]:
            raise ValueError(f"dsv4 compress_decode: a token at position {last - 1} is past the RoPE table of "
                             f"{cos.shape[0]} positions")
    if b:
        rule = _check_rule(rule or launch_rule(ratio, d, prefill=False, batch=b), ratio, d)
        scratch = _scratch(workspace, b, d, ratio, u.device, rule, seq_lens)
        sink, kind, preshuffle = _sink(store, out)
        _dsv4_compress_decode_kernel[(b * rule.split,)](
            u, state, state_pages, seq_lens, bias, norm_w, cos, sin, out if store is None else u, *scratch, eps,
            n_state_pages, cos.shape[0], u.stride(0), state.stride(0), seq_lens.stride(0),
            state_pages.stride(0), cos.stride(0), cos.stride(1), 0 if store is not None else out.stride(0), *sink,
            RATIO=ratio, D=d, LOG2_D=d.bit_length() - 1, SPLIT=rule.split, N_PAGES=n_pages, BK=rule.rows_per_tile,
            ROTATE=bool(rotate), PREV_CUR=page_order == "prev_cur", STORE=kind, PRESHUFFLE=preshuffle,
            num_warps=rule.num_warps,
        )
    return out


def compress_prefill(u, state, state_pages, plan: PrefillPlan, bias, norm_w, eps, cos, sin, rotate=False, out=None,
                     workspace=None, rule: LaunchRule | None = None, check_indices: bool = True):
    """u (T, W) the ragged new rows. Returns out (plan rows, d) in u's dtype: row i is block
    ``plan.blocks[i]`` (0 for padding rows). Then stores the kept rows in ``state``. The page ids of
    the plan's requests are checked (module docstring) unless capturing or ``check_indices=False``."""
    ratio = plan.ratio
    d, _, n_pages, eps = _check(u, state, state_pages, bias, norm_w, cos, sin, eps, ratio)
    if state_pages.shape[0] < plan.n_requests or u.shape[0] != plan.n_rows or plan.max_position >= cos.shape[0]:
        raise ValueError(f"dsv4 compress_prefill: the plan is for {plan.n_requests} requests, {plan.n_rows} new rows and "
                         f"positions "
                         f"< {plan.max_position + 1}; got state_pages for {state_pages.shape[0]}, u with {u.shape[0]} rows, "
                         f"RoPE tables of {cos.shape[0]}")
    for name, t, cols in (("blocks", plan.blocks, 4), ("writes", plan.writes, 3)):
        if t.dim() != 2 or t.shape[1] != cols or t.dtype != torch.int32 or not t.is_contiguous() or t.device != u.device:
            raise ValueError(f"dsv4 compress_prefill: plan.{name} must be contiguous int32 (n, {cols}) on {u.device}")
    nb, nw = plan.blocks.shape[0], plan.writes.shape[0]
    out = _out(out, nb, d, u.dtype, u.device)
    n_state_pages = state.shape[0] // ratio
    if plan.n_requests and _checking_values(check_indices, u.device):
        requests = state_pages[: plan.n_requests]
        _check_pages(requests, torch.ones(plan.n_requests, dtype=torch.bool, device=u.device), n_state_pages,
                     "compress_prefill")
    rule = _check_rule(rule or launch_rule(ratio, d, prefill=True), ratio, d)
    fused_writes = nw if plan.writes_in_same_launch else 0
    if nb or fused_writes:
        ws = _workspace(workspace, max(nb, 1), d, ratio, u.device)
        _dsv4_compress_prefill_kernel[(nb * rule.split + fused_writes,)](
            u, state, state_pages, plan.blocks, plan.writes, bias, norm_w, cos, sin, out, ws.pooled, ws.sum_sq, ws.count,
            nb * rule.split, eps, n_state_pages, cos.shape[0], state_pages.shape[0], u.shape[0], u.stride(0), state.stride(0),
            state_pages.stride(0), cos.stride(0), cos.stride(1), out.stride(0),
            RATIO=ratio, D=d, LOG2_D=d.bit_length() - 1, SPLIT=rule.split, N_PAGES=n_pages, BK=rule.rows_per_tile,
            ROTATE=bool(rotate), num_warps=rule.num_warps,
        )
    if nw and not fused_writes:
        _dsv4_state_write_kernel[(nw,)](
            u, state, state_pages, plan.writes, n_state_pages, state_pages.shape[0], u.shape[0], u.stride(0), state.stride(0),
            state_pages.stride(0),
            RATIO=ratio, N_PAGES=n_pages, W=u.shape[1], num_warps=4,
        )
    return out


def _sink(store: CacheStore | None, out):
    """The cache arguments of a launch: the store's cache (as bytes, fp8 and its wide dtype), slots
    and geometry, or ``out`` standing in for them (STORE 0)."""
    if store is None:
        return (out, out, out, out, 0, 0, 1), 0, 0
    c = store.cache
    wide = c.view(torch.bfloat16 if store.kind == "flashmla" else torch.float32)
    return ((c, c.view(torch.float8_e4m3fn), wide, store.loc, store.loc.stride(0), c.shape[1], store.page_size),
            1 if store.kind == "flashmla" else 2, store.preshuffle)


def _check_paged_plan(u, blocks, writes, ratio, n_state_pages, n_state_rows, n_cos, store):
    """One device->host read: every block row that is not padding closes a block inside the RoPE
    table, names ragged rows inside ``u`` and, where it reads ring rows, pages inside the state;
    every kept row copies a row of ``u`` to a state row, no two to the same; the store's slot of
    every block inside its cache."""
    k, _, _ = ratio_geometry(ratio)
    dev = u.device
    seq = blocks[:, 0].to(torch.int64)
    live = seq != -1
    ragged, buffer_len = (blocks[:, 1] & 0xFFFF).to(torch.int64), ((blocks[:, 1] >> 16) & 0xFFFF).to(torch.int64)
    prev, own = blocks[:, 2].to(torch.int64), blocks[:, 3].to(torch.int64)
    pos = seq - ratio
    inside = lambda p: (p >= 0) & (p < n_state_pages)  # noqa: E731
    needs_prev = (buffer_len > 0) & (pos >= 4) if ratio == 4 else torch.zeros_like(live)
    needs_own = buffer_len > (4 if ratio == 4 else 0)
    good = ((pos >= 0) & (seq % ratio == 0) & (pos < n_cos) & (buffer_len < k) & (ragged < u.shape[0])
            & (ragged - (k - buffer_len) + 1 >= 0) & (~needs_prev | inside(prev)) & (~needs_own | inside(own)))
    src, dst = writes[:, 0].to(torch.int64), writes[:, 1].to(torch.int64)
    wlive = src != -1
    wgood = (src >= 0) & (src < u.shape[0]) & (dst >= 0) & (dst < n_state_rows)
    far = torch.iinfo(torch.int64).max
    scalars = [(live & ~good).sum(), (wlive & ~wgood).sum(), _repeats(dst, wlive)]
    if store is not None:
        loc = store.loc.to(torch.int64)[torch.where(live & good, ragged, 0)]
        scalars += [torch.where(live & good, loc, far).amin(), torch.where(live & good, loc, -1).amax()]
    values = torch.stack([torch.as_tensor(x, device=dev).to(torch.int64) for x in scalars]).tolist()
    if values[0]:
        raise ValueError(f"dsv4 compress_prefill_paged: {values[0]} block rows close no block inside the RoPE table "
                         f"({n_cos} positions), or name ragged rows outside u ({u.shape[0]} rows), buffer_len >= {k}, "
                         f"or ring pages outside the state ({n_state_pages} pages)")
    if values[1] or values[2]:
        raise ValueError(f"dsv4 compress_prefill_paged: {values[1]} kept rows name a row outside u ({u.shape[0]}) or the "
                         f"state ({n_state_rows} rows); {values[2]} share a state row")
    if store is not None and values[4] >= 0 and (values[3] < 0 or values[4] >= store.cache.shape[0] * store.page_size):
        raise ValueError(f"dsv4 compress_prefill_paged: store loc of a block outside the cache's "
                         f"{store.cache.shape[0] * store.page_size} slots (min {values[3]}, max {values[4]})")


def compress_prefill_paged(u, state, blocks, writes, bias, norm_w, eps, cos, sin, ratio, rotate=False, out=None,
                           store: CacheStore | None = None, workspace=None, rule: LaunchRule | None = None,
                           check_indices: bool = True):
    """A ragged prefill chunk as SGLang plans it, its plan read in place (the page of every block
    and the state row of every kept row come from the plan, so a request's rows may span many ring
    pages, as a chunk over several SWA pages does):

    * ``blocks`` (NB, 4) int32: ``CompressorPrefillPlan.plan_c`` viewed as int32, per block (seq_len
      after its last token, that token's ragged row | the block's rows still in the ring << 16, the
      state page of the previous block (ratio 4), the block's own state page); seq_len -1: padding;
    * ``writes`` (NW, 2) int32: ``plan_w`` viewed as int32, per kept row (its ragged row, the state
      row it goes to); ragged row -1: padding.

    u (T, W) the chunk's raw rows (fp32/bf16). Block i goes to out[i] (returned, (NB, d) in u's
    dtype; padding rows untouched) or, with ``store``, to cache slot ``store.loc[ragged]`` (loc
    (T,); None is returned). Then the kept rows are copied into ``state``, in a second launch: a kept
    row may land on a ring slot that a block of the same chunk still reads, which the blocks must
    see as it was. Index values are checked (``_check_paged_plan``) unless capturing or
    ``check_indices=False``; the device guards of the kernel hold regardless."""
    d, k, _, eps = _check(u, state, None, bias, norm_w, cos, sin, eps, ratio)  # the pages are the plan's
    for name, t, cols in (("blocks", blocks, 4), ("writes", writes, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != cols or t.dtype != torch.int32 \
                or not t.is_contiguous() or t.device != u.device:
            raise ValueError(f"dsv4 compress_prefill_paged: {name} must be contiguous int32 (n, {cols}) on {u.device} "
                             f"(the plan's bytes viewed as int32)")
    nb, nw = blocks.shape[0], writes.shape[0]
    if store is None:
        out = _out(out, nb, d, u.dtype, u.device)
    elif out is not None:
        raise ValueError("dsv4 compress_prefill_paged: pass out or store, not both")
    else:
        store.check(u.shape[0], d, u.device)
    n_state_pages = state.shape[0] // ratio
    if (nb or nw) and _checking_values(check_indices, u.device):
        _check_paged_plan(u, blocks, writes, ratio, n_state_pages, state.shape[0], cos.shape[0], store)
    if nb:
        rule = _check_rule(rule or launch_rule(ratio, d, prefill=True), ratio, d)
        scratch = _scratch(workspace, nb, d, ratio, u.device, rule, blocks)
        sink, kind, preshuffle = _sink(store, out)
        _dsv4_compress_prefill_paged_kernel[(nb * rule.split,)](
            u, state, blocks, bias, norm_w, cos, sin, out if store is None else u, *scratch, eps,
            n_state_pages, cos.shape[0], u.shape[0], u.stride(0), state.stride(0), cos.stride(0), cos.stride(1),
            0 if store is not None else out.stride(0), *sink,
            RATIO=ratio, D=d, LOG2_D=d.bit_length() - 1, SPLIT=rule.split, BK=rule.rows_per_tile, ROTATE=bool(rotate),
            STORE=kind, PRESHUFFLE=preshuffle, num_warps=rule.num_warps,
        )
    if nw:
        _dsv4_state_copy_kernel[(nw,)](u, state, writes, u.shape[0], state.shape[0], u.stride(0), state.stride(0),
                                       W=u.shape[1], num_warps=4)
    return out

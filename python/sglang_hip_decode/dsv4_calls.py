"""What the DeepSeek-V4 patches' edited upstream bodies call at run time (imported inside the edited
method, so a server without these patches never imports it, nor the kernels).

:func:`fused_compress_call` (patch ``dsv4-fused-compress``): one decode step of the compressor v2's
``_forward_compress_all_in_one``, handed the method's locals; ours (``compress_decode`` over SGLang's
state ring and decode plan, storing into SGLang's compressed cache in the same launch) where
:func:`fused_compress_applies` says the step is one it implements and :func:`cache_store` knows the
cache, else ``False`` and upstream's kernels run (the patch header lists what is declined).

:func:`sparse_decode_call` (patch ``dsv4-sparse-decode``): the HIP DSV4 attention backend's FlashMLA
call, ``flash_mla_with_kvcache_entrypoint(**input_dict, backend=...)[0]``, answered by this project's
portable ``sgl_hip_kernels.dsv4.sparse_decode`` where that kernel implements exactly the call's
contract, else ``None`` (the edited body then makes upstream's call, unchanged). Ours answers when
all of these hold, each a property of the call's shapes and mode (the same on every replay of a
captured CUDA graph):

* the batch is a decode batch (``forward_mode.is_decode()``; prefill, target-verify and draft-extend
  keep upstream's kernel);
* q is (tokens, 1, heads, 512) bf16 (fp32: the CPU interpreter's precision), ``head_dim_v`` 512;
* the FP8 cache (``is_fp8_kvcache``) of both scopes is the 584 B/token V4 layout (0.5.22+ also has
  V4.1 layouts: those keep upstream's kernel), one-byte elements, a page's bytes contiguous, no block
  table, no ``cache_seqlens``;
* the device's FP8 is OCP e4m3 (the kernel reads the cache as e4m3fn): gfx942 (MI300X / MI325X),
  where SGLang writes e4m3fnuz, keeps upstream's kernel; so does any call on a GPU with fp32 q;
* upstream's split count is not pinned: 0.5.22+'s deterministic inference (``hip_attn_kv_splits()``
  > 0) fixes it for batch-invariant bits, ours picks splits by batch size, so it keeps upstream's;
* the backend asked for is not one of upstream's debugging paths (``torch``, ``comparison``);
* ``softmax_scale`` is a number;
* every other input is what the kernel accepts: indices (tokens, 1, topk) int32 with a contiguous
  last dim, lengths (tokens,) int32 contiguous, the sink (heads,) fp32 contiguous, all on q's device.
  A call that misses any of these keeps upstream's kernel (never an error of ours in a decode step).

0.5.22+ passes ``inv_rope`` where the kernel it picks (aiter's) applies the inverse RoPE itself; ours
does not, so upstream's own standalone inverse RoPE (``hip_flash_mla._apply_inverse_rope``) runs on
our output, as upstream's paths without the fused form do.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch

from sgl_hip_kernels.dsv4 import sparse_decode

V4_BYTES_PER_TOKEN = 584  # FlashMLA's MODEL1 FP8 layout: 448 fp8 NoPE + 64 bf16 RoPE + 8 scale bytes
HEAD_DIM = 512


def _v4_cache(cache, device) -> bool:
    """SGLang's (pages, page_size, 1, 584) byte view of V4 pages, each page's bytes contiguous, at an
    even address and page stride (the kernel reads the RoPE values as bf16)."""
    return bool(
        isinstance(cache, torch.Tensor) and cache.device == device and cache.dim() == 4
        and cache.element_size() == 1 and cache.dtype != torch.bool
        and cache.shape[2] == 1 and cache.shape[3] == V4_BYTES_PER_TOKEN
        and cache.stride(3) == 1 and (cache.shape[1] == 1 or cache.stride(1) == V4_BYTES_PER_TOKEN)
        and (cache.shape[0] <= 1 or cache.stride(0) % 2 == 0) and cache.data_ptr() % 2 == 0
    )


def _int32_rows(t, shape, device) -> bool:
    """An int32 tensor of ``shape`` (``None`` entries any size) on ``device``, its last dim contiguous."""
    return bool(
        isinstance(t, torch.Tensor) and t.device == device and t.dtype == torch.int32 and t.dim() == len(shape)
        and all(want is None or have == want for have, want in zip(t.shape, shape))
        and (t.shape[-1] <= 1 or t.stride(-1) == 1)
    )


def _scope_ok(call, cache_key, indices_key, length_key, q) -> bool:
    length = call.get(length_key)
    return (_v4_cache(call.get(cache_key), q.device)
            and _int32_rows(call.get(indices_key), (q.shape[0], 1, None), q.device)
            and (length is None or _int32_rows(length, (q.shape[0],), q.device)))


DEBUG_BACKENDS = ("torch", "comparison")  # upstream's reference and cross-check paths: never replaced


@functools.lru_cache(maxsize=None)
def _fp8_is_fnuz(device_index: int) -> bool:
    """Whether this HIP GPU's FP8 is e4m3fnuz (gfx94x), as SGLang's ``is_fp8_fnuz`` decides it."""
    return bool(torch.version.hip) and torch.cuda.get_device_properties(device_index).gcnArchName.startswith("gfx94")


def _kernel_reads_this_fp8(q) -> bool:
    return q.device.type != "cuda" or not _fp8_is_fnuz(q.device.index if q.device.index is not None else 0)


def _splits_pinned() -> bool:
    """0.5.22+: deterministic inference pins upstream's split count (none of this before)."""
    from sglang.srt.layers.attention import hip_flash_mla

    pinned = getattr(hip_flash_mla, "hip_attn_kv_splits", None)
    return pinned is not None and pinned() > 0


def sparse_decode_applies(forward_batch, call: dict, backend=None) -> bool:
    """Whether :func:`sparse_decode_call` answers this call (module docstring)."""
    q, sink, scale = call.get("q"), call.get("attn_sink"), call.get("softmax_scale")
    return bool(
        forward_batch.forward_mode.is_decode()
        and backend not in DEBUG_BACKENDS
        and isinstance(scale, (int, float)) and not isinstance(scale, bool)
        and isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] == 1 and q.shape[3] == HEAD_DIM
        and (q.dtype == torch.bfloat16 or (q.dtype == torch.float32 and q.device.type == "cpu")) and q.stride(3) == 1
        and call.get("head_dim_v") == HEAD_DIM
        and call.get("is_fp8_kvcache") is True
        and call.get("block_table") is None and call.get("cache_seqlens") is None
        and _scope_ok(call, "k_cache", "indices", "topk_length", q)
        and (call.get("extra_k_cache") is None
             or _scope_ok(call, "extra_k_cache", "extra_indices_in_kvcache", "extra_topk_length", q))
        and (sink is None or (isinstance(sink, torch.Tensor) and sink.device == q.device
                              and sink.dtype == torch.float32 and tuple(sink.shape) == (q.shape[2],)
                              and (q.shape[2] <= 1 or sink.stride(0) == 1)))
        and _kernel_reads_this_fp8(q)
        and not _splits_pinned()
    )


def sparse_decode_call(forward_batch, call: dict, backend=None):
    """The call's output (tokens, 1, heads, 512), what ``entrypoint(**call, backend=backend)[0]``
    returns, or ``None`` where ours does not answer it."""
    if not sparse_decode_applies(forward_batch, call, backend):
        return None
    k_cache, extra = call["k_cache"], call.get("extra_k_cache")
    out, _ = sparse_decode(
        call["q"], k_cache, call["indices"], k_cache.shape[1], call["softmax_scale"],
        topk_length=call.get("topk_length"), attn_sink=call.get("attn_sink"),
        extra_k_cache=extra, extra_indices=call.get("extra_indices_in_kvcache") if extra is not None else None,
        extra_block_size=extra.shape[1] if extra is not None else None,
        extra_topk_length=call.get("extra_topk_length") if extra is not None else None,
    )
    inv_rope = call.get("inv_rope")
    if inv_rope is not None:
        from sglang.srt.layers.attention.hip_flash_mla import _apply_inverse_rope

        _apply_inverse_rope(out, inv_rope)
    return out


# --- dsv4-fused-compress ------------------------------------------------------------------------

# ``_forward_compress_all_in_one``'s locals at the edit, on 0.5.13 ... 0.5.23: the arguments and the
# three it has computed by then. A name outside these (a later release's new argument) declines.
_COMPRESS_LOCALS = frozenset({
    "self", "kv_score_buffer", "kv_score_input", "ape", "head_dim", "norm", "freqs_cis_cache", "kv_cache", "is_indexer",
    "rotate", "compress_ratio", "page_size", "out_loc", "use_fp4_indexer", "plan", "is_online", "coff", "last_dim",
    "_shd_fused_compress_call", "_shd_fused_compress_prefill_call",  # the edits' own imports
    # 0.5.14+
    "bf16_store",
    # 0.5.20+ (kv_layout from 0.5.21)
    "kv_scale_cache", "rope_cache", "kv_layout", "fp8_2buff", "kv_cache_rope",
})
_COMPRESS_OFF = ("use_fp4_indexer", "is_online", "bf16_store", "fp8_2buff")  # each must be False where present
_COMPRESS_NONE = ("kv_scale_cache", "rope_cache", "kv_cache_rope")  # each must be None where present


def _fp32_contiguous(t, device, numel: int) -> bool:
    """A contiguous fp32 tensor of ``numel`` elements on ``device``."""
    return bool(isinstance(t, torch.Tensor) and t.device == device and t.dtype == torch.float32
                and t.numel() == numel and t.is_contiguous())


def _is_plan(plan, type_name: str, *tables) -> bool:
    """``plan`` is SGLang's ``type_name`` (decode or prefill, as its ``is_decode`` says) whose
    ``tables`` (attribute, bytes per row) are contiguous uint8 rows of that many bytes."""
    if type(plan).__name__ != type_name or getattr(plan, "is_decode", None) is not (type_name == "CompressorDecodePlan"):
        return False
    for name, width in tables:
        t = getattr(plan, name, None)
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 2 and t.shape[1] == width
                and t.is_contiguous()):
            return False
    return True


def fused_compress_applies(env: dict) -> bool:
    """Whether ours implements this compressor step, decode or prefill (``env``: the edited method's
    locals; the patches' module docstrings for what each condition means)."""
    if set(env) - _COMPRESS_LOCALS:
        return False
    if any(env.get(k, False) is not False for k in _COMPRESS_OFF) or any(env.get(k) is not None for k in _COMPRESS_NONE):
        return False
    layout = env.get("kv_layout")
    if layout is not None and str(getattr(layout, "value", layout)) != "v4":
        return False
    plan, u, ratio, d = env.get("plan"), env.get("kv_score_input"), env.get("compress_ratio"), env.get("head_dim")
    if not (_is_plan(plan, "CompressorDecodePlan", ("plan_d", 16)) or _is_plan(plan, "CompressorPrefillPlan", ("plan_c", 16),
                                                                               ("plan_w", 8))):
        return False
    if ratio not in (4, 128) or d not in (128, 512) or bool(env.get("rotate")) != (d == 128) \
            or getattr(plan, "compress_ratio", None) != ratio:
        return False
    if not isinstance(u, torch.Tensor) or u.dim() != 2 or u.shape[0] == 0 or u.dtype != torch.float32 \
            or u.stride(1) != 1:
        return False  # upstream's kernels need the rows in the state's dtype (fp32); bf16 rows break them
    width = (4 if ratio == 4 else 2) * d
    buf, dev = env.get("kv_score_buffer"), u.device
    norm, ape = env.get("norm"), env.get("ape")
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    freqs, cache, loc = env.get("freqs_cis_cache"), env.get("kv_cache"), env.get("out_loc")
    if plan.is_decode:
        plans_ok = plan.plan_d.device == dev and plan.plan_d.shape[0] == u.shape[0]
    else:  # ragged rows are 16-bit in the plan
        plans_ok = plan.plan_c.device == dev and plan.plan_w.device == dev and u.shape[0] <= 1 << 16
    return bool(
        u.shape[1] == width and plans_ok
        and isinstance(buf, torch.Tensor) and buf.dtype == torch.float32 and buf.device == dev and buf.dim() == 3
        and tuple(buf.shape[1:]) == (ratio, width) and buf.is_contiguous()
        and _fp32_contiguous(ape, dev, (8 if ratio == 4 else 128) * d)
        and _fp32_contiguous(weight, dev, d) and weight.dim() == 1
        and isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0
        and isinstance(freqs, torch.Tensor) and freqs.dtype == torch.complex64 and freqs.dim() == 2
        and freqs.shape[1] == 32 and freqs.device == dev and freqs.is_contiguous()
        and isinstance(cache, torch.Tensor) and cache.dtype == torch.uint8 and cache.dim() == 2 and cache.device == dev
        and isinstance(loc, torch.Tensor) and loc.dim() == 1 and loc.shape[0] == u.shape[0] and loc.device == dev
        and loc.dtype in (torch.int32, torch.int64)
        and isinstance(env.get("page_size"), int) and env["page_size"] > 0
    )


# Upstream's HIP Triton store (``fused_store_cache`` on ROCm for the V4 layout), by release: the layout
# our kernel's in-launch store writes is that one's (its module: 0.5.17+ / 0.5.13 ... 0.5.16).
_TRITON_STORE = ("sglang.kernels.ops.kvcache.triton_store_cache", "sglang.jit_kernel.triton_store_cache")

# A test switch, not a setting: the emitted rows handed to upstream's store instead of stored in our
# launch, so a test can compare the in-launch store's bytes with upstream's store of the same rows.
ROWS_TO_UPSTREAMS_STORE = False


@functools.lru_cache(maxsize=None)
def _triton_store_module():
    for name in _TRITON_STORE:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not name.startswith(e.name or "\0"):
                raise
    return None


def _indexer_preshuffle(module):
    """The indexer cache's preshuffle tile as upstream's store would use it now (0: token-major), or
    None where that cannot be told: read from the store kernel itself (does it take a
    ``PRESHUFFLE_TILE``?) and, where it does, from the release's own gate and tile, asked at the
    call as the store asks them (0.5.17+: ``aiter_can_use_preshuffle_paged_mqa``, cached there)."""
    kernel = getattr(module, "_triton_fused_store_indexer_kernel", None)
    if kernel is None or not hasattr(kernel, "arg_names"):
        return None
    if "PRESHUFFLE_TILE" not in kernel.arg_names:
        return 0
    gate, tile = getattr(module, "aiter_can_use_preshuffle_paged_mqa", None), getattr(
        module, "INDEXER_K_CACHE_PRESHUFFLE_TILE", None)
    if not callable(gate) or not isinstance(tile, int) or tile <= 0:
        return None
    return tile if gate() else 0


def cache_store(env: dict):
    """The in-launch store for this step (a ``CacheStore``), or None, and then the step keeps
    upstream's kernels: the FP8 of gfx94x (e4m3fnuz: ours writes OCP e4m3; and there, to 0.5.20,
    upstream's Triton store addresses in int32, which a per-layer cache over 2 GiB overflows, where
    its default JIT path does not), a release whose Triton store is not one we know (module, indexer
    layout), or a cache or slot the ``CacheStore`` refuses."""
    from sgl_hip_kernels.dsv4.compress import CacheStore

    u, cache, loc = env["kv_score_input"], env["kv_cache"], env["out_loc"]
    if not _kernel_reads_this_fp8(u):
        return None
    module = _triton_store_module()
    if module is None:
        return None
    preshuffle = _indexer_preshuffle(module) if env["is_indexer"] else 0
    if preshuffle is None:
        return None
    store = CacheStore("indexer" if env["is_indexer"] else "flashmla", cache, loc, env["page_size"], preshuffle)
    try:
        store.check(u.shape[0], env["head_dim"], u.device)
    except ValueError:
        return None
    return store


def fused_compress_call(env: dict) -> bool:
    """dsv4-fused-compress: answer one decode step of ``_forward_compress_all_in_one`` (``env``: its
    locals) with this project's fused compressor, which stores the emitted rows into the compressed
    cache in the same launch (:func:`cache_store`); ``False`` (nothing done) for a prefill chunk
    (:func:`fused_compress_prefill_call`'s), where ours does not implement the step or cannot store
    into that cache, and the edited method then runs upstream's kernels unchanged."""
    return getattr(env.get("plan"), "is_decode", None) is True and _fused_compress(env)


def fused_compress_prefill_call(env: dict) -> bool:
    """dsv4-fused-compress-prefill: the same for one prefill chunk (SGLang's prefill plan read in
    place: ``compress_prefill_paged``); ``False`` for a decode step and where ours does not apply."""
    return getattr(env.get("plan"), "is_decode", None) is False and _fused_compress(env)


def _fused_compress(env: dict) -> bool:
    if not fused_compress_applies(env):
        return False
    store = cache_store(env)
    if store is None:
        return False
    from sgl_hip_kernels.dsv4.compress import compress_decode, compress_prefill_paged, launch_rule, workspace_fits

    ratio, d, u = env["compress_ratio"], env["head_dim"], env["kv_score_input"]
    buf, plan = env["kv_score_buffer"], env["plan"]
    rows = u.shape[0] if plan.is_decode else plan.plan_c.shape[0]
    if u.is_cuda and torch.cuda.is_current_stream_capturing() and not workspace_fits(
            rows, d, ratio, u.device, launch_rule(ratio, d, prefill=not plan.is_decode, batch=rows)):
        return False  # no workspace can be made under capture (SGLang's eager warm-up makes it first)
    table = torch.view_as_real(env["freqs_cis_cache"])  # (max_pos, 32, 2): cos, sin interleaved, read in place
    params = (env["ape"].view(-1, d), env["norm"].weight, float(env["norm"].variance_epsilon), table[..., 0],
              table[..., 1], ratio)
    state = buf.view(-1, buf.shape[-1])
    if plan.is_decode:
        pd = plan.plan_d.view(torch.int32)  # (B, 4): seq_len, write_loc, previous block's page, current page
        run = functools.partial(compress_decode, u, state, pd[:, 2:] if ratio == 4 else pd[:, 3:], pd[:, 0], *params,
                                page_order="prev_cur")
        loc = env["out_loc"]
    else:
        # (N, 4): seq_len, ragged row | rows in the ring << 16, the two pages; (M, 2): ragged row, state row
        pc, pw = plan.plan_c.view(torch.int32), plan.plan_w.view(torch.int32)
        run = functools.partial(compress_prefill_paged, u, state, pc, pw, *params)
    if not ROWS_TO_UPSTREAMS_STORE:  # rows that emit nothing write nothing, as upstream's JIT store skips them
        run(rotate=bool(env["rotate"]), store=store, check_indices=False)
        return True
    # (The test switch.) The attention rows go to the store as bf16, as upstream's default store
    # (its JIT norm-RoPE-store) rounds them to bf16 before the FP8 quantisation; the indexer's as fp32.
    from sglang.srt.mem_cache import deepseek_v4_memory_pool as pool_module

    out = torch.empty(rows, d, dtype=torch.float32 if env["is_indexer"] else torch.bfloat16, device=u.device)
    run(rotate=bool(env["rotate"]), out=out, check_indices=False)
    if not plan.is_decode:  # the plan's rows that are not padding, at their last token's out_loc
        live = pc[:, 0] != -1
        out, loc = out[live], env["out_loc"][(pc[live, 1] & 0xFFFF).long()]
    # Decode: rows that emit nothing are 0 and their out_loc is 0 (the metadata's dummy slot): the store
    # writes that slot, as upstream's _forward_unified_hip does (its default path skips those rows).
    pool_module.fused_store_cache(out, env["kv_cache"], loc, page_size=env["page_size"],
                                  type="indexer" if env["is_indexer"] else "flashmla")
    return True

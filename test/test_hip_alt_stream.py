"""hip-alt-stream on the installed release's real DeepSeek-V2 code (0.5.11 here; test_releases runs
this file on 0.5.12.post1, where the patch is the guard alone, and sees it skipped from 0.5.13).

* The double scaling, demonstrated (DEFECT, asserted as such): the unpatched dual-stream MoE on HIP
  with aiter multiplies the routed output by ``routed_scaling_factor`` although the top-k already
  applied it; fixed by the patch: the dual-stream output is ``forward_normal``'s, bit for bit.
* The streams: which op runs on which stream and where the waits are, the same with and without
  the patch; ``DeepseekV2MoE.forward`` itself takes the dual path in capture mode once a stream exists.
* ``DeepseekV2Model.__init__``: 0.5.11 creates no stream on HIP, the patched one does and hands it to
  every layer; 0.5.12.post1 creates it only with ``SGLANG_ROCM_USE_MULTI_STREAM=1`` (the patch leaves
  that alone there).
"""

from __future__ import annotations

import pytest
import torch

from sgl_hip_kernels.testing.checks import assert_bits_equal
from sglang_hip_decode import patching
from sglang_hip_decode.patches.hip_alt_stream import PATCH
from sglang_hip_decode.testing.moe_streams import MoEPath, import_dv2, model_alt_stream

from patch_fixtures import edits_here

if not edits_here(PATCH)[0]:  # the per-release runs (test_releases) count this skip
    pytest.skip(edits_here(PATCH)[1], allow_module_level=True)

RELEASE = patching.installed_release()
EDITS_STREAM = RELEASE < patching.parse_release("0.5.12")  # 0.5.12 creates it behind its own switch
DUAL_ORDER = [("wait", "alt", "main"), ("shared_experts", "main"), ("gate", "alt"), ("topk", "alt"),
              ("experts", "alt"), ("wait", "main", "alt")]


@pytest.fixture(scope="module")
def dv2():
    return import_dv2()


@pytest.mark.parametrize("tokens", [1, 7])
def test_defect_double_scaling_and_the_fix(rng, dv2, tokens):
    path = MoEPath(rng, tokens=tokens, dv2=dv2)
    shared = path.moe._forward_shared_experts(path.x)
    with path.hip():
        single = path.single()
        routed = path.moe.experts.outputs[-1]  # the experts' result: the top-k weights carry the factor
        dual = path.dual()
        assert_bits_equal(path.moe.experts.outputs[-1], routed)  # the same routed result, on the alt stream
        with patching.applied(PATCH):
            assert patching.is_applied(PATCH)
            fixed = path.dual()
    want_single = routed.clone()
    want_single += shared
    assert_bits_equal(single, want_single)
    # DEFECT (unpatched): the routed part multiplied by the factor a second time.
    twice = routed.clone()
    twice *= path.moe.routed_scaling_factor
    twice += shared
    assert_bits_equal(dual, twice)
    assert not torch.equal(dual, single), "the unpatched dual stream was expected to scale twice (documented defect)"
    # Fixed: exactly forward_normal's output.
    assert_bits_equal(fixed, single)
    assert len(path.moe.experts.outputs) == 3


@pytest.mark.parametrize("aiter, ktep", [(True, True), (False, False), (False, True)])
def test_patched_dual_stream_equals_forward_normal_on_every_flag_combination(rng, dv2, aiter, ktep):
    # Without aiter the top-k leaves the factor to the MoE (both paths multiply once); with the KT-EP
    # wrapper both always multiply. The patch keeps every case equal to forward_normal.
    from sglang.srt.layers.moe.kt_ep_wrapper import KTEPWrapperMethod
    from sglang_hip_decode.testing.sglang_import import swap_attrs

    path = MoEPath(rng, dv2=dv2)
    path.moe.topk.apply_factor = aiter
    if ktep:
        path.moe.experts.quant_method = KTEPWrapperMethod.__new__(KTEPWrapperMethod)
    with path.hip(), swap_attrs((dv2, "_use_aiter", aiter)), patching.applied(PATCH):
        single, dual = path.single(), path.dual()
    assert_bits_equal(dual, single)
    routed, shared = path.moe.experts.outputs[0], path.moe._forward_shared_experts(path.x)
    want = routed.clone()
    want *= path.moe.routed_scaling_factor  # scaled once, by the MoE
    want += shared
    assert_bits_equal(single, want)


def test_stream_order_is_unchanged_and_forward_takes_the_dual_path(rng, dv2):
    path = MoEPath(rng, dv2=dv2)
    logs = {}
    for arm, patches in (("unpatched", ()), ("patched", (PATCH,))):
        with patching.applied(*patches), path.hip():
            path.streams.log.clear()
            path.dual()
            logs[arm] = list(path.streams.log)
            path.streams.log.clear()
            path.dispatched()  # DeepseekV2MoE.forward's own choice: capture mode and a stream
            logs[arm + " via forward"] = list(path.streams.log)
    assert len(logs) == 4
    for log in logs.values():
        assert log == DUAL_ORDER, log
    path.moe.alt_stream = None  # no stream (unpatched 0.5.11 on HIP): forward takes forward_normal
    with path.hip():
        path.streams.log.clear()
        path.dispatched()
    assert path.streams.log == [("shared_experts", "main"), ("gate", "main"), ("topk", "main"), ("experts", "main")]


def test_the_model_creates_the_stream(dv2):
    stream, handed, log = model_alt_stream(dv2)
    if EDITS_STREAM:  # 0.5.11 on HIP: none (the defect the first edit fixes)
        assert stream is None and handed == [None] and log.created == []
    else:  # 0.5.12.post1: only behind its switch
        assert stream is None and handed == [None]
        stream, handed, log = model_alt_stream(dv2, env={"SGLANG_ROCM_USE_MULTI_STREAM": "1"})
        assert stream is not None and handed == [stream] and log.created == ["alt0"]
    with patching.applied(PATCH):
        stream, handed, log = model_alt_stream(dv2)
    if EDITS_STREAM:  # one stream, handed to the layer
        assert stream is not None and handed == [stream] and log.created == ["alt0"]
    else:  # the guard alone: still the switch's business
        assert stream is None and handed == [None] and log.created == []
    view = patching.for_release(PATCH)
    assert len(view.targets) == (2 if EDITS_STREAM else 1)

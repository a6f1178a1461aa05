"""hip-dual-stream-av4: the real ``forward_absorb_prepare`` -> ``forward_absorb_core`` of the installed
release (0.5.11 here; test_releases runs this file on 0.5.12.post1 too), NSA with the gfx95 TileLang
fused path forced (``sglang_hip_decode.testing.mla_decode``), with recording streams
(``testing.moe_streams.StreamLog``), in three arms on identical inputs:

* ``serial``: no alt stream (upstream's order on HIP without hip-alt-stream);
* ``fork``: an alt stream, unpatched (upstream's fork: q_b_proj on alt, the indexer on the current stream);
* ``av4``: an alt stream, patched.

Claims: outputs and KV caches bit-identical across the arms, on every forward mode that reaches
prepare (decode, idle, extend, target-verify) and composed with nsa-cat-skip; the dispatch order on
each stream and each wait's position, per layer, as the patch header says; the fused RoPE+cat+cache
kernel runs exactly once per layer (in prepare under A_v4, in core otherwise).
"""

from __future__ import annotations

import pytest

from sgl_hip_kernels.testing.checks import assert_bits_equal
from sglang_hip_decode import patching
from sglang_hip_decode.patches.hip_dual_stream_av4 import PATCH
from sglang_hip_decode.patches.nsa_cat_skip import PATCH as CAT_SKIP
from sglang_hip_decode.testing.mla_decode import MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs
from sglang_hip_decode.testing.moe_streams import StreamLog

from patch_fixtures import edits_here

if not edits_here(PATCH)[0]:  # the per-release runs (test_releases) count this skip
    pytest.skip(edits_here(PATCH)[1], allow_module_level=True)

SMALL = dict(heads=4, topk=32, context=64, hidden=64, layers=2)
NORM_SPLIT = [("wait", "alt", "main"), ("q_a_layernorm", "main"), ("kv_a_layernorm", "alt"), ("wait", "main", "alt")]
ORDER = {  # one layer, decode/idle: what each arm issues on which stream
    "serial": [("q_b_proj", "main"), ("indexer", "main"), ("fused_rope_cat_cache", "main"), ("attention", "main")],
    "fork": NORM_SPLIT + [("wait", "alt", "main"), ("q_b_proj", "alt"), ("indexer", "main"), ("wait", "main", "alt"),
                          ("fused_rope_cat_cache", "main"), ("attention", "main")],
    "av4": NORM_SPLIT + [("wait", "alt", "main"), ("q_b_proj", "main"), ("indexer", "alt"),
                         ("fused_rope_cat_cache", "main"), ("wait", "main", "alt"), ("attention", "main")],
}


@pytest.fixture(scope="module")
def sg():
    return import_sglang()


def run_arms(case, rng, sg, arms, reuse_topk=False):
    """``{arm: (outputs, caches, stream log)}`` from identical inputs; arms: name -> (stream?, patches).
    ``reuse_topk``: the layers reuse the previous layer's indices (skip_topk) instead of the indexer."""
    path = MlaDecodePath(case, rng, sg)
    x = make_inputs(case, rng)
    hidden, latent = path.prepare_inputs(x, rng)
    prev = x.topk_indices.clone() if reuse_topk else None
    runs = {}
    with path.hip():
        for arm, (with_stream, patches) in arms.items():
            xi = x.clone()
            log = StreamLog()
            with patching.applied(*patches), log.installed():
                assert all(patching.is_applied(p) for p in patches)
                outs = path.prepare_step(xi, hidden.clone(), latent.clone(), log.Stream("alt") if with_stream else None, log,
                                         prev)
            runs[arm] = ([o.clone() for o in outs], xi.kv_caches, list(log.log))
    return runs


def assert_same(runs, reference, count):
    assert len(runs) == count
    for arm, (outs, caches, _) in runs.items():
        assert len(outs) == len(runs[reference][0]) == len(caches) == SMALL["layers"]
        for a, b in zip(outs, runs[reference][0]):
            assert_bits_equal(a, b, arm)
        for a, b in zip(caches, runs[reference][1]):
            assert_bits_equal(a, b, arm)


ARMS = {"serial": (False, ()), "fork": (True, ()), "av4": (True, (PATCH,))}


@pytest.mark.parametrize("mode, batch, kv, llama", [("DECODE", 3, "bf16", False), ("DECODE", 3, "fp8_e4m3", False),
                                                   ("DECODE", 3, "bf16", True), ("IDLE", 0, "bf16", False)])
def test_decode_bit_identical_and_stream_order(rng, sg, mode, batch, kv, llama):
    # fp8_e4m3: the fused kernel (moved into prepare) writes an FP8 cache and returns FP8 q_cat;
    # llama-4 scaling: core scales q_cat after it (upstream refuses that on an FP8 q_cat)
    case = MlaDecodeCase(batch=batch, mode=mode, kv_dtype=kv, llama_4_scaling=llama, **SMALL)
    runs = run_arms(case, rng, sg, ARMS)
    assert_same(runs, "serial", 3)
    for arm, (_, _, log) in runs.items():
        # idle (no tokens): the NSA backend attends to nothing, the rest runs as on decode
        expected = [e for e in ORDER[arm] if batch or e[0] != "attention"]
        assert log == expected * case.layers, (arm, log)
        assert sum(op == "fused_rope_cat_cache" for op, *_ in log) == case.layers  # once per layer


@pytest.mark.parametrize("mode", ["EXTEND", "TARGET_VERIFY"])
def test_other_modes_unchanged(rng, sg, mode):
    # No fork outside decode/idle: the patched prepare takes upstream's serial path, core runs the kernel.
    case = MlaDecodeCase(batch=3, mode=mode, **SMALL)
    runs = run_arms(case, rng, sg, {"fork": (True, ()), "av4": (True, (PATCH,))})
    assert_same(runs, "fork", 2)
    assert runs["fork"][2] == runs["av4"][2]
    assert [op for op, *_ in runs["av4"][2]].count("fused_rope_cat_cache") == case.layers


def test_composes_with_nsa_cat_skip(rng, sg):
    if not edits_here(CAT_SKIP)[0]:
        pytest.skip(edits_here(CAT_SKIP)[1])
    case = MlaDecodeCase(batch=3, **SMALL)
    runs = run_arms(case, rng, sg, {"fork": (True, ()), "av4": (True, (PATCH,)), "both": (True, (CAT_SKIP, PATCH)),
                                    "both reversed": (True, (PATCH, CAT_SKIP))})
    assert_same(runs, "fork", 4)
    assert runs["both"][2] == runs["both reversed"][2] == runs["av4"][2]


def test_reusing_the_previous_layer_s_indices(rng, sg):
    # skip_topk (the index cache): no indexer call; the reuse branch (0.5.12 mirrors the indices into
    # the capture slot there) runs on the alt stream under A_v4, on the current one in upstream's fork.
    case = MlaDecodeCase(batch=3, **SMALL)
    runs = run_arms(case, rng, sg, ARMS, reuse_topk=True)
    assert_same(runs, "serial", 3)
    for arm, (_, _, log) in runs.items():
        expected = [e for e in ORDER[arm] if e[0] != "indexer"]
        assert log == expected * case.layers, (arm, log)


def test_core_without_prepare_s_result_computes_it(rng, sg):
    # The patched core called the unpatched way (nine arguments: no fused result) runs the kernel itself.
    case = MlaDecodeCase(batch=3, **SMALL)
    path = MlaDecodePath(case, rng, sg)
    x = make_inputs(case, rng)
    outs = {}
    with path.hip():
        for arm, patches in (("upstream", ()), ("patched", (PATCH,))):
            xi = x.clone()
            with patching.applied(*patches):
                outs[arm] = (path.step(xi), xi.kv_caches)
    assert len(path.record.q_cat_ptr) == 2 * case.layers  # the kernel ran in both arms, once per layer
    upstream, patched = outs["upstream"][0] + outs["upstream"][1], outs["patched"][0] + outs["patched"][1]
    assert len(upstream) == len(patched) == 2 * case.layers
    for a, b in zip(upstream, patched):
        assert_bits_equal(a, b)

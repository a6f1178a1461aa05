"""The redundant-copy finder on small torch programs (each case says what it must and must not
report), then on the decode harness's real sglang paths, unpatched and patched."""

from __future__ import annotations

import pytest
import torch

from sglang_hip_decode.testing.audit import opaque
from sglang_hip_decode.testing.find_copies import RedundantCopyFinder


def run(fn, calls: int = 1, **kwargs) -> RedundantCopyFinder:
    finder = RedundantCopyFinder(root="sglang_hip_decode", **kwargs)  # this test file is the "upstream" here
    with finder:
        for _ in range(calls):
            with finder.call():
                fn()
    return finder


def rand(*shape, gen=None):
    return torch.randn(*shape, generator=gen or torch.Generator().manual_seed(sum(shape)))


def test_clone_of_an_unchanged_tensor_is_a_duplicate_once_per_call_site():
    x = rand(8, 16)
    keep = []

    def fn():
        keep.append(x.clone())
        y = x * 2
        keep.append(y.clone())

    finder = run(fn, calls=3)
    rows = finder.report()
    assert len(rows) == 2 and all(r["kind"] == "duplicate" and r["op"] == "clone" for r in rows)
    assert [r["per_call"] for r in rows] == [1.0, 1.0] and all(r["bytes"] == 8 * 16 * 4 for r in rows)
    assert rows[0]["twin"].startswith("its own source, an input of the call")
    assert rows[1]["twin"].startswith("its own source, mul at ")


def test_a_cat_that_rebuilds_a_live_buffer_from_its_views():
    produce = opaque("fused", lambda a: torch.cat([a, a.flip(-1)], -1))  # a kernel: its ops are not seen

    def fn():
        q = produce(rand(4, 3, 8))
        nope, rope = q[..., :8], q[..., 8:]
        fn.out = torch.cat([nope, rope], -1)

    rows = run(fn).report()
    assert [(r["kind"], r["op"], r["shape"]) for r in rows] == [("duplicate", "cat", [4, 3, 16])]
    assert rows[0]["twin"].startswith("the buffer its inputs are views of, kernel fused at ")


@pytest.mark.parametrize("how", ["op", "kernel"])
def test_no_false_positive_when_the_source_is_overwritten_later(how):
    scale = opaque("scale_in_place", lambda t: t.mul_(3))

    def fn():
        x = rand(6, 10) + 1
        saved = x.clone()  # needed: x changes below
        if how == "op":
            x.add_(1)
        else:
            scale(x)  # a kernel writes x in place: seen only by its bytes at the end of the call
        fn.keep = (x, saved)

    finder = run(fn)
    assert finder.report() == []
    assert len(finder.excluded) == 1 and finder.excluded[0].excluded.startswith("overwritten later in the call")


def test_no_false_positive_when_the_copy_is_modified_later():
    def fn():
        x = rand(6, 10)
        y = x.clone()
        y.mul_(2)
        fn.keep = (x, y)

    finder = run(fn)
    assert finder.report() == [] and len(finder.excluded) == 1


def test_relayout_of_a_buffer_made_in_the_call():
    w = rand(4, 8, 5)

    def fn():
        x = rand(3, 4, 8)  # (B, H, K)
        out = torch.empty(4, 3, 5)  # the GEMM writes (H, B, V) ...
        torch.bmm(x.transpose(0, 1), w, out=out)
        fn.flat = out.transpose(0, 1).flatten(1, 2)  # ... and the consumer wants (B, H*V): a copy

    rows = run(fn).report()
    assert [(r["kind"], r["op"]) for r in rows] == [("relayout", "clone")]
    assert rows[0]["twin"].startswith("empty at ") and "(3, 4, 5) view" in rows[0]["twin"]


def test_what_is_not_reported():
    persistent = torch.zeros(16, 32)  # e.g. a graph's input buffer: outlives the call
    x = rand(16, 32)

    def fn():
        persistent.copy_(x)  # into a buffer made before the call: needed
        fn.a = torch.zeros(16, 32).clone()  # constant bytes: would match any zero tensor
        fn.b = x[:1, :1].clone()  # 4 bytes: under min_bytes
        fn.c = x.t().contiguous()  # a transpose of an input: no tensor holds these bytes, not a fresh buffer
        fn.d = torch.cat([x, x])  # a new value

    finder = run(fn)
    assert finder.report() == [] and finder.excluded == []
    # bf16 ones: bytes 0x80 0x3F, not all equal; still a constant, so not matched to an unrelated full()
    ones, other = torch.ones(64, dtype=torch.bfloat16), torch.full((64,), 1.0, dtype=torch.bfloat16)
    assert run(lambda: torch.cat([ones[:32], ones[32:]])).report() == [] and other.sum() == 64
    # a gather that happens to read a whole fresh buffer is not a relayout
    def gather():
        buf = rand(8, 6) * 1
        gather.out = torch.index_select(buf.t(), 0, torch.tensor([0, 0, 1, 2, 3, 4]))
    assert run(gather).report() == []
    tiny = rand(2)  # 8 bytes: under min_bytes (64) it is not examined; with 0 it is a duplicate
    assert run(lambda: tiny.clone()).report() == []
    assert [r["op"] for r in run(lambda: setattr(fn, "t", tiny.clone()), min_bytes=0).report()] == ["clone"]
    fresh = {}

    def into_fresh():
        fresh["buf"] = torch.empty(16, 32)
        fresh["buf"].copy_(x)  # allocate + copy_ made in the call: a clone

    rows = run(into_fresh).report()
    assert [(r["kind"], r["op"]) for r in rows] == [("duplicate", "copy_")]


def test_report_needs_a_call():
    with pytest.raises(RuntimeError, match="no call was run"):
        RedundantCopyFinder().report()


# --- the decode harness's real sglang paths (the release this process imports) ---

FORWARD_MLA = "sglang/srt/models/deepseek_common/attention_forward_methods/forward_mla.py"
Q_RECAT = ("duplicate", "cat", "sglang/srt/layers/attention/utils.py", "concat_mla_absorb_q_general",
           "kernel fused_qk_rope_cat_and_cache_mla")  # the seeds' q re-cat (nsa-cat-skip)
MXFP4_FLATTEN = ("relayout", "clone", FORWARD_MLA, "forward_absorb_core", "empty")  # the seeds' v-bmm flatten copy
BF16_FLATTEN = ("relayout", "clone", FORWARD_MLA, "forward_absorb_core", "bmm")  # bf16 w_vc: no patch of ours
# Everything the finder reports per release, path and arm (2 layers: each site twice per call).
EXPECTED = {
    "0.5.11": {("nsa", False): {Q_RECAT, BF16_FLATTEN}, ("nsa", True): {BF16_FLATTEN},
               ("mxfp4", False): {MXFP4_FLATTEN}, ("mxfp4", True): set(),
               ("indexer", False): set(), ("indexer", True): set()},
    "0.5.12.post1": {("nsa", False): {BF16_FLATTEN}, ("nsa", True): {BF16_FLATTEN},  # upstream removed the re-cat
                     ("mxfp4", False): {MXFP4_FLATTEN}, ("mxfp4", True): set(),
                     ("indexer", False): set(), ("indexer", True): set()},
    "0.5.13.post1": {("nsa", False): {BF16_FLATTEN}, ("nsa", True): {BF16_FLATTEN},
                     ("mxfp4", False): set(), ("mxfp4", True): set(),  # upstream's _bmm_buf (sglang#25463)
                     ("indexer", False): set(), ("indexer", True): set()},
    "0.5.23": {(path, patched): set() for path in ("nsa", "mxfp4", "indexer") for patched in (False, True)},
}


def site_key(row: dict) -> tuple:
    path, func = row["site"].rsplit(" in ", 1)
    return row["kind"], row["op"], path.rsplit(":", 1)[0].split(" (patched")[0], func, row["twin_op"]


@pytest.mark.parametrize("kind", ["nsa", "mxfp4", "indexer"])
def test_decode_paths_unpatched_and_patched(kind):
    from sglang_hip_decode.patching import installed_release
    from sglang_hip_decode.declare import format_release
    from sglang_hip_decode.testing.find_copies_paths import PATHS, applies, find_copies

    release = format_release(installed_release())
    if release not in EXPECTED:
        pytest.skip(f"no recorded findings for sglang {release} (test_releases runs the others)")
    for patched in (False, True):
        report = find_copies(kind, patched=patched, calls=2)
        assert "unavailable" not in report, report["unavailable"]
        assert report["calls"] == 2 and report["patch_active"] == (patched and applies(kind)[0])
        found = [site_key(r) for r in report["rows"]]
        assert len(found) == len(set(found)) and set(found) == EXPECTED[release][(kind, patched)], (patched, report["rows"])
        assert all(r["per_call"] == 2 and r["in_upstream"] and r["stack"] for r in report["rows"])
        removes = {k[:4] for k in EXPECTED[release][(kind, False)] - EXPECTED[release][(kind, True)]}
        if applies(kind)[0]:  # what the patch removes is what its path declares
            assert removes == set(PATHS[kind].removes), removes


def test_cli_find_copies(capsys):
    from sglang_hip_decode import cli
    from sglang_hip_decode.declare import format_release
    from sglang_hip_decode.patching import installed_release

    expected = EXPECTED[format_release(installed_release())][("mxfp4", False)]
    assert cli.main(["find-copies", "mxfp4", "--arm", "unpatched"]) == 0
    out = capsys.readouterr().out
    assert f"unpatched, 2 calls on cpu; {len(expected)} call site(s) with a redundant copy" in out
    if expected:
        assert "relayout: clone bfloat16[3, 4, 128] (3072 B), 2 per call" in out and "forward_absorb_core" in out
    assert cli.main(["find-copies", "indexer", "--json", "--calls", "1"]) == 0
    reports = __import__("json").loads(capsys.readouterr().out)
    assert [(r["path"], r["patched"], r["rows"]) for r in reports] == [("indexer", False, []), ("indexer", True, [])]

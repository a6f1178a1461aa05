"""`make bench` in quick mode, so no benchmark rots: every benchmark ``run_all.discover()`` finds runs
with ``--quick --json FILE`` (on the CPU: copy audits and interpreter checks, no timing), writes the
shared table format, and where a benchmark states a verdict the quick shapes can show, it is checked
from its JSON (not from the printed table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from run_all import discover  # noqa: E402

SCRIPTS = discover()


def check_nsa_cat_skip(result):
    # The copy audit at the quick shapes: one cat per layer removed, its bytes B*H*576*2.
    assert "fused_qk_rope_cat_and_cache_mla=" in result["providers"]
    rows = [(r["heads"], r["batch"], r["kv"], r["cats_unpatched"], r["cats_patched"], r["cat_bytes"]) for r in result["rows"]]
    assert rows == [(8, 1, "bf16", 1.0, 0.0, 9216), (8, 4, "bf16", 1.0, 0.0, 36864)]


def check_indexer_rope_guard(result):
    # In-place RoPE: 0.5.10 cloned and copied q and k (4 ops), 0.5.11 and the patch copy nothing.
    first = result["rows"][0]
    assert (first["tokens"], first["rope"], first["copies_0.5.10"], first["copies_0.5.11"], first["copies_patched"]) == (
        1, "in place", "4 (16640 B)", "0 (0 B)", "0 (0 B)")


def check_mxfp4_vbmm_layout(result):
    # bf16 o_proj at B=4: the flatten copy gone; B=1 and quantised o_proj: no copy either way.
    rows = result["rows"]
    assert (rows[1]["o_proj"], rows[1]["batch"], rows[1]["copies_unpatched"], rows[1]["copies_patched"]) == (
        "bf16", 4, "1 (8192 B)", "0 (0 B)")
    assert all(r["copies_unpatched"] == r["copies_patched"] == "0 (0 B)" for i, r in enumerate(rows) if i != 1)
    assert {r["o_proj"] for r in rows} == {"bf16", "fp8", "mxfp4"}


def check_streams(result):
    # On the CPU: the dual path's order on the recording streams, and its output equal to one stream's.
    order = "alt.wait(main) shared_experts@main gate@alt topk@alt experts@alt main.wait(alt)"
    assert [(r["batch"], r["outputs_equal"], r["dual_stream_order"]) for r in result["rows"]] == [
        (1, True, order), (4, True, order)]
    split = "alt.wait(main) q_a_layernorm@main kv_a_layernorm@alt main.wait(alt) alt.wait(main) "
    assert {r["arm"]: r["prepare_stream_order"] for r in result["prepare"]["rows"]} == {
        "serial": "q_b_proj@main indexer@main fused_rope_cat_cache@main attention@main",
        "fork": split + "q_b_proj@alt indexer@main main.wait(alt) fused_rope_cat_cache@main attention@main",
        "av4": split + "q_b_proj@main indexer@alt fused_rope_cat_cache@main main.wait(alt) attention@main"}


def check_dsv4_kernel(column, count):
    def check(result):
        # On the CPU each table checks the kernel (interpreter, fp32) against torch: the error column.
        errors = [r[column] for r in result["rows"]]
        assert len(errors) == count and all(e < 1e-4 for e in errors), errors  # a NaN fails too

    return check


def check_indexer_k_cache(result):
    # On the CPU: the writer's bytes equal the reference's and the reader's logits match, both layouts.
    rows = result["rows"]
    assert [r["layout"] for r in rows] == ["row-major", "preshuffled"], rows
    assert all(r["bytes_differ"] == 0 and r["logits_err"] < 1e-4 for r in rows), rows


CHECKS = {
    "bench_nsa_cat_skip": check_nsa_cat_skip,
    "bench_indexer_rope_guard": check_indexer_rope_guard,
    "bench_mxfp4_vbmm_layout": check_mxfp4_vbmm_layout,
    "bench_streams": check_streams,
    "bench_dsv4_compress": check_dsv4_kernel("max_abs_diff_vs_torch", 2),
    "bench_dsv4_qk_norm": check_dsv4_kernel("max_abs_err_vs_ref", 1),
    "bench_dsv4_sparse_decode": check_dsv4_kernel("err_ours", 2),
    "bench_indexer_k_cache": check_indexer_k_cache,
}


def test_every_benchmark_is_discovered_and_every_check_has_one():
    assert len(SCRIPTS) >= 5
    assert set(CHECKS) <= {s.stem for s in SCRIPTS}, "a check for a benchmark that no longer exists"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_quick_run_writes_its_table(script, tmp_path):
    env = dict(os.environ)
    if not torch.cuda.is_available():  # as run_all does: the kernels run under the interpreter
        env.setdefault("TRITON_INTERPRET", "1")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"benchmark", "device", "providers", "columns", "rows"} <= set(result)
    assert result["rows"] and all(set(result["columns"]) <= set(row) for row in result["rows"])
    if not torch.cuda.is_available():
        assert result["device"].startswith("cpu")
    if script.stem in CHECKS:
        CHECKS[script.stem](result)


def test_make_bench_runs_them_and_prints_one_table_each(tmp_path, monkeypatch, capsys):
    import run_all

    assert run_all.main(["--only", "bench_dsv4_qk_norm"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "## dsv4 fused QK RMSNorm" in out and "\ndevice: " in out and "; providers: " in out
    assert out.rstrip().endswith("summary: 1 of 1 benchmarks ran")
    assert "[1/1] sgl-kernel/benchmark/bench_dsv4_qk_norm.py ... ok, " in captured.err
    import torch

    if not torch.cuda.is_available():
        assert "the CPU: only copy audits, kernel counts and the Triton kernels' correctness" in captured.err
    assert "Warning" not in captured.err  # sglang's import warnings are silenced
    # A benchmark that fails is named, its output shown, and the run fails.
    (tmp_path / "bench_broken.py").write_text("import sys\nprint('why it broke', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setattr(run_all, "SEARCH", (tmp_path,))
    assert run_all.main([]) == 1
    captured = capsys.readouterr()
    assert "summary: 0 of 1 benchmarks ran; FAILED: bench_broken.py" in captured.out
    assert "FAILED after" in captured.err and "why it broke" in captured.err


def test_upstream_vs_ours_row_of_the_gpu_patch_benchmarks():
    """The row the GPU patch benchmarks write: the caller's fields, the ratio of the medians, then each
    arm's median / p20 / p80 µs, kernels and error, in that order."""
    from sglang_hip_decode.testing.ab import ArmResult, upstream_vs_ours_row

    runs = {"upstream": ArmResult(None, 2.0, [3.0, 1.0, 2.0, 4.0, 5.0]), "ours": ArmResult(None, 1.0, [1.0, 2.0, 1.5])}
    row = upstream_vs_ours_row(runs, {"upstream": 0.25, "ours": 0.5}, layer="c4", batch=4)
    assert list(row)[:3] == ["layer", "batch", "speedup"] and row["layer"] == "c4" and row["batch"] == 4
    assert row["speedup"] == 3.0 / 1.5 and row["upstream_us"] == 3.0 and row["ours_us"] == 1.5
    assert row["upstream_kernels"] == 2.0 and row["ours_kernels"] == 1.0 and row["err_ours"] == 0.5
    assert row["upstream_p20_us"] <= row["upstream_us"] <= row["upstream_p80_us"]
    assert len(row) == 3 + 2 * 5

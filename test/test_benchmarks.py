"""`make bench` in quick mode: every benchmark runs on the CPU and prints its table (so none rots)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nsa_cat_skip_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "run_all.py"), "--only", "nsa_cat_skip"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "## nsa-cat-skip" in out
    assert "providers: fused_qk_rope_cat_and_cache_mla=" in out
    # The copy audit's verdict at the quick shapes: one cat per layer removed, its bytes B*H*576*2.
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("8 ")]
    assert [r[:6] for r in rows] == [["8", "1", "bf16", "1.0", "0.0", "9216"], ["8", "4", "bf16", "1.0", "0.0", "36864"]]


def test_indexer_rope_guard_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "run_all.py"), "--only", "indexer"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    # in-place RoPE: 0.5.10 cloned and copied q and k (4 ops), 0.5.11 and the patch copy nothing
    assert rows[0] == ["1", "in", "place", "4", "(16640", "B)", "0", "(0", "B)", "0", "(0", "B)"]


def test_mxfp4_vbmm_layout_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "run_all.py"), "--only", "mxfp4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["bf16"], ["fp8"], ["mxfp4"])]
    # bf16 o_proj at B=4: the flatten copy (4*4*... bytes) gone; B=1 and quantised o_proj: no copy either way
    assert rows[1] == ["bf16", "4", "1", "(8192", "B)", "0", "(0", "B)"]
    assert all(r[2:] == ["0", "(0", "B)", "0", "(0", "B)"] for r in rows if r != rows[1])


def test_dsv4_kernels_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "run_all.py"), "--only", "dsv4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## dsv4 fused KV compressor" in proc.stdout and "## dsv4 fused QK RMSNorm" in proc.stdout
    # On the CPU each table checks the kernel (interpreter, fp32) against torch: the last column is the error.
    errors = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.split()[-1:] and "e-" in line.split()[-1]]
    assert len(errors) == 3 and max(errors) < 1e-4, proc.stdout

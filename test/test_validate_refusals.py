"""The A/B runner end to end against the stand-in server, where the run must be refused: an 'on'
server that applied nothing, a server never healthy, one dying mid-run, one without the plugin, too
few processes reporting, a bench run that did not complete every request. Each leaves nothing
running and keeps what was measured."""

from __future__ import annotations

import json

from runner_helpers import free_port, processes_on_port, run_runner, runner_args


def test_on_run_that_applied_nothing_is_refused(files, tmp_path):
    # On this CPU the HIP-gated patches stay off unless forced: the 'on' server applies nothing.
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port), {})
    assert proc.returncode == 1
    assert "[on] refusing the 'on' arm: not every measured patch (nsa-cat-skip, mxfp4-vbmm-layout, indexer-rope-guard)" \
        in proc.stderr
    assert "nsa-cat-skip: off (not HIP" in proc.stderr
    assert not (tmp_path / "ab" / "results.json").exists()
    partial = json.loads((tmp_path / "ab" / "results.partial.json").read_text())
    assert partial["arms"]["off"]["bench"]["completed"] == 4  # the off arm's measurements are kept
    assert "refusing the 'on' arm" in partial["error"]
    assert processes_on_port(port) == []


def test_server_never_healthy(files, tmp_path):
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--never-healthy", health_timeout=4), {})
    assert proc.returncode == 1
    assert "[off] the server was not healthy within 4 s" in proc.stderr
    assert processes_on_port(port) == []


def test_server_dying_mid_run(files, tmp_path):
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--die-after 2"), {})
    assert proc.returncode == 1
    assert "[off]" in proc.stderr and ("the server died during GSM8K" in proc.stderr or "GSM8K failed" in proc.stderr)
    assert processes_on_port(port) == []


def test_no_plugin_status_is_an_error(files, tmp_path):
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--skip-plugin"), {})
    assert proc.returncode == 1 and "the server wrote no plugin status" in proc.stderr


def test_too_few_processes_reported(files, tmp_path):
    # SGLang calls the plugin in the launcher and in each scheduler: one status line alone means a
    # scheduler ran without it.
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--workers 0"), {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 1
    assert "[off] only 1 server processes wrote a plugin status, expected at least 2" in proc.stderr
    assert processes_on_port(port) == []


def test_a_measurement_that_is_not_one_is_refused(files, tmp_path):
    # Half the streamed requests fail: bench_serving writes its file, the runner refuses it (a
    # file with 0 completed or no TPOT: test_check_bench_refuses_what_is_not_a_measurement; sglang
    # 0.5.11's bench_serving itself exits 1 when none completed, a failed client).
    port = free_port()
    message = "[off] bench_serving completed 2 of 4 requests: refusing the measurement"
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "results.json").write_text("{}")  # an earlier run's: must not survive this one
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--fail-streams-after 3"), {})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split(message)[0], "the runner itself must not raise"
    assert not (tmp_path / "ab" / "results.json").exists()
    partial = json.loads((tmp_path / "ab" / "results.partial.json").read_text())
    assert partial["arms"]["off"]["gsm8k"]["accuracy"] == 1.0  # what was measured is kept
    assert processes_on_port(port) == []

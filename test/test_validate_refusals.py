"""The A/B runner end to end against the stand-in server, where the run must be refused: an 'on'
server that applied nothing, a server never healthy, one dying mid-run, one without the plugin, too
few processes reporting, a bench run that did not complete every request. Each leaves nothing
running and keeps what was measured."""

from __future__ import annotations

import json

import pytest

from sglang_hip_decode.patches import catalog

from runner_helpers import free_port, processes_on_port, run_runner, runner_args


def test_on_run_that_applied_nothing_is_refused(files, tmp_path):
    # On this CPU the HIP-gated patches stay off unless forced: the 'on' server (the launcher and two
    # "scheduler" processes, each writing its status line) applies nothing. The refusal names every
    # process and patch.
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--workers 2"), {})
    assert proc.returncode == 1
    defaults = [e.name for e in catalog() if e.patch is not None and e.default]
    assert (f"[on] refusing the 'on' arm: not every measured patch ({', '.join(defaults)}) is applied in every "
            "server process (3 reported)") in proc.stderr
    wrong = [line.strip() for line in proc.stderr.splitlines() if ": off (not HIP" in line]
    assert len(wrong) == 3 * len(defaults) and all(line.startswith("pid ") for line in wrong)
    assert len({line.split()[1] for line in wrong}) == 3  # three distinct processes
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


@pytest.mark.parametrize("extra, message", [
    ("--fail-streams-after 3", "[off] bench_serving completed 2 of 4 requests: refusing the measurement"),
    # sglang 0.5.11's bench_serving itself raises when no request completed (numpy percentile of
    # nothing): a failed client, its traceback in the message; check_bench covers a file saying 0.
    ("--fail-streams-after 1", "[off] bench_serving failed (exit 1)"),
    ("--max-tokens 1", "[off] bench_serving reports median_tpot_ms = 0"),
], ids=["half-completed", "none-completed", "no-tpot"])
def test_a_measurement_that_is_not_one_is_refused(files, tmp_path, extra, message):
    port = free_port()
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "results.json").write_text("{}")  # an earlier run's: must not survive this one
    proc = run_runner(runner_args(files, tmp_path / "ab", port, extra), {})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split(message)[0], "the runner itself must not raise"
    assert not (tmp_path / "ab" / "results.json").exists()
    partial = json.loads((tmp_path / "ab" / "results.partial.json").read_text())
    assert partial["arms"]["off"]["gsm8k"]["accuracy"] == 1.0  # what was measured is kept
    assert processes_on_port(port) == []

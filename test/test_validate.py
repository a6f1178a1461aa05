"""The A/B runner against a loopback stand-in server (test/standin_server.py: a real HTTP server
process), with SGLang 0.5.11's real clients (sglang.test.few_shot_gsm8k, sglang.bench_serving)
pointed at it, tiny local GSM8K / ShareGPT / tokenizer files written by the tests (test/conftest.py).

Covered here: one successful run with the GLM-5 preset, shared by the assertions that read it
(report, arguments added to the preset's, the server checks); SIGINT/SIGTERM/SIGHUP and a killed
runner (nothing left running), a signal that arrives while the last server stops; the verdicts
(GSM8K below the threshold, a runner bug) and the checks (status lines of every process, bench
results) on the runner's own functions; every usage error caught before anything starts (exit 2);
the parsers on real client output; --dry-run. The refused runs: test_validate_refusals.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sglang_hip_decode import validate
from sglang_hip_decode.patches import catalog

from runner_helpers import free_port, processes_on_port, run_runner, runner_args


@pytest.fixture(scope="module")
def successful_run(files, tmp_path_factory):
    """One successful A/B run, shared by the tests that read it: the GLM-5 preset (its flags, its
    server checks, its measured patches) on TP 1 with an extra server flag and a threshold of 0.9."""
    port = free_port()
    out = tmp_path_factory.mktemp("ab-ok") / "ab"
    args = runner_args(files, out, port, "--kv-cache-dtype fp8_e4m3", threshold=0.9) + ["--preset", "glm5", "--tp", "1"]
    proc = run_runner(args, {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out, port


def test_success_path_and_report(successful_run):
    proc, out, port = successful_run
    results = json.loads((out / "results.json").read_text())
    on, off = results["arms"]["on"], results["arms"]["off"]
    defaults = sorted(e.name for e in catalog() if e.patch is not None and e.default)  # the 'on' arm's selection
    assert off["applied"] == []
    assert on["applied"] == defaults
    for arm in (on, off):
        assert arm["gsm8k"]["accuracy"] == 1.0 and arm["gsm8k"]["invalid"] == 0.0
        assert arm["bench"]["completed"] == 4 and arm["bench"]["median_tpot_ms"] > 0
        assert arm["processes"] == 2  # the launcher and one scheduler (TP 1)
    assert results["verdict"]["gsm8k_on_pass"] is True
    report = (out / "report.md").read_text()
    # 6 questions: the 95% interval [0.610, 1.000] holds the threshold, so neither pass nor fail
    assert ("| GSM8K accuracy [95% interval, 6 questions] (threshold 0.9) | 1.000 [0.610, 1.000] (inconclusive) "
            "| 1.000 [0.610, 1.000] (inconclusive) | +0.000 |") in report
    assert "GSM8K: the threshold 0.9 lies inside the 'on' arm's interval: 6 questions cannot tell" in report
    assert "TPOT median (ms, bench_serving's, median of repeats)" in report
    assert f"applied (on): {', '.join(defaults)} in all 2 reporting processes" in report
    assert results["versions"]["sglang"] == "0.5.11"
    assert processes_on_port(port) == []


def test_the_report_has_the_kernels_removed_per_decode_step(successful_run):
    # Each arm profiled the stand-in after its benchmark (/start_profile under a decode load of 2
    # streams); the stand-in's trace has the cat per layer only where nsa-cat-skip is not applied.
    _, out, _ = successful_run
    results = json.loads((out / "results.json").read_text())
    for arm in ("off", "on"):
        trace = results["arms"][arm]["profile"]["trace"]
        assert trace.startswith(str(out / arm / "profile")) and "TP-0" in trace
    kernels = results["kernels"]
    assert kernels["off"]["step_labels"] == {"step[DECODE bs=2]": 5} == kernels["on"]["step_labels"]
    assert kernels["layers"] == 4 and kernels["layers_inferred"]
    assert kernels["removed"] == ["CatArrayBatchedCopy<...>"] and kernels["added"] == []
    cat = kernels["rows"][0]
    assert (cat["name"], cat["count_off"], cat["count_on"], cat["count_off_per_layer"]) == ("CatArrayBatchedCopy<...>", 4, 0, 1)
    report = (out / "report.md").read_text()
    assert "## Kernels per decode step (rank 0's profile" in report
    assert "| `CatArrayBatchedCopy<...>` | removed | 4 → 0 | 1 → 0 | 10.0 → 0.0 | -10.0 |" in report
    assert "Net: -10.0 µs per decode step (-2.50 µs per layer)." in report


def test_parsers_on_real_client_output():
    text = "Accuracy: 0.953\nInvalid: 0.001\nLatency: 120.500 s\nOutput throughput: 4123.400 token/s\n"
    assert validate.parse_gsm8k(text) == {"accuracy": 0.953, "invalid": 0.001, "latency_s": 120.5, "output_throughput": 4123.4}
    with pytest.raises(validate.ValidationError, match="Accuracy"):
        validate.parse_gsm8k("no summary here")


def test_gsm8k_below_the_threshold_fails_with_the_report_written(successful_run, files, tmp_path, monkeypatch, capsys):
    # Each arm measured as the shared run measured it, but answering half the questions wrong: the
    # real run() computes the verdict and writes the report, main() prints it and exits 1.
    measured = json.loads((successful_run[1] / "results.json").read_text())["arms"]

    def arm_below_threshold(plan, arm, into, repeats, launch):
        into.update(measured[arm], gsm8k=dict(measured[arm]["gsm8k"], accuracy=0.5))

    monkeypatch.setattr(validate, "run_arm", arm_below_threshold)
    monkeypatch.setattr(validate, "versions", lambda python: {})
    out = tmp_path / "ab"
    assert validate.main(runner_args(files, out, free_port(), threshold=0.9)) == 1
    captured = capsys.readouterr()
    assert "validation failed: the 'on' arm's GSM8K accuracy is below the threshold 0.9 (the 'off' arm fails it too" \
        in captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["verdict"]["gsm8k_on_pass"] is False and results["verdict"]["gsm8k_off_pass"] is False
    # 3 of 6: the 95% interval [0.188, 0.812] lies below 0.9
    assert "0.500 [0.188, 0.812] (fail)" in captured.out and "0.500 [0.188, 0.812] (fail)" in (out / "report.md").read_text()


def test_a_signal_during_the_last_stop_is_not_lost(files, tmp_path, monkeypatch):
    # A SIGTERM noted while the 'on' server was being stopped: the run must end as terminated
    # (what it measured in results.partial.json), not print a report and exit 0.
    args = validate.build_parser().parse_args(runner_args(files, tmp_path / "ab", free_port()))
    plan = validate.make_plan(args)

    def fake_arm(plan, arm, measured, repeats, launch):
        measured["arm"] = arm
        if arm == "on":
            validate._SIGNALS.append(signal.SIGTERM)  # what the handler does

    monkeypatch.setattr(validate, "run_arm", fake_arm)
    monkeypatch.setattr(validate, "versions", lambda python: {})
    validate._SIGNALS.clear()
    try:
        with pytest.raises(validate.Interrupted):
            validate.run(plan)
    finally:
        validate._SIGNALS.clear()
    assert not (plan.out / "results.json").exists()
    partial = json.loads((plan.out / "results.partial.json").read_text())
    assert partial["arms"] == {"off": {"arm": "off"}, "on": {"arm": "on"}} and "SIGTERM" in partial["error"]


def test_a_runner_bug_is_exit_3_not_a_validation_result(files, tmp_path, monkeypatch, capsys):
    def broken(plan):
        raise TypeError("simulated bug")

    monkeypatch.setattr(validate, "run", broken)
    assert validate.main(runner_args(files, tmp_path / "ab", free_port())) == 3
    assert "runner error (a bug, not a validation result): TypeError: simulated bug" in capsys.readouterr().err


def test_check_bench_refuses_what_is_not_a_measurement(tmp_path):
    good = dict(completed=4, median_tpot_ms=1.5, median_itl_ms=1.4, output_len=6)
    validate.check_bench("off", good, 4, tmp_path / "log")
    for bad, message in [(dict(good, completed=0), "completed 0 of 4"), (dict(good, completed=3), "completed 3 of 4"),
                         (dict(good, median_tpot_ms=0.0), "median_tpot_ms = 0.0"),
                         (dict(good, median_tpot_ms=float("nan")), "median_tpot_ms = nan"),
                         (dict(good, median_itl_ms=None), "median_itl_ms = None"),
                         (dict(good, completed=None), "completed None of 4")]:
        with pytest.raises(validate.ValidationError, match=message):
            validate.check_bench("off", bad, 4, tmp_path / "log")


def test_dry_run_glm5_preset(capsys):
    assert validate.main(["--preset", "glm5", "--model", "/models/GLM-5.1-FP8", "--out", "/tmp/ab-glm5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "GSM8K threshold: 0.93 (GLM-5)" in out
    assert ("SGLANG_HIP_DECODE_STATUS_FILE=/tmp/ab-glm5/off/status.jsonl SGLANG_HIP_DECODE=0 " in out)
    assert "-m sglang.launch_server --model-path /models/GLM-5.1-FP8 --tp-size 8 --host 127.0.0.1 --port 30000 " \
           "--trust-remote-code --attention-backend nsa --nsa-decode-backend tilelang --nsa-prefill-backend tilelang" in out
    assert "-m sglang.bench_serving --backend sglang --host 127.0.0.1 --port 30000 --model /models/GLM-5.1-FP8 " \
           "--dataset-name random --random-input-len 8192 --random-output-len 1024 --random-range-ratio 0.8 " \
           "--max-concurrency 4 --num-prompts 20" in out
    assert "-m sglang.test.few_shot_gsm8k --host 127.0.0.1 --port 30000 --num-questions 1319 --num-shots 5" in out


def start_runner_until_healthy(files, tmp_path, port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_HIP_DECODE")}
    # A slow stream keeps the run inside bench_serving / GSM8K long enough to interrupt it.
    args = runner_args(files, tmp_path / "ab", port, "--token-ms 200")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "sglang_hip_decode.validate", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "[off] healthy" in line:
            break
    assert "[off] healthy" in seen, seen
    assert processes_on_port(port)
    return proc


@pytest.mark.parametrize("sig, code, message", [
    (signal.SIGINT, 130, "interrupted; servers stopped"),
    (signal.SIGTERM, 143, "terminated by SIGTERM; servers stopped"),
    (signal.SIGHUP, 129, "terminated by SIGHUP; servers stopped"),
], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signals_leave_nothing_running(files, tmp_path, sig, code, message):
    port = free_port()
    proc = start_runner_until_healthy(files, tmp_path, port)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and message in err, err[-2000:]
    assert processes_on_port(port) == []


def test_a_killed_runner_takes_its_server_with_it(files, tmp_path):
    # SIGKILL runs no handler: the server must die on its own (PR_SET_PDEATHSIG set before exec).
    port = free_port()
    proc = start_runner_until_healthy(files, tmp_path, port)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while processes_on_port(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_on_port(port) == []


def test_every_measured_patch_in_every_process():
    # Status lines as three server processes write them (the plugin's own Report.to_json): the
    # launcher applied both measured patches, two scheduler processes did not (as if they failed
    # there). The 'on' arm is refused, naming each process and its status.
    from sglang_hip_decode import PatchStatus, Report

    def line(pid, statuses):
        rows = tuple(PatchStatus(name, status, True, (), "", selected=True) for name, status in statuses.items())
        return dict(Report("0.5.11", "hip", rows, ()).to_json(), pid=pid, argv0=f"proc-{pid}")

    records = [line(1, {"nsa-cat-skip": "applied", "mxfp4-vbmm-layout": "applied"})]
    records += [line(pid, {"nsa-cat-skip": "off (not in SGLANG_HIP_DECODE_PATCHES)", "mxfp4-vbmm-layout": "applied"})
                for pid in (2, 3)]
    measured = ("nsa-cat-skip", "mxfp4-vbmm-layout")
    with pytest.raises(validate.ValidationError) as info:
        validate.check_applied("on", records, measured, processes=3)
    message = str(info.value)
    assert "not every measured patch (nsa-cat-skip, mxfp4-vbmm-layout) is applied in every server process (3 reported)" \
        in message
    wrong = [row.strip() for row in message.splitlines()[1:]]
    assert wrong == [f"pid {pid} (proc-{pid}): nsa-cat-skip: off (not in SGLANG_HIP_DECODE_PATCHES)" for pid in (2, 3)]
    assert validate.check_applied("on", records[:1], measured) == sorted(measured)
    with pytest.raises(validate.ValidationError, match="only 1 server processes wrote a plugin status, expected at least 3"):
        validate.check_applied("on", records[:1], measured, processes=3)
    with pytest.raises(validate.ValidationError, match=r"\[off\] the server applied"):
        validate.check_applied("off", records[:1])


def test_preset_run_adds_arguments_and_checks_the_server(successful_run, files, tmp_path):
    # The GLM-5 preset against the stand-in: the preset's flags reach the server with the extra
    # ones after them, the server's /server_info confirms NSA + TileLang, the two patches that act on
    # GLM-5 are measured (mxfp4-vbmm-layout is selected by default but does not act there).
    _, out, _ = successful_run
    results = json.loads((out / "results.json").read_text())
    assert results["patches_measured"] == ["nsa-cat-skip", "indexer-rope-guard"]
    assert results["server_args"] == ("--trust-remote-code --attention-backend nsa --nsa-decode-backend tilelang "
                                      "--nsa-prefill-backend tilelang --kv-cache-dtype fp8_e4m3")
    for arm in ("off", "on"):
        server = results["arms"][arm]["server"]
        shown = (server["attention_backend"], server["nsa_decode_backend"], server["kv_cache_dtype"])
        assert shown == ("nsa", "tilelang", "fp8_e4m3")
    report = (out / "report.md").read_text()
    assert "--nsa-decode-backend tilelang --nsa-prefill-backend tilelang --kv-cache-dtype fp8_e4m3" in report
    # The same preset with the decode backend overridden to one the patches do not act on: refused.
    port = free_port()
    args = runner_args(files, tmp_path / "ab2", port, "--nsa-decode-backend flashmla_sparse") + ["--preset", "glm5", "--tp", "1"]
    proc = run_runner(args, {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 1
    assert "[off] the server does not run what the preset needs (nsa_decode_backend tilelang or aiter" in proc.stderr
    assert "'nsa_decode_backend': 'flashmla_sparse'" in proc.stderr
    assert processes_on_port(port) == []


@pytest.mark.parametrize("change, message", [
    (dict(model="/no/such/model"), "--model /no/such/model does not exist"),
    (dict(gsm8k_data="/no/such/gsm8k.jsonl"), "--gsm8k-data /no/such/gsm8k.jsonl does not exist"),
    (dict(patches="nsa-cat-skp"), "--patches: unknown patch nsa-cat-skp"),
    (dict(patches="hip-dual-stream-av4", preset="glm5"), "hip-dual-stream-av4 reorders the alt-stream fork: select "
     "hip-alt-stream too"),
    (dict(patches="hip-dual-stream-av4", preset="glm5", sglang_release="0.5.12.post1"), "hip-dual-stream-av4 "
     "reorders the alt-stream fork: select hip-alt-stream too"),
    (dict(preset="glm5", patches="hip-alt-stream", sglang_release="0.5.13"), "preset glm5: none of the selected "
     "patches (hip-alt-stream) acts on it on sglang 0.5.13 (patches that do: indexer-rope-guard; nsa-cat-skip: upstream"),
    (dict(patches="none"), "--patches none measures nothing"),
    (dict(preset="kimi", patches="nsa-cat-skip"), "preset kimi: none of the selected patches (nsa-cat-skip) acts on it"),
    (dict(preset="dsv4"), "preset dsv4: sglang 0.5.11 has no DeepSeek-V4 model (it arrived in 0.5.12)"),
    (dict(preset="dsv4", sglang_release="0.5.12.post1"), "preset dsv4: none of the selected patches (nsa-cat-skip, "
     "mxfp4-vbmm-layout, indexer-rope-guard, dsv4-sparse-decode, dsv4-fused-compress) acts on it on sglang 0.5.12.post1 "
     "(patches that do: none; dsv4-sparse-decode: not applicable (no DeepSeek-V4 before 0.5.13); dsv4-fused-compress: "
     "not applicable (no DeepSeek-V4 before 0.5.13); dsv4-fused-compress-prefill: not applicable (no DeepSeek-V4 before "
     "0.5.13))"),
    (dict(preset="dsv4", patches="indexer-rope-guard", sglang_release="0.5.23"), "preset dsv4: none of the selected "
     "patches (indexer-rope-guard) acts on it on sglang 0.5.23 (patches that do: dsv4-sparse-decode, dsv4-fused-compress, "
     "dsv4-fused-compress-prefill)"),
    (dict(preset="kimi", sglang_release="0.5.13"), "preset kimi: none of the selected patches (nsa-cat-skip, "
     "mxfp4-vbmm-layout, indexer-rope-guard) acts on it on sglang 0.5.13 (patches that do: none; mxfp4-vbmm-layout: "
     "upstream has it (sglang#25463, since 0.5.13); hip-alt-stream: upstream has it (the dual-stream"),
    (dict(sglang_release="0.5.10"), "sglang 0.5.10: the plugin supports 0.5.11 and later"),
    (dict(sglang_release="v5"), "sglang release 'v5' is not a release string"),
    (dict(python="/bin/false"), "--python /bin/false has no readable sglang (no output); pass --sglang-release"),
    (dict(server_args="--host 0.0.0.0 --port 1234"), "--server-args may not set --host: the runner binds 127.0.0.1"),
    (dict(server_args="--port=1234"), "--server-args may not set --port: use the runner's --port"),
    (dict(server_args="--tp-size 2"), "--server-args may not set --tp-size: use the runner's --tp"),
    # SGLang's argparse takes any unambiguous prefix of a long flag: so does the refusal.
    (dict(server_args="--hos 0.0.0.0"), "--server-args may not set --hos (that is --host)"),
    (dict(server_args="--tp 4"), "--server-args may not set --tp (that is --tp-size)"),
    (dict(server_args="--tensor=4"), "--server-args may not set --tensor (that is --tensor-parallel-size)"),
    (dict(server_args="--model-p /elsewhere"), "--server-args may not set --model-p (that is --model-path)"),
    (dict(server_args="--config extra.yaml"), "--server-args may not set --config: put the flags in --server-args"),
    (dict(drop="--no-such-flag", preset="glm5"), "--drop-server-arg --no-such-flag: the preset's server arguments have no"),
    (dict(out="FILE/sub"), "is not a writable folder"),
    (dict(output_len=1), "--output-len >= 2"),
])
def test_usage_errors_are_caught_before_anything_starts(files, tmp_path, change, message):
    port = free_port()
    blocker = tmp_path / "FILE"
    blocker.write_text("a file, so no folder can be made under it")
    out = str(tmp_path / change.pop("out")) if "out" in change else str(tmp_path / "ab")
    args = runner_args(files, out, port, change.pop("server_args", ""))
    for key, value in change.items():
        if key == "drop":
            args += [f"--drop-server-arg={value}"]
        elif key == "model":
            args[args.index("--model") + 1] = value
        elif key == "gsm8k_data":
            args[args.index("--gsm8k-data") + 1] = value
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    start = time.monotonic()
    proc = run_runner(args, {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("usage error: ") and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "starting" not in proc.stdout and processes_on_port(port) == []
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("release", ["0.5.13.post1", "0.5.23"])
def test_dry_run_dsv4_preset_enables_the_dsv4_patches_in_the_on_arm(release, capsys):
    # --patches default: the GPU-verified DSV4 patches (DSV4_ADDS); named: every DSV4 patch.
    assert set(validate.DSV4_ADDS) <= set(validate.DSV4_PATCHES) and len(validate.DSV4_PATCHES) == 3
    # GPU-verified and no slower on the H200; the prefill half (slower there) only when named
    assert validate.DSV4_ADDS == ("dsv4-sparse-decode", "dsv4-fused-compress")
    for patches, dsv4 in (("default", validate.DSV4_ADDS), (",".join(validate.DSV4_PATCHES), validate.DSV4_PATCHES)):
        assert validate.main(["--preset", "dsv4", "--model", "/m/DeepSeek-V4", "--dry-run", "--sglang-release", release,
                              "--patches", patches]) == 0
        out = capsys.readouterr().out
        assert "# GSM8K threshold: 0.91 (DeepSeek-V4)" in out
        selected = ("nsa-cat-skip, mxfp4-vbmm-layout, indexer-rope-guard, " if patches == "default" else "") + ", ".join(dsv4)
        assert f"# measured patches: {', '.join(dsv4)} (selected for 'on': {selected})" in out, out
        off, on = out.split("# --- off:")[1].split("# --- on:")
        assert "SGLANG_HIP_DECODE=0 " in off and all(name not in off for name in dsv4)  # the plugin off
        (on_env,) = [w for w in on.split() if w.startswith("SGLANG_HIP_DECODE_PATCHES=")]
        assert set(dsv4) <= set(on_env.split("=", 1)[1].split(","))


def test_dry_run_per_release_flags_and_measured_patches(capsys):
    # 0.5.12.post1: still --nsa-*; nsa-cat-skip is upstream there, so only the guard is measured on GLM-5.
    assert validate.main(["--preset", "glm5", "--model", "/m/GLM-5.1-FP8", "--dry-run", "--sglang-release", "0.5.12.post1"]) == 0
    out = capsys.readouterr().out
    assert "# sglang 0.5.12.post1 (nsa flags)" in out and "# measured patches: indexer-rope-guard " in out
    assert "--attention-backend nsa --nsa-decode-backend tilelang --nsa-prefill-backend tilelang\n" in out
    assert "# server checks: decode attention backend nsa or dsa (one backend, renamed in 0.5.13); nsa_decode_backend " \
           "tilelang or aiter" in out
    # 0.5.13 and later: --attention-backend dsa and the --dsa-* flags (0.5.23 has no --nsa-* at all)
    assert validate.main(["--preset", "glm5", "--model", "/m/GLM-5.1-FP8", "--dry-run", "--sglang-release", "0.5.23"]) == 0
    out = capsys.readouterr().out
    assert "# sglang 0.5.23 (dsa flags)" in out and "# measured patches: indexer-rope-guard " in out
    assert "--attention-backend dsa --dsa-decode-backend tilelang --dsa-prefill-backend tilelang\n" in out
    assert "--nsa-" not in out
    # Kimi on 0.5.12.post1: mxfp4-vbmm-layout still ours
    assert validate.main(["--preset", "kimi", "--model", "/m/Kimi", "--dry-run", "--sglang-release", "0.5.12.post1"]) == 0
    assert "# measured patches: mxfp4-vbmm-layout " in capsys.readouterr().out


@pytest.mark.parametrize("release", ["0.5.11", "0.5.12.post1"])
def test_dry_run_with_hip_alt_stream(release, capsys, monkeypatch):
    # Measured on the DeepSeek-V2-family presets where it has edits; both arms get the hardware queues
    # ROCm's multi-stream needs, and on 0.5.12.x the 'on' arm also the switch that creates the stream.
    monkeypatch.setenv("GPU_MAX_HW_QUEUES", "2")  # too few: raised to 5
    assert validate.main(["--preset", "kimi", "--model", "/m/Kimi", "--dry-run", "--sglang-release", release,
                          "--patches", "hip-alt-stream"]) == 0
    out = capsys.readouterr().out
    assert "# measured patches: hip-alt-stream (selected for 'on': hip-alt-stream)" in out
    off, on = [line for line in out.splitlines() if "-m sglang.launch_server" in line]
    assert "GPU_MAX_HW_QUEUES=5 SGLANG_HIP_DECODE=0 " in off and "SGLANG_ROCM_USE_MULTI_STREAM" not in off
    assert "GPU_MAX_HW_QUEUES=5 SGLANG_HIP_DECODE=1 SGLANG_HIP_DECODE_PATCHES=hip-alt-stream" in on
    assert ("SGLANG_ROCM_USE_MULTI_STREAM=1" in on) == (release != "0.5.11")


def test_the_server_must_run_the_planned_release():
    validate.check_release("off", {"version": "0.5.23"}, "0.5.23")
    validate.check_release("off", {"version": "stand-in"}, "0.5.23")  # not a release string: nothing to compare
    with pytest.raises(validate.ValidationError, match=r"\[on\] the server runs sglang 0.5.11, but the run was planned "
                                                        r"for 0.5.13.post1"):
        validate.check_release("on", {"version": "0.5.11"}, "0.5.13.post1")


def test_dry_run_prints_the_final_command(capsys):
    assert validate.main(["--preset", "glm5", "--model", "/models/GLM-5.1-FP8", "--dry-run",
                          "--server-args=--kv-cache-dtype fp8_e4m3", "--drop-server-arg=--nsa-prefill-backend"]) == 0
    out = capsys.readouterr().out
    assert "--port 30000 --trust-remote-code --attention-backend nsa --nsa-decode-backend tilelang --kv-cache-dtype " \
           "fp8_e4m3\n" in out
    assert "--nsa-prefill-backend" not in out
    assert "# measured patches: nsa-cat-skip, indexer-rope-guard" in out
    assert "SGLANG_HIP_DECODE=1 SGLANG_HIP_DECODE_PATCHES=nsa-cat-skip,mxfp4-vbmm-layout,indexer-rope-guard " in out

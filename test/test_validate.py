"""The A/B runner against a loopback stand-in server (test/standin_server.py: a real HTTP server
process), with SGLang 0.5.11's real clients (sglang.test.few_shot_gsm8k, sglang.bench_serving)
pointed at it, tiny local GSM8K / ShareGPT / tokenizer files written by the tests.

Covered: success path and report (with and without a preset); server never healthy (clear error,
nothing left running); server dying mid-run; an 'on' run whose server applied nothing, or whose
worker processes did not apply a measured patch (refused, naming the process); bench_serving runs
that did not complete every request or measured no TPOT (refused, what was measured kept); the
server's own /server_info contradicting the preset (refused); SIGINT/SIGTERM/SIGHUP and a killed
runner (nothing left running); usage errors caught before anything starts (exit 2); the server
arguments adding to the preset's; the parsers on real client output; --dry-run of the GLM-5 preset.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sglang_hip_decode import validate

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    gsm = root / "gsm8k.jsonl"
    with open(gsm, "w") as fh:
        for a, b in [(3, 4), (10, 5), (7, 8), (12, 30), (1, 1), (25, 17)]:
            fh.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
    share = root / "sharegpt.json"
    convs = [{"conversations": [{"from": "human", "value": f"tell me about w{i} and w{i + 1} please"},
                                {"from": "gpt", "value": f"w{i} is a word"}]} for i in range(20)]
    share.write_text(json.dumps(convs))
    # A tiny word-level tokenizer, saved the way a model folder holds one (bench_serving loads it).
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["tell", "me", "about", "and", "please", "is", "a", "word"] + [f"w{i}" for i in range(64)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = root / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    return {"gsm": gsm, "share": share, "model": model_dir, "root": root}


def runner_args(files, out, port, server_extra="", **overrides):
    args = ["--model", str(files["model"]), "--out", str(out), "--port", str(port),
            "--server-cmd", f"{sys.executable} {HERE / 'standin_server.py'}", f"--server-args={server_extra}",
            "--gsm8k-questions", "6", "--gsm8k-shots", "2", "--gsm8k-parallel", "3", "--gsm8k-data", str(files["gsm"]),
            "--input-len", "12", "--output-len", "6", "--range-ratio", "0.8", "--concurrency", "2", "--num-prompts", "4",
            "--bench-dataset-path", str(files["share"]), "--health-timeout", "120", "--poll-interval", "0.2",
            "--client-timeout", "300"]
    for key, value in overrides.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def run_runner(args, env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_HIP_DECODE")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "sglang_hip_decode.validate", *args], env=env,
                          capture_output=True, text=True, timeout=900)


def processes_on_port(port: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "standin_server.py" in cmd and f"--port {port} " in cmd + " ":
                pids.append(int(entry.name))
    return pids


def test_success_path_and_report(files, tmp_path):
    port = free_port()
    out = tmp_path / "ab"
    proc = run_runner(runner_args(files, out, port, threshold=0.9), {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    on, off = results["arms"]["on"], results["arms"]["off"]
    assert off["applied"] == []
    assert on["applied"] == sorted(["nsa-cat-skip", "mxfp4-vbmm-layout", "indexer-rope-guard"])
    for arm in (on, off):
        assert arm["gsm8k"]["accuracy"] == 1.0 and arm["gsm8k"]["invalid"] == 0.0
        assert arm["bench"]["completed"] == 4 and arm["bench"]["median_tpot_ms"] > 0
    assert results["verdict"]["gsm8k_on_pass"] is True
    report = (out / "report.md").read_text()
    assert "| GSM8K accuracy (threshold 0.9) | 1.000 (pass) | 1.000 (pass) | +0.000 |" in report
    assert "TPOT median (ms)" in report and "applied (on): indexer-rope-guard, mxfp4-vbmm-layout, nsa-cat-skip" in report
    assert results["versions"]["sglang"] == "0.5.11"
    assert processes_on_port(port) == []


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


def test_parsers_on_real_client_output():
    text = "Accuracy: 0.953\nInvalid: 0.001\nLatency: 120.500 s\nOutput throughput: 4123.400 token/s\n"
    assert validate.parse_gsm8k(text) == {"accuracy": 0.953, "invalid": 0.001, "latency_s": 120.5, "output_throughput": 4123.4}
    with pytest.raises(validate.ValidationError, match="Accuracy"):
        validate.parse_gsm8k("no summary here")


def test_too_few_processes_reported(files, tmp_path):
    # SGLang calls the plugin in the launcher and in each scheduler: one status line alone means a
    # scheduler ran without it.
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--workers 0"), {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 1
    assert "[off] only 1 server processes wrote a plugin status, expected at least 2" in proc.stderr
    assert processes_on_port(port) == []


def test_gsm8k_below_the_threshold_fails_with_the_report_written(files, tmp_path):
    port = free_port()
    out = tmp_path / "ab"
    proc = run_runner(runner_args(files, out, port, "--wrong", threshold=0.9), {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "validation failed: the 'on' arm's GSM8K accuracy is below the threshold 0.9 (the 'off' arm fails it too" \
        in proc.stderr
    assert "(FAIL)" in (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["verdict"]["gsm8k_on_pass"] is False and results["arms"]["on"]["gsm8k"]["accuracy"] < 0.9


def test_a_signal_during_the_last_stop_is_not_lost(files, tmp_path, monkeypatch):
    # A SIGTERM noted while the 'on' server was being stopped: the run must end as terminated
    # (what it measured in results.partial.json), not print a report and exit 0.
    args = validate.build_parser().parse_args(runner_args(files, tmp_path / "ab", free_port()))
    plan = validate.make_plan(args)

    def fake_arm(plan, arm, measured):
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
    assert "-m sglang.test.few_shot_gsm8k --host http://127.0.0.1 --port 30000 --num-questions 1319 --num-shots 5" in out


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


def test_every_measured_patch_in_every_process(files, tmp_path):
    # Two "scheduler" processes whose switches leave out the measured patches (as if they failed
    # there), while the main process applied them: the 'on' arm is refused, naming each process.
    port = free_port()
    extra = "--workers 2 --worker-env SGLANG_HIP_DECODE_PATCHES=mxfp4-vbmm-layout"
    proc = run_runner(runner_args(files, tmp_path / "ab", port, extra, patches="nsa-cat-skip,mxfp4-vbmm-layout"),
                      {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not every measured patch (nsa-cat-skip, mxfp4-vbmm-layout) is applied in every server process (3 reported)" \
        in proc.stderr
    wrong = [line for line in proc.stderr.splitlines() if "nsa-cat-skip: off (not in SGLANG_HIP_DECODE_PATCHES)" in line]
    assert len(wrong) == 2 and all(line.strip().startswith("pid ") for line in wrong)
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
    proc = run_runner(runner_args(files, tmp_path / "ab", port, extra), {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split(message)[0], "the runner itself must not raise"
    assert not (tmp_path / "ab" / "results.json").exists()
    partial = json.loads((tmp_path / "ab" / "results.partial.json").read_text())
    assert partial["arms"]["off"]["gsm8k"]["accuracy"] == 1.0  # what was measured is kept
    assert processes_on_port(port) == []


def test_preset_run_adds_arguments_and_checks_the_server(files, tmp_path):
    # The GLM-5 preset against the stand-in: the preset's flags reach the server with the extra
    # ones after them, the server's /server_info confirms NSA + TileLang, the two patches that act on
    # GLM-5 are measured (mxfp4-vbmm-layout is selected by default but does not act there).
    port = free_port()
    out = tmp_path / "ab"
    args = runner_args(files, out, port, "--kv-cache-dtype fp8_e4m3") + ["--preset", "glm5", "--tp", "1"]
    proc = run_runner(args, {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
    (dict(patches="hip-alt-stream"), "--patches: not implemented yet: hip-alt-stream"),
    (dict(patches="none"), "--patches none measures nothing"),
    (dict(preset="kimi", patches="nsa-cat-skip"), "preset kimi: none of the selected patches (nsa-cat-skip) acts on it"),
    (dict(preset="dsv4"), "preset dsv4: none of the selected patches"),
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


def test_dry_run_prints_the_final_command(capsys):
    assert validate.main(["--preset", "glm5", "--model", "/models/GLM-5.1-FP8", "--dry-run",
                          "--server-args=--kv-cache-dtype fp8_e4m3", "--drop-server-arg=--nsa-prefill-backend"]) == 0
    out = capsys.readouterr().out
    assert "--port 30000 --trust-remote-code --attention-backend nsa --nsa-decode-backend tilelang --kv-cache-dtype " \
           "fp8_e4m3\n" in out
    assert "--nsa-prefill-backend" not in out
    assert "# measured patches: nsa-cat-skip, indexer-rope-guard" in out
    assert "SGLANG_HIP_DECODE=1 SGLANG_HIP_DECODE_PATCHES=nsa-cat-skip,mxfp4-vbmm-layout,indexer-rope-guard " in out

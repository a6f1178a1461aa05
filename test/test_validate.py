"""The A/B runner against a loopback stand-in server (test/standin_server.py: a real HTTP server
process), with SGLang 0.5.11's real clients (sglang.test.few_shot_gsm8k, sglang.bench_serving)
pointed at it, tiny local GSM8K / ShareGPT / tokenizer files written by the tests.

Covered: success path and report; server never healthy (clear error, nothing left running); server
dying mid-run; an 'on' run whose server applied nothing (refused); the parsers on real client
output; --dry-run of the GLM-5 preset.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["tell", "me", "about", "and", "please", "is", "a", "word"] + [f"w{i}" for i in range(64)])}}
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
    assert proc.returncode == 2
    assert "[on] the server applied no patch, refusing to report an 'on' run" in proc.stderr
    assert "off (not HIP" in proc.stderr
    assert not (tmp_path / "ab" / "results.json").exists()
    assert processes_on_port(port) == []


def test_server_never_healthy(files, tmp_path):
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--never-healthy", health_timeout=4), {})
    assert proc.returncode == 2
    assert "[off] the server was not healthy within 4 s" in proc.stderr
    assert processes_on_port(port) == []


def test_server_dying_mid_run(files, tmp_path):
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--die-after 2"), {})
    assert proc.returncode == 2
    assert "[off]" in proc.stderr and ("the server died during GSM8K" in proc.stderr or "GSM8K failed" in proc.stderr)
    assert processes_on_port(port) == []


def test_no_plugin_status_is_an_error(files, tmp_path):
    port = free_port()
    proc = run_runner(runner_args(files, tmp_path / "ab", port, "--skip-plugin"), {})
    assert proc.returncode == 2 and "the server wrote no plugin status" in proc.stderr


def test_parsers_on_real_client_output():
    text = "Accuracy: 0.953\nInvalid: 0.001\nLatency: 120.500 s\nOutput throughput: 4123.400 token/s\n"
    assert validate.parse_gsm8k(text) == {"accuracy": 0.953, "invalid": 0.001, "latency_s": 120.5, "output_throughput": 4123.4}
    with pytest.raises(validate.ValidationError, match="Accuracy"):
        validate.parse_gsm8k("no summary here")


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


def test_ctrl_c_leaves_nothing_running(files, tmp_path):
    import signal
    import time

    port = free_port()
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
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; servers stopped" in err
    assert processes_on_port(port) == []

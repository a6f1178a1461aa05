"""Helpers of the A/B runner's tests (test_validate*.py): the loopback stand-in server's command line,
tiny local GSM8K / ShareGPT / tokenizer files, the runner run as a process, and the stand-in
servers still running on a port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

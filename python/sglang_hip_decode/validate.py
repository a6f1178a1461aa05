"""One-command A/B validation on real hardware: the same server with the patch set off, then on.

    python -m sglang_hip_decode.validate --preset glm5 --model /models/GLM-5.1-FP8 --out ab-glm5

For each arm (``off``: ``SGLANG_HIP_DECODE=0``; ``on``: the plugin enabled, optionally
``--patches``) it launches ``python -m sglang.launch_server`` on 127.0.0.1 in its own process group,
waits for ``/health`` (timeout; on failure it prints the tail of the server log and stops), reads
which patches every server process applied (the plugin's ``SGLANG_HIP_DECODE_STATUS_FILE``) and
refuses an ``on`` run that applied nothing (or an ``off`` run that applied something), runs SGLang's
own clients — ``sglang.test.few_shot_gsm8k`` (accuracy) and ``sglang.bench_serving`` (decode
TPOT/ITL, random dataset, JSONL) — and stops the server (SIGTERM to the group, SIGKILL after a
grace period; also on Ctrl-C or any failure). It writes ``results.json`` and ``report.md``.

``--dry-run`` prints every command (with the environment it sets) and runs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import gates

# The three seed workloads (SPEC "MI355X validation recipe"); the model path is the user's.
PRESETS = {
    "glm5": dict(
        family="GLM-5", tp=8, threshold=0.93,
        server_args="--trust-remote-code --attention-backend nsa --nsa-decode-backend tilelang --nsa-prefill-backend tilelang",
        note="GLM-5.1-FP8, TP8, NSA with TileLang decode and prefill (nsa-cat-skip, indexer-rope-guard).",
    ),
    "kimi": dict(
        family="Kimi", tp=8, threshold=0.92,
        server_args="--trust-remote-code --attention-backend aiter",
        note="Kimi-K2.6-MXFP4, TP8, aiter MLA backend (mxfp4-vbmm-layout).",
    ),
    "dsv4": dict(
        family="DeepSeek-V4", tp=8, threshold=0.91,
        server_args="--trust-remote-code",
        note="DeepSeek-V4 needs sglang >= 0.5.13 (0.5.11 has no DeepSeek-V4 model): there this plugin reports "
             "'unsupported sglang' and applies nothing, so the runner refuses the 'on' run. Kept for when the pin moves.",
    ),
}
FAMILY_THRESHOLDS = (("glm", "GLM-5", 0.93), ("kimi", "Kimi", 0.92), ("deepseek-v4", "DeepSeek-V4", 0.91))


class ValidationError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Commands


@dataclasses.dataclass
class Plan:
    args: argparse.Namespace
    out: Path
    family: str | None
    threshold: float | None

    def server_cmd(self) -> list[str]:
        a = self.args
        return (shlex.split(a.server_cmd) + ["--model-path", a.model, "--tp-size", str(a.tp), "--host", "127.0.0.1",
                                             "--port", str(a.port)] + shlex.split(a.server_args))

    def server_env(self, arm: str) -> dict[str, str]:
        env = {gates.ENV_STATUS_FILE: str(self.out / arm / "status.jsonl")}
        if arm == "off":
            env[gates.ENV_ENABLE] = "0"
        else:
            env[gates.ENV_ENABLE] = "1"
            if self.args.patches:
                env[gates.ENV_PATCHES] = self.args.patches
        return env

    def gsm8k_cmd(self) -> list[str]:
        a = self.args
        cmd = [a.python, "-m", "sglang.test.few_shot_gsm8k", "--host", "http://127.0.0.1", "--port", str(a.port),
               "--num-questions", str(a.gsm8k_questions), "--num-shots", str(a.gsm8k_shots),
               "--parallel", str(a.gsm8k_parallel)]
        return cmd + (["--data-path", a.gsm8k_data] if a.gsm8k_data else [])

    def bench_cmd(self, arm: str) -> list[str]:
        a = self.args
        cmd = [a.python, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", "127.0.0.1", "--port", str(a.port),
               "--model", a.model, "--dataset-name", a.bench_dataset,
               "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
               "--random-range-ratio", str(a.range_ratio), "--max-concurrency", str(a.concurrency),
               "--num-prompts", str(a.num_prompts), "--output-file", str(self.out / arm / "bench_serving.jsonl")]
        if a.tokenizer:
            cmd += ["--tokenizer", a.tokenizer]
        if a.bench_dataset_path:
            cmd += ["--dataset-path", a.bench_dataset_path]
        return cmd


def _shell(cmd: list[str], env: dict[str, str] | None = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + " ".join(shlex.quote(c) for c in cmd)


# ---------------------------------------------------------------------------------------------
# Server lifecycle


class Server:
    """A server in its own process group; ``stop()`` takes the whole group down."""

    def __init__(self, plan: Plan, arm: str):
        self.plan, self.arm = plan, arm
        self.dir = plan.out / arm
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "server.log"
        self.status_path = Path(plan.server_env(arm)[gates.ENV_STATUS_FILE])
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.status_path.exists():
            self.status_path.unlink()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_HIP_DECODE") or k == gates.ENV_ANY_PLATFORM}
        env.update(self.plan.server_env(self.arm))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.plan.server_cmd(), env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.plan.args.port}{path}"

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ValidationError(f"[{self.arm}] the server exited (code {self.proc.returncode}) before it was "
                                      f"healthy; last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(self.plan.args.poll_interval)
        raise ValidationError(f"[{self.arm}] the server was not healthy within {timeout:.0f} s; last lines of "
                              f"{self.log_path}:\n{self.log_tail()}")

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        # Children left in the group (a dead parent's workers): take them down too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


def read_status(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            records.append(json.loads(line))
    return records


def check_applied(arm: str, records: list[dict]) -> list[str]:
    """The patches the server applied; refuses an 'on' run that applied nothing, and an 'off' run
    that applied anything."""
    if not records:
        raise ValidationError(f"[{arm}] the server wrote no plugin status: is sglang-hip-decode installed in the "
                              f"server's Python (entry point sglang.srt.plugins)? SGLang calls it in load_plugins().")
    applied = sorted({name for r in records for name in r.get("applied", [])})
    if arm == "on" and not applied:
        statuses = "; ".join(f"{k}: {v}" for k, v in records[0].get("patches", {}).items())
        raise ValidationError(f"[on] the server applied no patch, refusing to report an 'on' run ({statuses})")
    if arm == "off" and applied:
        raise ValidationError(f"[off] the server applied {applied} although SGLANG_HIP_DECODE=0")
    return applied


# ---------------------------------------------------------------------------------------------
# Clients and their outputs


def run_client(cmd: list[str], cwd: Path, log: Path, timeout: float, server: Server, what: str) -> str:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                if not server.alive():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise ValidationError(f"[{server.arm}] the server died during {what}; last lines of "
                                          f"{server.log_path}:\n{server.log_tail()}")
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise ValidationError(f"[{server.arm}] {what} did not finish within {timeout:.0f} s (log {log})")
                time.sleep(0.5)
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-30:])
        raise ValidationError(f"[{server.arm}] {what} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return text


def parse_gsm8k(text: str) -> dict:
    """The summary lines sglang.test.few_shot_gsm8k prints."""
    fields = {"accuracy": r"Accuracy:\s*([0-9.]+)", "invalid": r"Invalid:\s*([0-9.]+)",
              "latency_s": r"Latency:\s*([0-9.]+)\s*s", "output_throughput": r"Output throughput:\s*([0-9.]+)"}
    result = {}
    for key, pattern in fields.items():
        match = re.search(pattern, text)
        if match is None:
            raise ValidationError(f"GSM8K output has no '{pattern.split(':')[0]}:' line")
        result[key] = float(match.group(1))
    return result


BENCH_KEYS = ("median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "output_throughput", "median_ttft_ms",
              "completed", "duration")


def parse_bench(path: Path) -> dict:
    """The last record of sglang.bench_serving's JSONL output file."""
    if not path.exists():
        raise ValidationError(f"bench_serving wrote no {path}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValidationError(f"{path} is empty")
    record = json.loads(lines[-1])
    missing = [k for k in BENCH_KEYS if k not in record]
    if missing:
        raise ValidationError(f"{path}: missing {missing}")
    return {k: record[k] for k in BENCH_KEYS}


# ---------------------------------------------------------------------------------------------
# Report


def versions(python: str) -> dict:
    code = ("import json, importlib.metadata as m\nout = {}\n"
            "for d in ('sglang', 'torch', 'sglang-hip-decode', 'amd-aiter', 'tilelang'):\n"
            "    try: out[d] = m.version(d)\n    except Exception: out[d] = None\n"
            "try:\n    import torch; out['hip'] = torch.version.hip; out['cuda'] = torch.version.cuda\n"
            "except Exception: pass\nprint(json.dumps(out))")
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as exc:  # a report without versions still beats no report
        return {"error": str(exc)}


def _pct(off: float, on: float) -> str:
    return f"{(on - off) / off * 100:+.2f}%" if off else "n/a"


def render_report(results: dict) -> str:
    off, on = results["arms"]["off"], results["arms"]["on"]
    thr = results["threshold"]
    lines = [
        f"# sglang-hip-decode A/B: {results['model']}",
        "",
        f"- family: {results['family'] or 'unknown'}; TP {results['tp']}; server args: `{results['server_args']}`",
        f"- applied (on): {', '.join(on['applied'])}; (off): {', '.join(off['applied']) or 'none'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "",
        "| metric | off | on | change |",
        "|---|---|---|---|",
    ]
    ga, gb = off["gsm8k"], on["gsm8k"]
    verdict = lambda acc: "" if thr is None else (" (pass)" if acc >= thr else " (FAIL)")  # noqa: E731
    lines.append(f"| GSM8K accuracy (threshold {thr if thr is not None else 'none'}) | {ga['accuracy']:.3f}{verdict(ga['accuracy'])} "
                 f"| {gb['accuracy']:.3f}{verdict(gb['accuracy'])} | {gb['accuracy'] - ga['accuracy']:+.3f} |")
    lines.append(f"| GSM8K invalid | {ga['invalid']:.3f} | {gb['invalid']:.3f} | |")
    for key, label in (("median_tpot_ms", "TPOT median (ms)"), ("p99_tpot_ms", "TPOT p99 (ms)"),
                       ("median_itl_ms", "ITL median (ms)"), ("p99_itl_ms", "ITL p99 (ms)"),
                       ("output_throughput", "output throughput (tok/s)")):
        a, b = off["bench"][key], on["bench"][key]
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {_pct(a, b)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_hip_decode.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model path (also the tokenizer unless --tokenizer)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="GLM-5 / Kimi / DeepSeek-V4 server arguments and threshold")
    p.add_argument("--tp", type=int, help="tensor parallel size (default: the preset's, else 1)")
    p.add_argument("--server-args", default=None, help="extra launch_server arguments (default: the preset's)")
    p.add_argument("--patches", default="", help="SGLANG_HIP_DECODE_PATCHES for the 'on' run (default: the default set)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--out", default="ab-validate", help="output folder (results.json, report.md, logs)")
    p.add_argument("--threshold", type=float, help="GSM8K accuracy threshold (default: by model family)")
    p.add_argument("--gsm8k-questions", type=int, default=1319)
    p.add_argument("--gsm8k-shots", type=int, default=5)
    p.add_argument("--gsm8k-parallel", type=int, default=1319)
    p.add_argument("--gsm8k-data", help="local GSM8K test.jsonl (GPU hosts are often offline)")
    p.add_argument("--input-len", type=int, default=8192)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--range-ratio", type=float, default=0.8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--bench-dataset", default="random", help="bench_serving --dataset-name (random needs ShareGPT text)")
    p.add_argument("--bench-dataset-path", help="local ShareGPT JSON for --dataset-name random (offline hosts)")
    p.add_argument("--tokenizer", help="tokenizer path for bench_serving (default: the model)")
    p.add_argument("--health-timeout", type=float, default=1800.0)
    p.add_argument("--client-timeout", type=float, default=7200.0)
    p.add_argument("--poll-interval", type=float, default=2.0)
    p.add_argument("--python", default=sys.executable, help="the Python that has sglang (clients run with it)")
    p.add_argument("--server-cmd", default=None, help="server launcher (default: '<python> -m sglang.launch_server')")
    p.add_argument("--dry-run", action="store_true", help="print every command and run nothing")
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    preset = PRESETS.get(args.preset or "", {})
    args.tp = args.tp or preset.get("tp", 1)
    args.server_args = args.server_args if args.server_args is not None else preset.get("server_args", "")
    args.server_cmd = args.server_cmd or f"{args.python} -m sglang.launch_server"
    family, threshold = preset.get("family"), preset.get("threshold")
    if family is None:
        for key, fam, thr in FAMILY_THRESHOLDS:
            if key in args.model.lower():
                family, threshold = fam, thr
                break
    if args.threshold is not None:
        threshold = args.threshold
    for name in ("gsm8k_data", "bench_dataset_path", "tokenizer"):  # clients run in the arm's folder
        value = getattr(args, name)
        if value and os.path.exists(value):
            setattr(args, name, os.path.abspath(value))
    return Plan(args, Path(args.out).resolve(), family, threshold)


def dry_run(plan: Plan) -> str:
    lines = [f"# {PRESETS[plan.args.preset]['note']}" if plan.args.preset else "# custom run",
             f"# GSM8K threshold: {plan.threshold} ({plan.family or 'family unknown'})"]
    for arm in ("off", "on"):
        lines += [f"# --- {arm}: server on 127.0.0.1:{plan.args.port}, health GET /health, status file read after health",
                  _shell(plan.server_cmd(), plan.server_env(arm)),
                  f"(cd {shlex.quote(str(plan.out / arm))} && {_shell(plan.gsm8k_cmd())})",
                  _shell(plan.bench_cmd(arm)),
                  "# stop: SIGTERM to the server's process group, SIGKILL after 30 s"]
    lines.append(f"# report: {plan.out / 'results.json'}, {plan.out / 'report.md'}")
    return "\n".join(lines)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def run(plan: Plan) -> dict:
    args = plan.args
    if not _port_free(args.port):
        raise ValidationError(f"port {args.port} on 127.0.0.1 is already in use; pass --port")
    plan.out.mkdir(parents=True, exist_ok=True)
    results = {"model": args.model, "family": plan.family, "threshold": plan.threshold, "tp": args.tp,
               "server_args": args.server_args, "patches_requested": args.patches or "default", "arms": {},
               "versions": versions(args.python)}
    for arm in ("off", "on"):
        server = Server(plan, arm)
        print(f"[{arm}] starting: {_shell(plan.server_cmd(), plan.server_env(arm))}", flush=True)
        try:
            server.start()
            server.wait_healthy(args.health_timeout)
            applied = check_applied(arm, read_status(server.status_path))
            print(f"[{arm}] healthy; applied: {applied or 'none'}", flush=True)
            gsm = parse_gsm8k(run_client(plan.gsm8k_cmd(), server.dir, server.dir / "gsm8k.log", args.client_timeout,
                                         server, "GSM8K"))
            print(f"[{arm}] GSM8K accuracy {gsm['accuracy']:.3f}", flush=True)
            run_client(plan.bench_cmd(arm), server.dir, server.dir / "bench_serving.log", args.client_timeout, server,
                       "bench_serving")
            bench = parse_bench(server.dir / "bench_serving.jsonl")
            print(f"[{arm}] TPOT median {bench['median_tpot_ms']:.3f} ms", flush=True)
            results["arms"][arm] = {"applied": applied, "status": read_status(server.status_path)[:1], "gsm8k": gsm,
                                    "bench": bench}
        finally:
            server.stop()
    on, off = results["arms"]["on"], results["arms"]["off"]
    results["verdict"] = {
        "gsm8k_on_pass": None if plan.threshold is None else on["gsm8k"]["accuracy"] >= plan.threshold,
        "gsm8k_off_pass": None if plan.threshold is None else off["gsm8k"]["accuracy"] >= plan.threshold,
        "tpot_change_pct": (on["bench"]["median_tpot_ms"] - off["bench"]["median_tpot_ms"]) / off["bench"]["median_tpot_ms"] * 100,
    }
    (plan.out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (plan.out / "report.md").write_text(render_report(results))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    if args.dry_run:
        print(dry_run(plan))
        return 0
    try:
        run(plan)
    except ValidationError as exc:
        print(f"validation failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    print((plan.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-command A/B validation on real hardware: the same server with the patch set off, then on.

    python -m sglang_hip_decode.validate --preset glm5 --model /models/GLM-5.1-FP8 --out ab-glm5

Before any server starts it checks what it was given (the model path and data files exist, the
patches are known, implemented and act on the preset, ``--out`` is writable, the port is free, the
extra server arguments do not touch what the runner owns) and exits 2 on a usage error.

For each arm (``off``: ``SGLANG_HIP_DECODE=0``; ``on``: the plugin enabled, optionally
``--patches``) it launches ``python -m sglang.launch_server`` on 127.0.0.1 in its own process group
(killed if the runner dies), waits for ``/health``, checks from the server's own ``/server_info``
that it runs the attention backend the preset needs, reads which patches every server process
applied (the plugin's ``SGLANG_HIP_DECODE_STATUS_FILE``) and accepts an ``on`` arm only if every
patch it measures is ``applied`` in every process that reported (an ``off`` arm only if none applied
anything), runs SGLang's own clients — ``sglang.test.few_shot_gsm8k`` (accuracy) and
``sglang.bench_serving`` (decode TPOT/ITL, JSONL), refusing a run that did not complete every
request or has no positive TPOT — then takes a short decode profile (``--profile-steps`` steps of
SGLang's ``/start_profile`` under a decode load at the benchmark's concurrency,
``sglang_hip_decode.profiling``) and stops the server (SIGTERM to the group, SIGKILL after a
grace period; also on Ctrl-C, SIGTERM, SIGHUP or any failure). It writes ``results.json`` and
``report.md`` (with the kernels per decode step that ``trace-diff`` finds between the two arms'
rank-0 profiles; a profile that fails is reported, not fatal); a run that stops early leaves what
it measured in ``results.partial.json``.

Exit codes: 0 done; 1 the validation failed (a server, a client or a measurement was refused, or
the 'on' arm's GSM8K accuracy is below the threshold: the report is still written); 2 usage error
(nothing was started); 3 the runner itself failed (a bug: the message says where); 130 / 143 / 129
interrupted by SIGINT / SIGTERM / SIGHUP.
``--dry-run`` prints every command (with the environment it sets) and runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import statistics
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from . import abstats, gates, is_applied_status

EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Requirement:
    """Something the server must report in ``/server_info`` for the preset's patches to act."""

    what: str
    holds: Callable[[dict], bool]


def _decode_backend(info: dict):
    return info.get("decode_attention_backend") or info.get("attention_backend")


MULTI_STREAM_SWITCH = "0.5.12"  # SGLANG_ROCM_USE_MULTI_STREAM: the stream on ROCm (default off)
# NSA -> DSA: --attention-backend dsa, --dsa-* flags (--nsa-* deprecated aliases up to 0.5.19, gone from 0.5.20)
DSA_RENAME = "0.5.13"
DSV4_FIRST = "0.5.12"  # the first release with the deepseek_v4 model (its HIP kernels from 0.5.13)


def sparse_prefix(release) -> str:
    """``"nsa"`` up to 0.5.12.post1, ``"dsa"`` from 0.5.13: the backend's name and its flags' prefix."""
    from .declare import parse_release

    return "dsa" if release >= parse_release(DSA_RENAME) else "nsa"


def _glm5(release) -> dict:
    x = sparse_prefix(release)

    def tilelang(info: dict) -> bool:
        decode, prefill = info.get(f"{x}_decode_backend"), info.get(f"{x}_prefill_backend")
        return decode in ("tilelang", "aiter") and "tilelang" in (decode, prefill)

    return dict(
        server_args=f"--trust-remote-code --attention-backend {x} --{x}-decode-backend tilelang --{x}-prefill-backend tilelang",
        requires=(
            Requirement("decode attention backend nsa or dsa (one backend, renamed in 0.5.13)",
                        lambda i: _decode_backend(i) in ("nsa", "dsa")),
            # nsa-cat-skip acts where forward_absorb_core takes the fused-RoPE branch (TileLang decode
            # or prefill) and the decode impl is tilelang or aiter; the guard wherever the indexer runs.
            Requirement(f"{x}_decode_backend tilelang or aiter, with tilelang decode or prefill", tilelang),
        ),
    )


def _kimi(release) -> dict:
    return dict(server_args="--trust-remote-code --attention-backend aiter",
                requires=(Requirement("decode attention backend aiter", lambda i: _decode_backend(i) == "aiter"),))


def _dsv4(release) -> dict:
    return dict(server_args="--trust-remote-code", requires=())


# The DeepSeek-V4 patches (opt-in), all of which act on the dsv4 preset's workload; the 'on' arm selects
# with --patches default those whose parity has been seen on a GPU and that measured no slower there
# (DSV4_ADDS: dsv4-sparse-decode and dsv4-fused-compress, GPU parity on 0.5.13.post1 and 0.5.23, the
# H200); dsv4-fused-compress-prefill (GPU parity on both, but 0.70-0.90x upstream on the H200) is left
# for --patches to name.
DSV4_PATCHES = ("dsv4-sparse-decode", "dsv4-fused-compress", "dsv4-fused-compress-prefill")
DSV4_ADDS = ("dsv4-sparse-decode", "dsv4-fused-compress")

# The three workloads the upstream changes were validated on (benchmark/e2e/README.md); the model
# path is the user's. ``patches``: the ones that act on the workload where they have edits on the
# release (which of them do is decided per release); ``adds``: opt-in ones among them that
# ``--patches default`` selects for the 'on' arm with this preset; ``flags(release)``: the server arguments and
# the /server_info checks on that release (``--nsa-*`` before 0.5.13, ``--dsa-*`` from it).
PRESETS = {
    "glm5": dict(
        family="GLM-5", tp=8, threshold=0.93,
        patches=("nsa-cat-skip", "indexer-rope-guard", "hip-alt-stream", "hip-dual-stream-av4"),
        flags=_glm5,
        note="GLM-5.1-FP8, TP8, NSA/DSA with TileLang decode and prefill (nsa-cat-skip, indexer-rope-guard; "
             "hip-alt-stream, hip-dual-stream-av4 when selected).",
    ),
    "kimi": dict(
        family="Kimi", tp=8, threshold=0.92, patches=("mxfp4-vbmm-layout", "hip-alt-stream"), flags=_kimi,
        note="Kimi-K2.6-MXFP4, TP8, aiter MLA backend (mxfp4-vbmm-layout; hip-alt-stream when selected).",
    ),
    "dsv4": dict(
        family="DeepSeek-V4", tp=8, threshold=0.91, patches=DSV4_PATCHES, adds=DSV4_ADDS, flags=_dsv4,
        first=DSV4_FIRST,
        note="DeepSeek-V4 (sglang 0.5.12 and later; its HIP kernels from 0.5.13), the HIP DSV4 backend: "
             f"{', '.join(DSV4_PATCHES)} (opt-in kernel swaps, accuracy-equivalent; --patches default selects "
             f"{', '.join(DSV4_ADDS)} for 'on', the GPU-verified ones; name the others to measure them). On 0.5.12.x "
             "no patch acts on it: the runner refuses the preset.",
    ),
}
FAMILY_THRESHOLDS = (("glm", "GLM-5", 0.93), ("kimi", "Kimi", 0.92), ("deepseek-v4", "DeepSeek-V4", 0.91))

# launch_server flags the runner sets itself (the port it polls, the loopback bind, the model it
# reports, the TP size it records), and --config (whose values land after the runner's flags):
# refused in --server-args, with every prefix of them, since SGLang's argparse takes abbreviations.
OWNED_FLAGS = {"--host": "the runner binds 127.0.0.1", "--port": "use the runner's --port",
               "--model-path": "use the runner's --model", "--model": "use the runner's --model",
               "--tp-size": "use the runner's --tp", "--tensor-parallel-size": "use the runner's --tp",
               "--config": "put the flags in --server-args (the runner cannot check a config file)"}


def _owned_flag(name: str) -> str | None:
    """The runner-owned flag that ``name`` (a long flag) is, or abbreviates."""
    for flag in OWNED_FLAGS:
        if len(name) > 2 and flag.startswith(name):
            return flag
    return None


class ValidationError(RuntimeError):
    """The validation ran and failed (exit 1)."""


class UsageError(ValueError):
    """The arguments cannot give a meaningful run; nothing was started (exit 2)."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so every ``finally`` stops what it
    started."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals noted by the handlers. A handler that raised would raise wherever the signal lands
# (inside a fork hook or a finaliser, where Python drops the exception): the waits poll this
# instead, at least every half second, and raise Interrupted from there.
_SIGNALS: list[int] = []


def _note_signal(signum, _frame) -> None:
    _SIGNALS.append(signum)


def _check_signals() -> None:
    if _SIGNALS:
        raise Interrupted(_SIGNALS[0])


# ---------------------------------------------------------------------------------------------
# Arguments -> plan


def _flag_name(token: str) -> str:
    return token.split("=", 1)[0]


def merge_server_args(preset_args: str, extra: str, drop: list[str]) -> list[str]:
    """The preset's arguments without the ``drop`` flags (each with its values), then ``extra``.
    ``extra`` may repeat a preset flag (the last one wins, as in SGLang's argparse)."""
    tokens = shlex.split(preset_args)
    for flag in drop:
        if not flag.startswith("--"):
            raise UsageError(f"--drop-server-arg takes a flag such as --nsa-prefill-backend, got {flag!r}")
        if flag not in {_flag_name(t) for t in tokens if t.startswith("--")}:
            raise UsageError(f"--drop-server-arg {flag}: the preset's server arguments have no {flag} ({preset_args or 'none'})")
        kept, skipping = [], False
        for token in tokens:
            if token.startswith("--"):
                skipping = _flag_name(token) == flag
            if not skipping:
                kept.append(token)
        tokens = kept
    extra_tokens = shlex.split(extra)
    for token in extra_tokens:
        owned = _owned_flag(_flag_name(token)) if token.startswith("--") else None
        if owned:
            shown = owned if _flag_name(token) == owned else f"{_flag_name(token)} (that is {owned})"
            raise UsageError(f"--server-args may not set {shown}: {OWNED_FLAGS[owned]}")
    return tokens + extra_tokens


def resolve_patches(requested: str, preset: str | None, release=None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(selected, measured)``: what SGLANG_HIP_DECODE_PATCHES selects for the 'on' arm, and the
    part of it that acts on the preset on ``release`` (every selected patch with edits on it when
    there is no preset)."""
    from .declare import format_release
    from .patches import catalog, pick

    value = requested.strip()
    if value.lower() in ("", "default"):
        adds = PRESETS[preset].get("adds", ()) if preset is not None else ()
        selected = [e.name for e in catalog() if e.patch is not None and (e.default or e.name in adds)]
    elif value.lower() == "all":
        selected = [e.name for e in catalog() if e.patch is not None]
    elif value.lower() == "none":
        raise UsageError("--patches none measures nothing: the 'on' arm would equal the 'off' arm")
    else:
        try:
            selected = [e.name for e in pick(list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip())))]
        except ValueError as exc:
            raise UsageError(f"--patches: {exc}") from None
    patches = {e.name: e.patch for e in catalog() if e.patch is not None}
    here = (lambda n: True) if release is None else (lambda n: bool(patches[n].candidates(release)))
    shown = "" if release is None else f" on sglang {format_release(release)}"
    if preset is None:
        measured = tuple(n for n in selected if here(n))
        if not measured:
            raise UsageError(f"none of the selected patches ({', '.join(selected)}) has edits{shown}: "
                             + _why_not(patches, selected, release) + "; the A/B would measure nothing")
        return tuple(selected), measured
    first = PRESETS[preset].get("first")
    if first is not None and release is not None and release < _parse(first):
        raise UsageError(f"preset {preset}: sglang {format_release(release)} has no {PRESETS[preset]['family']} model "
                         f"(it arrived in {first})")
    acts = PRESETS[preset]["patches"]
    measured = tuple(n for n in selected if n in acts and here(n))
    if not measured:
        acting = [n for n in acts if here(n)]
        why = _why_not(patches, [n for n in acts if not here(n)], release)
        raise UsageError(f"preset {preset}: none of the selected patches ({', '.join(selected) or 'none'}) acts on it{shown} "
                         f"(patches that do: {', '.join(acting) or 'none'}{'; ' + why if why else ''}); "
                         "the A/B would measure nothing")
    return tuple(selected), measured


def _parse(text: str):
    from .declare import parse_release

    return parse_release(text)


def _why_not(patches: dict, names, release) -> str:
    """Why each of ``names`` has no edits on ``release``, e.g. ``nsa-cat-skip: upstream has it (sglang#24125, since 0.5.12)``."""
    reasons = []
    for name in names:
        declared = patches[name].for_release(release)
        if declared is None:
            reasons.append(f"{name}: nothing declared")
        elif declared.upstream is not None:
            reasons.append(f"{name}: upstream has it ({declared.upstream.change}, since {declared.upstream.since})")
        elif declared.not_applicable:
            reasons.append(f"{name}: not applicable ({declared.not_applicable})")
    return "; ".join(reasons)


def sglang_release_of(python: str) -> str:
    """The sglang release ``python`` has (its metadata); raises :class:`UsageError` saying why not."""
    code = "import importlib.metadata as m; print(m.version('sglang'))"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"cannot run --python {python} to read its sglang release ({exc}); pass --sglang-release") from None
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"--python {python} has no readable sglang ({last}); pass --sglang-release") from None
    return done.stdout.strip()


def _existing(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    if not os.path.exists(path):
        raise UsageError(f"{what} {path} does not exist")
    return os.path.abspath(path)


def _writable_out(out: str) -> Path:
    path = Path(out).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out} is not a writable folder: {exc.strerror or exc}") from None
    return path


@dataclasses.dataclass
class Plan:
    args: argparse.Namespace
    out: Path
    family: str | None
    threshold: float | None
    server_args: list[str]
    selected: tuple[str, ...]
    measured: tuple[str, ...]
    requires: tuple[Requirement, ...]
    release: str  # the sglang release the server runs (--sglang-release, or --python's metadata)

    def server_cmd(self) -> list[str]:
        a = self.args
        return (shlex.split(a.server_cmd) + ["--model-path", a.model, "--tp-size", str(a.tp), "--host", "127.0.0.1",
                                             "--port", str(a.port)] + self.server_args)

    def server_env(self, arm: str) -> dict[str, str]:
        env = {gates.ENV_STATUS_FILE: str(self.out / arm / "status.jsonl")}
        streams = any(n in self.measured for n in ("hip-alt-stream", "hip-dual-stream-av4"))
        if streams:
            # both arms: ROCm's multi-stream needs at least 5 hardware queues (upstream's note)
            queues = os.environ.get("GPU_MAX_HW_QUEUES", "")
            env["GPU_MAX_HW_QUEUES"] = queues if queues.isdigit() and int(queues) >= 5 else "5"
        if arm == "off":
            env[gates.ENV_ENABLE] = "0"
        else:
            env[gates.ENV_ENABLE] = "1"
            env[gates.ENV_PATCHES] = ",".join(self.selected)
            if streams and _parse(self.release) >= _parse(MULTI_STREAM_SWITCH):
                env["SGLANG_ROCM_USE_MULTI_STREAM"] = "1"  # 0.5.12.x create the stream only so; the patch adds the guard
        return env

    def gsm8k_cmd(self) -> list[str]:
        a = self.args
        # the bare host: 0.5.11 ... 0.5.20 also took "http://127.0.0.1" (deprecated), 0.5.21+ make it http://http://...
        cmd = [a.python, "-m", "sglang.test.few_shot_gsm8k", "--host", "127.0.0.1", "--port", str(a.port),
               "--num-questions", str(a.gsm8k_questions), "--num-shots", str(a.gsm8k_shots),
               "--parallel", str(a.gsm8k_parallel)]
        return cmd + (["--data-path", a.gsm8k_data] if a.gsm8k_data else [])

    def bench_output(self, arm: str, repeat: int = 0) -> Path:
        return self.out / arm / f"bench_serving{'' if repeat == 0 else f'.r{repeat}'}.jsonl"

    def bench_cmd(self, arm: str, repeat: int = 0) -> list[str]:
        a = self.args
        cmd = [a.python, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", "127.0.0.1", "--port", str(a.port),
               "--model", a.model, "--dataset-name", a.bench_dataset,
               "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
               "--random-range-ratio", str(a.range_ratio), "--max-concurrency", str(a.concurrency),
               "--num-prompts", str(a.num_prompts), "--output-file", str(self.bench_output(arm, repeat)),
               "--output-details"]  # per-request ITLs: the TPOT interval is computed over requests
        if a.tokenizer:
            cmd += ["--tokenizer", a.tokenizer]
        if a.bench_dataset_path:
            cmd += ["--dataset-path", a.bench_dataset_path]
        return cmd


def _shell(cmd: list[str], env: dict[str, str] | None = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + " ".join(shlex.quote(c) for c in cmd)


# ---------------------------------------------------------------------------------------------
# Processes


def _die_with_runner(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when the runner dies, however it dies (SIGKILL, a
    crash), through Linux's PR_SET_PDEATHSIG; elsewhere a no-op."""
    def preexec() -> None:
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
            except Exception:
                pass
            if os.getppid() != parent:  # the runner died before prctl took effect
                os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _popen(cmd, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_runner(os.getpid()), **kwargs)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Server:
    """A server in its own process group; ``stop()`` takes the whole group down."""

    def __init__(self, plan: Plan, arm: str, launch: int = 0):
        self.plan, self.arm = plan, arm
        self.dir = plan.out / arm
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / ("server.log" if launch == 0 else f"server.{launch + 1}.log")
        self.status_path = Path(plan.server_env(arm)[gates.ENV_STATUS_FILE])
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        if self.status_path.exists():
            self.status_path.unlink()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_HIP_DECODE") or k == gates.ENV_ANY_PLATFORM}
        env.update(self.plan.server_env(self.arm))
        self._log = open(self.log_path, "wb")
        self.proc = _popen(self.plan.server_cmd(), env=env, stdout=self._log, stderr=subprocess.STDOUT)

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
            _check_signals()
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

    def server_info(self) -> dict:
        """The server's own view of its arguments (SGLang's ``/server_info``; older releases
        ``/get_server_info``)."""
        for path in ("/server_info", "/get_server_info"):
            try:
                with urllib.request.urlopen(self.url(path), timeout=30) as resp:
                    return json.loads(resp.read())
            except (urllib.error.URLError, OSError, ValueError):
                continue
        raise ValidationError(f"[{self.arm}] the server answers neither /server_info nor /get_server_info: cannot check "
                              "which attention backend it runs")

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        # Whatever is left in the group (a slow parent, a dead parent's workers): SIGKILL.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        if self._log is not None:
            self._log.close()
            self._log = None


def read_status(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = line.strip()
        if line:
            try:
                record = json.loads(line)
            except ValueError:
                raise ValidationError(f"line {number} of {path} is not a plugin status record: {line[:200]!r}") from None
            if not isinstance(record, dict):
                raise ValidationError(f"line {number} of {path} is not a plugin status record: {line[:200]!r}")
            records.append(record)
    return records


def check_applied(arm: str, records: list[dict], measured: tuple[str, ...] = (), processes: int = 1) -> list[str]:
    """The patches the server applied. At least ``processes`` processes must have reported (SGLang
    calls the plugin in the launcher and in every scheduler process). An 'on' arm is accepted only
    if every ``measured`` patch is ``applied`` in every process that reported; an 'off' arm only if
    no process applied anything."""
    if not records:
        raise ValidationError(f"[{arm}] the server wrote no plugin status: is sglang-hip-decode installed in the "
                              f"server's Python (entry point sglang.srt.plugins)? SGLang calls it in load_plugins().")
    if len(records) < processes:
        raise ValidationError(f"[{arm}] only {len(records)} server processes wrote a plugin status, expected at least "
                              f"{processes} (the launcher and one scheduler per TP rank): a process that did not load "
                              "the plugin runs unpatched")
    applied = sorted({name for r in records for name in r.get("applied", [])})
    if arm == "off" and applied:
        raise ValidationError(f"[off] the server applied {applied} although SGLANG_HIP_DECODE=0")
    if arm == "on":
        wrong = []
        for r in records:
            for name in measured:
                status = r.get("patches", {}).get(name, "(not reported)")
                if not is_applied_status(status):
                    problems = "; ".join(r.get("problems", []))
                    wrong.append(f"pid {r.get('pid')} ({r.get('argv0') or '?'}): {name}: {status}"
                                 + (f" [problems: {problems}]" if problems else ""))
        if wrong:
            raise ValidationError(f"[on] refusing the 'on' arm: not every measured patch ({', '.join(measured)}) is applied "
                                  f"in every server process ({len(records)} reported):\n  " + "\n  ".join(wrong))
    return applied


def check_release(arm: str, info: dict, release: str) -> None:
    """The server runs the release the plan was made for (its flags, the patches measured)."""
    reported = info.get("version")
    if _parse(str(reported)) is not None and _parse(str(reported)) != _parse(release):
        raise ValidationError(f"[{arm}] the server runs sglang {reported}, but the run was planned for {release} (its "
                              "flags and measured patches): pass --sglang-release or the server's --python")


def check_server(arm: str, info: dict, requires: tuple[Requirement, ...]) -> None:
    failed = [req.what for req in requires if not req.holds(info)]
    if failed:
        shown = {k: info.get(k) for k in ("attention_backend", "decode_attention_backend", "prefill_attention_backend",
                                          "nsa_decode_backend", "nsa_prefill_backend", "dsa_decode_backend",
                                          "dsa_prefill_backend") if k in info}
        raise ValidationError(f"[{arm}] the server does not run what the preset needs ({'; '.join(failed)}); it reports "
                              f"{shown or 'none of the backend fields'}: the patches measured would not act, refusing the arm")


# ---------------------------------------------------------------------------------------------
# Clients and their outputs


def run_client(cmd: list[str], cwd: Path, log: Path, timeout: float, server: Server, what: str) -> str:
    with open(log, "wb") as fh:
        proc = _popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                _check_signals()
                if not server.alive():
                    raise ValidationError(f"[{server.arm}] the server died during {what}; last lines of "
                                          f"{server.log_path}:\n{server.log_tail()}")
                if time.monotonic() > deadline:
                    raise ValidationError(f"[{server.arm}] {what} did not finish within {timeout:.0f} s (log {log})")
                time.sleep(0.5)
        finally:
            _kill_group(proc)
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


def bench_record(path: Path) -> dict:
    """The last record of sglang.bench_serving's JSONL output file (it appends one per run)."""
    if not path.exists():
        raise ValidationError(f"bench_serving wrote no {path}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValidationError(f"{path} is empty")
    return json.loads(lines[-1])


def parse_bench(record: dict, path: Path) -> dict:
    """The figures the report uses from one bench_serving record (``path`` names it in errors)."""
    missing = [k for k in BENCH_KEYS if k not in record]
    if missing:
        raise ValidationError(f"{path}: missing {missing}")
    return {k: record[k] for k in BENCH_KEYS}


def request_tpots(record: dict, path: Path) -> list[float]:
    """Per-request TPOT (ms) of a complete bench_serving run (its ``--output-details`` record)."""
    try:
        return abstats.request_tpots_ms(record)
    except ValueError as exc:
        raise ValidationError(f"{path}: {exc}") from None


def check_bench(arm: str, bench: dict, num_prompts: int, log: Path) -> None:
    """Refuse a measurement that is not one: requests that did not complete, or no decode time."""
    if not isinstance(bench["completed"], int) or bench["completed"] < num_prompts:
        raise ValidationError(f"[{arm}] bench_serving completed {bench['completed']} of {num_prompts} requests: refusing "
                              f"the measurement (failed requests are not timed; see {log})")
    for key in ("median_tpot_ms", "median_itl_ms"):
        value = bench[key]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValidationError(f"[{arm}] bench_serving reports {key} = {value!r}: no decode time was measured (each "
                                  f"request needs at least 2 output tokens; --output-len is {bench.get('output_len', '?')})")


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
        f"- family: {results['family'] or 'unknown'}; TP {results['tp']}; sglang {results.get('sglang_release', '?')}",
        f"- server command, off: `{results['server_cmds']['off']}`",
        f"- server command, on: `{results['server_cmds']['on']}`",
        f"- measured patches: {', '.join(results['patches_measured'])}; applied (on): {', '.join(on['applied'])} "
        f"in all {on['processes']} reporting processes; (off): {', '.join(off['applied']) or 'none'}",
        "- server reports: " + ", ".join(f"{k} {v}" for k, v in on["server"].items()),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "",
        "| metric | off | on | change |",
        "|---|---|---|---|",
    ]
    verdict = results["verdict"]

    def gsm(v: dict) -> str:
        judged = "" if v["verdict"] is None else f" ({v['verdict']})"
        return f"{v['accuracy']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]{judged}"

    ga, gb = verdict["gsm8k_off"], verdict["gsm8k_on"]
    lines.append(f"| GSM8K accuracy [95% interval, {ga['questions']} questions] (threshold {thr if thr is not None else 'none'}) "
                 f"| {gsm(ga)} | {gsm(gb)} | {gb['accuracy'] - ga['accuracy']:+.3f} |")
    lines.append(f"| GSM8K invalid | {off['gsm8k']['invalid']:.3f} | {on['gsm8k']['invalid']:.3f} | |")
    for key, label in (("median_tpot_ms", "TPOT median (ms, bench_serving's, median of repeats)"),
                       ("p99_tpot_ms", "TPOT p99 (ms)"),
                       ("median_itl_ms", "ITL median (ms)"), ("p99_itl_ms", "ITL p99 (ms)"),
                       ("output_throughput", "output throughput (tok/s)")):
        a, b = off["bench"][key], on["bench"][key]
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {_pct(a, b)} |")
    lines.append(f"| requests completed | {off['bench']['completed']} | {on['bench']['completed']} | |")
    t = verdict["tpot"]
    lines += ["", f"Bench figures: the median over {t['repeats'][0]} off and {t['repeats'][1]} on repeats, run "
                  f"{', '.join(f'{arm} x{len(reps)}' for arm, reps in results['schedule'])} (server launches in order).",
              "", f"**TPOT: {t['verdict']}.** Median request TPOT {t['median_off_ms']:.3f} → {t['median_on_ms']:.3f} ms, "
                  f"{t['change_pct']:+.2f}% [{t['ci_pct'][0]:+.2f}%, {t['ci_pct'][1]:+.2f}%] ({t['level'] * 100:g}% interval, "
                  f"bootstrap over {t['launches'][0]} / {t['launches'][1]} server launches, their repeats and their "
                  f"{t['requests'][0]} / {t['requests'][1]} requests; the median over all requests, so it can differ "
                  "from the table's median of repeats). "
                  + ("The interval contains 0: this run cannot tell the arms apart; more repeats narrow it."
                     if not t["detected"] else "The interval excludes 0.")]
    if gb["verdict"] == "inconclusive":
        lines += ["", f"GSM8K: the threshold {thr} lies inside the 'on' arm's interval: {gb['questions']} questions "
                      "cannot tell whether it is met."]
    if results.get("plot"):
        lines += ["", f"![TPOT and ITL, off vs on]({Path(results['plot']).name})"]
    if "kernels" in results:
        lines += [""] + render_kernels(results["kernels"])
    return "\n".join(lines) + "\n"


def write_plot(out: Path, results: dict) -> str | None:
    """``tpot_itl.png`` beside the report: per-request TPOT and every ITL, off vs on (matplotlib, an
    optional extra: without it there is no plot and the report says nothing about one)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'sglang-hip-decode[plot]')", flush=True)
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, colour in (("off", "tab:blue"), ("on", "tab:orange")):
        repeats = results["arms"][arm]["repeats"]
        tpots = sorted(x for r in repeats for x in r["tpots_ms"])
        left.plot(tpots, [(i + 1) / len(tpots) for i in range(len(tpots))], label=arm, color=colour)
        itls = []
        for r in repeats:
            record = bench_record(Path(r["file"]))
            itls += [x * 1000.0 for request in record["itls"] for x in request]
        right.hist(itls, bins=60, alpha=0.5, label=arm, color=colour, density=True)
    left.set(xlabel="TPOT per request (ms)", ylabel="fraction of requests", title="TPOT (ECDF)")
    right.set(xlabel="inter-token latency (ms)", ylabel="density", title="ITL")
    for ax in (left, right):
        ax.legend()
    fig.suptitle(f"{results['model']}: sglang {results.get('sglang_release', '?')}, off vs on")
    fig.tight_layout()
    path = out / "tpot_itl.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def render_kernels(kernels: dict) -> list[str]:
    """The report's "kernels per decode step" section (trace-diff of the rank-0 profiles)."""
    if "error" in kernels:
        return ["## Kernels per decode step", "", f"No kernel table: {kernels['error']}"]
    layers = f"{kernels['layers']} layers{' (inferred)' if kernels['layers_inferred'] else ''}"
    lines = ["## Kernels per decode step (rank 0's profile, `sglang-hip-decode trace-diff`)", "",
             f"{kernels['off']['decode_steps']} decode steps off ({', '.join(kernels['off']['step_labels'])}), "
             f"{kernels['on']['decode_steps']} on ({', '.join(kernels['on']['step_labels'])}); per layer: / {layers}; "
             f"µs: GPU busy time per step", ""]
    changed = [r for r in kernels["rows"] if r["status"] != "same"]
    if not changed:
        return lines + ["No kernel changed count between the arms."]
    lines += ["| kernel | change | per step off → on | per layer off → on | µs off → on | Δ µs |", "|---|---|---|---|---|---|"]
    from .tracediff import format_count as num
    for r in changed:
        lines.append(f"| `{r['name']}` | {r['status']} | {num(r['count_off'])} → {num(r['count_on'])} "
                     f"| {num(r['count_off_per_layer'])} → {num(r['count_on_per_layer'])} "
                     f"| {r['us_off']:.1f} → {r['us_on']:.1f} | {r['delta_us']:+.1f} |")
    return lines + ["", f"Net: {kernels['net_us_per_step']:+.1f} µs per decode step "
                        f"({kernels['net_us_per_layer']:+.2f} µs per layer)."]


# ---------------------------------------------------------------------------------------------
# Main


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, "", [], False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_hip_decode.validate", description=__doc__.split("\n\n")[0],
                                formatter_class=_DefaultsFormatter,
                                epilog="Exit codes: 0 done; 1 validation failed (incl. the 'on' arm below the GSM8K "
                                       "threshold); 2 usage error (nothing started); 3 runner error; 130/143/129 "
                                       "interrupted by SIGINT/SIGTERM/SIGHUP.")
    p.add_argument("--model", required=True, help="local model folder (also the tokenizer unless --tokenizer)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="GLM-5 / Kimi / DeepSeek-V4 server arguments, threshold, "
                                                             "and the patches that act on it")
    p.add_argument("--tp", type=int, help="tensor parallel size (default: the preset's, else 1)")
    p.add_argument("--server-args", default="", help="extra launch_server arguments, added after the preset's (one "
                                                     "string: --server-args=\"--kv-cache-dtype fp8_e4m3\"); not "
                                                     "--host/--port/--model-path/--tp-size")
    p.add_argument("--drop-server-arg", action="append", default=[], metavar="FLAG",
                   help="remove a preset flag and its values (repeatable), e.g. --drop-server-arg=--nsa-prefill-backend")
    p.add_argument("--patches", default="", help="SGLANG_HIP_DECODE_PATCHES for the 'on' run (default: the default set, plus the "
                                                 "preset's opt-in patches (dsv4: the DeepSeek-V4 ones); each must be "
                                                 "implemented, and with a preset at least one must act on it)")
    p.add_argument("--port", type=int, default=30000, help="the server's port on 127.0.0.1 (both arms, one after the other)")
    p.add_argument("--out", default="ab-validate", help="output folder (results.json, report.md, logs)")
    p.add_argument("--threshold", type=float, help="GSM8K accuracy threshold (default: by model family)")
    p.add_argument("--gsm8k-questions", type=int, default=1319, help="GSM8K questions per arm")
    p.add_argument("--gsm8k-shots", type=int, default=5, help="few-shot examples per question")
    p.add_argument("--gsm8k-parallel", type=int, default=1319, help="GSM8K questions in flight")
    p.add_argument("--gsm8k-data", help="local GSM8K test.jsonl (GPU hosts are often offline)")
    p.add_argument("--input-len", type=int, default=8192, help="bench_serving prompt length (tokens)")
    p.add_argument("--output-len", type=int, default=1024, help="bench_serving output length (tokens)")
    p.add_argument("--range-ratio", type=float, default=0.8,
                   help="bench_serving --random-range-ratio: lengths drawn from [ratio x len, len]")
    p.add_argument("--concurrency", type=int, default=4, help="bench_serving requests in flight")
    p.add_argument("--num-prompts", type=int, default=20, help="bench_serving requests per arm")
    p.add_argument("--bench-dataset", default="random", help="bench_serving --dataset-name (random needs ShareGPT text)")
    p.add_argument("--bench-dataset-path", help="local ShareGPT JSON for --dataset-name random (offline hosts)")
    p.add_argument("--tokenizer", help="tokenizer path for bench_serving (default: the model)")
    p.add_argument("--health-timeout", type=float, default=1800.0, help="seconds for a server to become healthy")
    p.add_argument("--client-timeout", type=float, default=7200.0, help="seconds for one client run (GSM8K, bench_serving)")
    p.add_argument("--poll-interval", type=float, default=2.0, help="seconds between health and status polls")
    p.add_argument("--python", default=sys.executable, help="the Python that has sglang (clients run with it)")
    p.add_argument("--sglang-release", help="the sglang release the server runs (default: what --python's sglang "
                                            "metadata says); picks the preset's flags and the patches measured")
    p.add_argument("--server-cmd", default=None, help="server launcher (default: '<python> -m sglang.launch_server')")
    p.add_argument("--repeats", type=int, default=1,
                   help="benchmark runs per arm, interleaved off, on, on, off, ... (back-to-back runs of an arm share "
                        "a server launch); the TPOT interval is over repeats and requests")
    p.add_argument("--ci-level", type=float, default=0.95, help="confidence level of the TPOT interval")
    p.add_argument("--profile-steps", type=int, default=5,
                   help="decode steps of the profile each arm takes after the benchmark for the kernel table "
                        "(SGLang's /start_profile; 0: no profile)")
    p.add_argument("--profile-timeout", type=float, default=900.0,
                   help="seconds for the profile: the decode load, the steps and the trace export")
    p.add_argument("--dry-run", action="store_true", help="print every command and run nothing")
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    """Check the arguments and build the plan; raises :class:`UsageError`."""
    preset = PRESETS.get(args.preset or "", {})
    args.tp = args.tp or preset.get("tp", 1)
    if args.tp < 1 or args.num_prompts < 1 or args.output_len < 2 or args.concurrency < 1:
        raise UsageError("--tp, --num-prompts and --concurrency must be >= 1 and --output-len >= 2 (TPOT needs two "
                         "output tokens)")
    if args.repeats < 1 or not 0.5 <= args.ci_level < 1:
        raise UsageError("--repeats must be >= 1 and --ci-level in [0.5, 1)")
    if args.profile_steps < 0 or not args.profile_timeout > 0:
        raise UsageError("--profile-steps must be >= 0 (0: no profile) and --profile-timeout > 0")
    from .declare import parse_release

    release_text = args.sglang_release or sglang_release_of(args.python)
    release = parse_release(release_text)
    if release is None:
        raise UsageError(f"sglang release {release_text!r} is not a release string (e.g. 0.5.23)")
    if release < parse_release(gates.OLDEST_RELEASE):
        raise UsageError(f"sglang {release_text}: the plugin supports {gates.OLDEST_RELEASE} and later")
    flags = preset["flags"](release) if preset else {}
    server_args = merge_server_args(flags.get("server_args", ""), args.server_args, args.drop_server_arg)
    selected, measured = resolve_patches(args.patches, args.preset, release)
    if "hip-dual-stream-av4" in measured and "hip-alt-stream" not in selected:
        raise UsageError("hip-dual-stream-av4 reorders the alt-stream fork: select hip-alt-stream too (it creates "
                         "the stream on 0.5.11, and on 0.5.12.x keeps the stream's MoE path from scaling twice)")
    args.server_cmd = args.server_cmd or f"{args.python} -m sglang.launch_server"
    family, threshold = preset.get("family"), preset.get("threshold")
    if family is None:
        for key, fam, thr in FAMILY_THRESHOLDS:
            if key in args.model.lower():
                family, threshold = fam, thr
                break
    if args.threshold is not None:
        threshold = args.threshold
    if not args.dry_run:
        _existing(args.model, "--model")
        # The clients run in the arm's folder: absolute paths.
        args.gsm8k_data = _existing(args.gsm8k_data, "--gsm8k-data")
        args.bench_dataset_path = _existing(args.bench_dataset_path, "--bench-dataset-path")
        args.tokenizer = _existing(args.tokenizer, "--tokenizer")
        if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
            raise UsageError(f"--python {args.python} is not an executable file")
        out = _writable_out(args.out)
    else:
        out = Path(args.out).resolve()
    return Plan(args, out, family, threshold, server_args, selected, measured, flags.get("requires", ()), release_text)


def dry_run(plan: Plan) -> str:
    lines = [f"# {PRESETS[plan.args.preset]['note']}" if plan.args.preset else "# custom run",
             f"# sglang {plan.release}"
             + (f" ({sparse_prefix(_parse(plan.release))} flags)" if plan.args.preset == "glm5" else ""),
             f"# GSM8K threshold: {plan.threshold} ({plan.family or 'family unknown'})",
             f"# measured patches: {', '.join(plan.measured)} (selected for 'on': {', '.join(plan.selected)})",
             "# server checks: " + ("; ".join(r.what for r in plan.requires) or "none")]
    lines.append("# launches: " + ", ".join(f"{arm} (repeats {', '.join(str(r + 1) for r in reps)})"
                                          for arm, reps in launch_schedule(plan.args.repeats)))
    for arm in ("off", "on"):
        lines += [f"# --- {arm}: server on 127.0.0.1:{plan.args.port}, health GET /health, status file read after health",
                  _shell(plan.server_cmd(), plan.server_env(arm)),
                  f"(cd {shlex.quote(str(plan.out / arm))} && {_shell(plan.gsm8k_cmd())})",
                  _shell(plan.bench_cmd(arm)),
                  (f"# profile: {plan.args.concurrency} streamed /generate requests decoding, then POST /start_profile "
                   f"{{\"num_steps\": {plan.args.profile_steps}, \"output_dir\": \"{plan.out / arm / 'profile'}\"}}; "
                   "rank 0's trace is kept" if plan.args.profile_steps else "# profile: none (--profile-steps 0)"),
                  "# stop: SIGTERM to the server's process group, SIGKILL after 30 s"]
    lines.append(f"# report: {plan.out / 'results.json'}, {plan.out / 'report.md'}")
    return "\n".join(lines)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


SERVER_FIELDS = ("attention_backend", "decode_attention_backend", "nsa_decode_backend", "nsa_prefill_backend",
                 "dsa_decode_backend", "dsa_prefill_backend",
                 "kv_cache_dtype", "tp_size", "version")


def launch_schedule(repeats: int) -> list[tuple[str, list[int]]]:
    """Server launches in order, each ``(arm, repeat indices it runs)``: the arms alternate ABBA
    (off, on, on, off, off, on, ...), so neither always runs first and back-to-back repeats of one
    arm share a launch (the server stays warm)."""
    order = [arm for i in range(repeats) for arm in (("off", "on") if i % 2 == 0 else ("on", "off"))]
    launches: list[tuple[str, list[int]]] = []
    count = {"off": 0, "on": 0}
    for arm in order:
        if launches and launches[-1][0] == arm:
            launches[-1][1].append(count[arm])
        else:
            launches.append((arm, [count[arm]]))
        count[arm] += 1
    return launches


def run_arm(plan: Plan, arm: str, measured: dict, repeats: tuple[int, ...] = (0,), launch: int = 0) -> None:
    """One server launch of ``arm`` running benchmark ``repeats``, recorded into ``measured`` step by
    step (so a failure keeps what was measured). The arm's first launch also runs GSM8K and, after
    its benchmark, the decode profile."""
    args = plan.args
    server = Server(plan, arm, launch)
    print(f"[{arm}] starting: {_shell(plan.server_cmd(), plan.server_env(arm))}", flush=True)
    try:
        server.start()
        server.wait_healthy(args.health_timeout)
        info = server.server_info()
        _check_signals()
        measured["server"] = {k: info[k] for k in SERVER_FIELDS if k in info}
        check_release(arm, info, plan.release)
        check_server(arm, info, plan.requires)
        records = read_status(server.status_path)
        measured["applied"] = check_applied(arm, records, plan.measured, processes=args.tp + 1)
        measured["processes"] = len(records)
        measured["status"] = records
        print(f"[{arm}] healthy; applied: {measured['applied'] or 'none'} ({len(records)} processes reported)", flush=True)
        if "gsm8k" not in measured:
            measured["gsm8k"] = parse_gsm8k(run_client(plan.gsm8k_cmd(), server.dir, server.dir / "gsm8k.log",
                                                       args.client_timeout, server, "GSM8K"))
            print(f"[{arm}] GSM8K accuracy {measured['gsm8k']['accuracy']:.3f}", flush=True)
        for repeat in repeats:
            output = plan.bench_output(arm, repeat)
            log = output.with_suffix(".log")
            output.unlink(missing_ok=True)  # bench_serving appends; the last line is read
            run_client(plan.bench_cmd(arm, repeat), server.dir, log, args.client_timeout, server, "bench_serving")
            record = bench_record(output)
            bench = parse_bench(record, output)
            bench.update(output_len=args.output_len, repeat=repeat, launch=launch, file=str(output))
            measured.setdefault("repeats", []).append(bench)  # kept in the partial results if refused below
            check_bench(arm, bench, args.num_prompts, log)
            bench["tpots_ms"] = request_tpots(record, output)
            measured["bench"] = summarise_bench(measured["repeats"])
            print(f"[{arm}] repeat {repeat + 1}/{args.repeats}: TPOT median {bench['median_tpot_ms']:.3f} ms", flush=True)
            _check_signals()
        if args.profile_steps and "profile" not in measured:
            measured["profile"] = profile_arm(plan, server)
            _check_signals()
    finally:
        server.stop()


def by_launch(arm: dict) -> list[list[list[float]]]:
    """The arm's request TPOTs as launches -> repeats -> requests (what the bootstrap resamples)."""
    launches: dict[int, list[list[float]]] = {}
    for r in arm["repeats"]:
        launches.setdefault(r["launch"], []).append(r["tpots_ms"])
    return [launches[k] for k in sorted(launches)]


def gsm8k_questions_run(args) -> int:
    """How many questions the GSM8K client really ran: ``--gsm8k-questions``, or fewer when the data
    file has fewer (it takes the first N lines; the downloaded test set has 1319)."""
    lines = 1319
    if args.gsm8k_data:
        with open(args.gsm8k_data, "rb") as fh:
            lines = sum(1 for line in fh if line.strip())
    return min(args.gsm8k_questions, lines)


def summarise_bench(repeats: list[dict]) -> dict:
    """The arm's bench figures: each the median over its repeats (requests completed: the fewest)."""
    out = {key: statistics.median(r[key] for r in repeats) for key in BENCH_KEYS if key != "completed"}
    out["completed"] = min(r["completed"] for r in repeats)
    return out


def profile_arm(plan: Plan, server: Server) -> dict:
    """A decode profile of the running server: ``{"trace": rank 0's file}``, or ``{"error": why}``."""
    from .profiling import ProfileError, decode_profile

    args = plan.args

    def check() -> None:
        _check_signals()
        if not server.alive():
            raise ValidationError(f"[{server.arm}] the server exited during the profile; last lines of "
                                  f"{server.log_path}:\n{server.log_tail()}")

    try:
        trace = decode_profile(server.url(""), server.dir / "profile", num_steps=args.profile_steps,
                               concurrency=args.concurrency, input_len=args.input_len, output_len=args.output_len,
                               prefix=server.arm, timeout=args.profile_timeout, poll=args.poll_interval, check=check)
    except ProfileError as exc:
        print(f"[{server.arm}] no profile: {exc}", flush=True)
        return {"error": str(exc)}
    print(f"[{server.arm}] profile: {trace}", flush=True)
    return {"trace": str(trace)}


def kernel_table(results: dict) -> dict:
    """trace-diff of the two arms' rank-0 profiles, or why there is none."""
    from . import tracediff

    profiles = {arm: results["arms"][arm].get("profile") or {} for arm in ("off", "on")}
    missing = [f"{arm}: {p.get('error', 'not taken')}" for arm, p in profiles.items() if "trace" not in p]
    if missing:
        return {"error": "; ".join(missing)}
    try:
        return tracediff.compare(profiles["off"]["trace"], profiles["on"]["trace"])
    except tracediff.TraceError as exc:
        return {"error": str(exc)}


def run(plan: Plan) -> dict:
    args = plan.args
    if not _port_free(args.port):
        raise UsageError(f"port {args.port} on 127.0.0.1 is already in use; pass a different --port")
    plan.out.mkdir(parents=True, exist_ok=True)
    partial = plan.out / "results.partial.json"
    for stale in (partial, plan.out / "results.json", plan.out / "report.md"):  # an earlier run's
        stale.unlink(missing_ok=True)
    results = {"model": args.model, "family": plan.family, "threshold": plan.threshold, "tp": args.tp,
               "sglang_release": plan.release,
               "server_args": " ".join(shlex.quote(a) for a in plan.server_args),
               "server_cmds": {arm: _shell(plan.server_cmd(), plan.server_env(arm)) for arm in ("off", "on")},
               "patches_requested": args.patches or "default",
               "patches_selected": list(plan.selected), "patches_measured": list(plan.measured), "arms": {}}
    try:
        results["versions"] = versions(args.python)
        results["schedule"] = [[arm, reps] for arm, reps in launch_schedule(args.repeats)]
        launches = {"off": 0, "on": 0}
        for arm, reps in launch_schedule(args.repeats):
            _check_signals()
            run_arm(plan, arm, results["arms"].setdefault(arm, {}), tuple(reps), launches[arm])
            launches[arm] += 1
            _check_signals()  # one that arrived while the server was being stopped
        # the verdicts (in the try: a failure here still leaves the measurements in the partial file)
        if args.profile_steps:
            results["kernels"] = kernel_table(results)
        on, off = results["arms"]["on"], results["arms"]["off"]  # run_arm keeps each arm's "bench" summary current
        tpot = abstats.tpot_difference(by_launch(off), by_launch(on), level=args.ci_level)
        questions = gsm8k_questions_run(args)
        gsm = {name: abstats.gsm8k_verdict(arm["gsm8k"]["accuracy"], questions, plan.threshold)
               for name, arm in (("on", on), ("off", off))}
        results["verdict"] = {
            "gsm8k_on": gsm["on"], "gsm8k_off": gsm["off"],
            "gsm8k_on_pass": gsm["on"]["passes"], "gsm8k_off_pass": gsm["off"]["passes"],
            "tpot": tpot, "tpot_change_pct": tpot["change_pct"],
        }
        try:  # best effort: a plotting failure costs the picture, not the run
            results["plot"] = write_plot(plan.out, results)
        except Exception as exc:  # noqa: BLE001
            print(f"no plot: {type(exc).__name__}: {exc}", flush=True)
            results["plot"] = None
    except BaseException as exc:
        results["error"] = f"{type(exc).__name__}: {exc}"
        partial.write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
        print(f"what was measured before the stop: {partial}", file=sys.stderr)
        raise
    (plan.out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (plan.out / "report.md").write_text(render_report(results))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(dry_run(plan))
        return 0
    _SIGNALS.clear()
    previous = {s: signal.signal(s, _note_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        run(plan)
    except UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        print(f"validation failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
        print(f"{what}; servers stopped", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # a bug of the runner's: still a clear line, servers already stopped
        import traceback

        traceback.print_exc()
        print(f"runner error (a bug, not a validation result): {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print((plan.out / "report.md").read_text())
    verdict = json.loads((plan.out / "results.json").read_text())["verdict"]
    if verdict["gsm8k_on"]["verdict"] == "inconclusive" and verdict["gsm8k_on_pass"]:
        print(f"GSM8K: the threshold {plan.threshold} lies inside the 'on' arm's 95% interval "
              f"[{verdict['gsm8k_on']['ci'][0]:.3f}, {verdict['gsm8k_on']['ci'][1]:.3f}]: not a failure, but these "
              "questions cannot tell", file=sys.stderr)
    if verdict["gsm8k_on_pass"] is False:
        also = (" (the 'off' arm fails it too: look at the model and server set-up first)"
                if verdict["gsm8k_off_pass"] is False else "")
        print(f"validation failed: the 'on' arm's GSM8K accuracy is below the threshold {plan.threshold}{also}",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""sglang-hip-decode: the ROCm MLA/NSA decode-path patch set for sglang 0.5.11, as a plugin.

SGLang calls :func:`register` through the ``sglang.srt.plugins`` entry point in every process
(``load_plugins()``). It reads the switches once, applies the selected patches with the engine in
``patching``, logs one line per patch (prefix ``sglang-hip-decode:``), and, when
``SGLANG_HIP_DECODE_STATUS_FILE`` is set, appends one JSON line per process to that file. It never
raises. Importing this package imports neither torch nor sglang.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import sys
import time
from typing import Mapping

__version__ = "0.1.0"
__all__ = ["register", "Report", "PatchStatus", "evaluate", "LOG_PREFIX"]

LOG_PREFIX = "sglang-hip-decode:"
logger = logging.getLogger("sglang_hip_decode")


@dataclasses.dataclass(frozen=True)
class PatchStatus:
    name: str
    status: str
    default: bool
    targets: tuple[str, ...]
    summary: str
    selected: bool = False  # the plugin is on and the switches select this patch

    @property
    def not_applied_for_a_fault(self) -> bool:
        """Selected, yet not applied for a reason other than a switch, the platform or upstream
        already having it: the engine failed, or this sglang release is not supported."""
        return self.selected and self.status.startswith(("failed", "unsupported"))


def is_applied_status(status: str) -> bool:
    """``applied``, or applied with a remark (``applied (verified up to X)``, ``applied (sglang X lies
    between the declared ranges; ...)``)."""
    return status == "applied" or status.startswith("applied (")


@dataclasses.dataclass(frozen=True)
class Report:
    """What one evaluation of the switches did: a status per planned patch, and the problems."""

    sglang: str | None
    platform: str
    patches: tuple[PatchStatus, ...]
    problems: tuple[str, ...]

    def status_of(self, name: str) -> str:
        return next(p.status for p in self.patches if p.name == name)

    @property
    def applied(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.patches if is_applied_status(p.status))

    @property
    def exit_code(self) -> int:
        """What ``sglang-hip-decode status`` exits with: 1 when a selected patch is not applied for
        a fault (failed, unsupported sglang), else 2 when a switch is malformed or names a patch
        that does not exist or is not implemented, else 0."""
        if any(p.not_applied_for_a_fault for p in self.patches):
            return 1
        return 2 if self.problems else 0

    def to_json(self) -> dict:
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "argv0": sys.argv[0] if sys.argv else "",
            "sglang": self.sglang,
            "platform": self.platform,
            "patches": {p.name: p.status for p in self.patches},
            "selected": [p.name for p in self.patches if p.selected],
            "applied": list(self.applied),
            "problems": list(self.problems),
        }


def evaluate(env: Mapping[str, str] | None = None, *, apply: bool = True) -> Report:
    """Decide every planned patch's status from ``env`` and, if ``apply``, apply the selected ones.

    The first reason that holds wins: not implemented; ``SGLANG_HIP_DECODE`` off; no usable sglang
    release (not installed, unreadable, older than the oldest supported, or two installations that
    disagree); what the patch declares for this release (``upstream: ...``, ``not applicable: ...``,
    selected or not: nothing of it could be switched on); not selected by ``SGLANG_HIP_DECODE_PATCHES``;
    HIP-gated and not on HIP (unless forced);
    otherwise the engine's answer, ``applied`` (``applied (verified up to X)`` on a release newer than
    the newest verified one) or ``failed: ...``. One patch failing never stops the others. With
    ``apply=False`` a patch that would be applied reports ``would apply``.
    """
    from . import gates
    from .patches import NAMES, catalog

    problems = []
    try:
        version = gates.sglang_version()
        version_label = version or "(not installed)"
    except Exception as exc:  # a broken installation's metadata: report it, apply nothing
        version, version_label = None, "(version unreadable)"
        problems.append(f"cannot read sglang's version: {type(exc).__name__}: {exc}")
    release_problem, release = _release_problem(version, version_label)
    plat = gates.platform()
    switches = gates.read_switches(env, known=NAMES)
    problems += list(switches.problems)
    try:
        entries = catalog()
    except Exception as exc:  # a broken patch file: report, apply nothing
        problems.append(f"patch set failed to load: {type(exc).__name__}: {exc}")
        rows = tuple(PatchStatus(n, f"failed: patch set failed to load ({exc})", d, (), "", selected=switches.enabled)
                     for n, _, d in _planned())
        return Report(version, plat, rows, tuple(problems))
    if switches.enabled and switches.selection == "list":
        asked = [e.name for e in entries if e.patch is None and e.name in switches.names]
        if asked:
            problems.append(f"{gates.ENV_PATCHES} names {', '.join(asked)}, not implemented yet")

    rows = []
    for entry in entries:
        patch = entry.patch
        if patch is None:
            status = "not implemented"
        elif not switches.enabled:
            status = f"off ({switches.off_reason})"
        elif release_problem:
            status = release_problem
        elif (declared := _declared_status(patch, release, version)) is not None:
            status = declared  # said whether selected or not: there is nothing of it to switch on here
        elif not switches.selects(entry.name, entry.default):
            status = switches.not_selected_reason(entry.default)
        elif patch.gate == "hip" and plat != "hip" and not switches.any_platform:
            status = f"off (not HIP; set {gates.ENV_ANY_PLATFORM}=1 to force)"
        elif not apply:
            status = "would apply"
        else:
            status = _apply(patch, release)
        selected = switches.enabled and switches.selects(entry.name, entry.default)
        candidates = patch.candidates(release) if patch is not None and release is not None else ()
        targets = tuple(dict.fromkeys(e.target for r in candidates for e in r.edits))  # this release's
        rows.append(
            PatchStatus(entry.name, status, entry.default, targets, patch.summary if patch else "", selected=selected)
        )
    return Report(version, plat, tuple(rows), tuple(problems))


def _release_problem(version, label):
    """``(status that stops every patch, or None; the parsed release)`` for the installed sglang."""
    from . import gates
    from .declare import parse_release

    if version is None:
        return f"unsupported sglang {label}", None
    release = parse_release(version)
    if release is None:
        return f"unsupported sglang {version!r} (not a release string this plugin can read)", None
    if release < parse_release(gates.OLDEST_RELEASE):
        return f"unsupported sglang {version} (releases {gates.OLDEST_RELEASE} and later: older ones load no plugins)", release
    try:
        importable = gates.sglang_importable()
        package = gates.sglang_package_version()
    except Exception:  # an odd installation: no second opinion, trust the metadata
        importable, package = True, None
    if not importable:
        return f"unsupported sglang {version} (its metadata is installed, the sglang package is not importable)", release
    package_release = parse_release(package)
    if package_release is not None and package_release[:3] != (0, 0, 0) and package_release != release:
        # (0.0.0 is the build tools' "unknown": no second opinion)
        return (f"failed: two sglang installations are visible (metadata says {version}, the importable package's "
                f"_version.py says {package}): applying nothing"), release
    return None, release


def _declared_status(patch, release, version):
    """The status a patch's declaration for ``release`` gives without applying anything, or None
    when there are edits to try."""
    declared = patch.for_release(release)
    if declared is not None and declared.upstream is not None:
        return f"upstream: sglang {version} has this ({declared.upstream.change}, since {declared.upstream.since})"
    if declared is not None and declared.not_applicable:
        return f"not applicable: {declared.not_applicable}"
    if not patch.candidates(release):
        before, after = patch.neighbours(release)
        if before is not None and after is not None and before.upstream is not None and after.upstream is not None:
            # between two ranges that both say upstream: so does every release between them
            return f"upstream: sglang {version} has this ({before.upstream.change}, since {before.upstream.since})"
        ranges = ", ".join(r.describe() for r in patch.releases)
        return f"not applicable: {patch.name} declares nothing for sglang {version} (its ranges: {ranges})"
    return None


def _apply(patch, release) -> str:
    from . import gates, patching

    try:
        status = patching.apply(patch, release)
    except patching.PatchError as exc:
        return f"failed: {exc}"
    except Exception as exc:  # anything else an apply raised: still a status
        return f"failed: {type(exc).__name__}: {exc}"
    if status == "applied" and release > patching.parse_release(gates.NEWEST_VERIFIED):
        return f"applied (verified up to {gates.NEWEST_VERIFIED})"
    return status


def _planned():
    from .patches import PLANNED

    return PLANNED


def _log(report: Report) -> None:
    if not logger.hasHandlers():  # SGLang may not have configured logging yet in this process
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    head = f"{LOG_PREFIX} sglang {report.sglang}, platform {report.platform}, pid {os.getpid()}"
    logger.info(head)
    for row in report.patches:
        logger.info("%s %s: %s", LOG_PREFIX, row.name, row.status)
    for problem in report.problems:
        logger.warning("%s problem: %s", LOG_PREFIX, problem)


def _write_status_file(report: Report, path: str) -> None:
    """Append one line (every scheduler process calls register()) in a single write. Never blocks:
    O_NONBLOCK makes opening a FIFO without a reader fail at once, and anything but a regular
    file is refused (a FIFO with a reader, a device, a socket); the caller turns that into a warning."""
    line = json.dumps(report.to_json(), sort_keys=True) + "\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file ({stat.filemode(os.fstat(fd).st_mode)})")
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def register() -> Report:
    """SGLang's plugin entry point. Cheap, idempotent, never raises; returns the report (on an
    unexpected error, a report with no patch applied that names the error, also written to the
    status file so a runner sees why)."""
    try:
        report = evaluate()
    except Exception as exc:  # never take the server down
        report = Report(None, "unknown", (), (f"register() failed: {type(exc).__name__}: {exc}",))
    try:
        _log(report)
    except Exception:
        pass
    try:
        from .gates import ENV_STATUS_FILE

        path = os.environ.get(ENV_STATUS_FILE)
        if path:
            try:
                _write_status_file(report, path)
            except OSError as exc:
                logger.warning("%s cannot write status file %s: %s", LOG_PREFIX, path, exc)
    except Exception:
        pass
    return report

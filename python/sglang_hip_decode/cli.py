"""``sglang-hip-decode``: status, diff and doctor.

* ``status [--json]``: every planned patch with its targets, default and the status it gets in this
  process under the current switches (the patch is really applied here, so a changed upstream
  shows up as ``failed: ...``), the sglang version and the platform. Exit code, both forms: 0 when
  every selected patch is applied or off for a switch, the platform or upstream having it; 1 when a
  selected patch failed or this sglang release is unsupported; 2 when a switch is malformed or
  names an unknown or unimplemented patch (and nothing failed); 3 when sglang is not installed.
* ``diff [NAME ...]``: the edits as a unified diff against the upstream files, with paths
  ``a/python/sglang/...`` that ``git apply`` accepts in an sglang v0.5.11 checkout. No name: every
  implemented patch, in application order.
* ``doctor``: torch, GPU and HIP arch, Triton, aiter / TileLang importable, and which provider each
  kernel resolves to.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import sys

from . import __version__, evaluate, gates


EXIT_NO_SGLANG = 3


def _require_sglang(as_json: bool = False) -> str:
    """sglang's version, or exit 3 saying why not (as a JSON object too, for ``--json``)."""
    try:
        version = gates.sglang_version()
        problem = None if version is not None and importlib.util.find_spec("sglang") is not None else \
            "sglang is not installed in this Python environment"
    except Exception as exc:
        version, problem = None, f"cannot read sglang's version (a broken installation?): {type(exc).__name__}: {exc}"
    if problem:
        if as_json:
            print(json.dumps({"error": problem, "exit_code": EXIT_NO_SGLANG}))
        print(f"sglang-hip-decode: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_NO_SGLANG)
    return version


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_status(args) -> int:
    _require_sglang(as_json=args.json)
    report = evaluate()
    if args.json:
        print(json.dumps(dict(report.to_json(), exit_code=report.exit_code), indent=2, sort_keys=True))
        return report.exit_code
    print(f"sglang-hip-decode {__version__}: sglang {report.sglang} (targets {gates.TARGET_SGLANG}), platform {report.platform}")
    switches = {k: os.environ[k] for k in (gates.ENV_ENABLE, gates.ENV_PATCHES, gates.ENV_ANY_PLATFORM) if k in os.environ}
    print("switches: " + (", ".join(f"{k}={v}" for k, v in switches.items()) or "none set (defaults)"))
    print()
    rows = []
    for p in report.patches:
        targets = ", ".join(t.split(":", 1)[1] for t in p.targets) or "-"
        rows.append([p.name, targets, "on" if p.default else "opt-in", p.status])
    print(_table(rows, ["patch", "targets", "default", "status"]))
    for problem in report.problems:
        print(f"problem: {problem}")
    return report.exit_code


def _diff_path(real_file: str) -> str:
    import sglang

    root = os.path.dirname(os.path.dirname(os.path.abspath(sglang.__file__)))
    rel = os.path.relpath(os.path.abspath(real_file), root)
    return "python/" + rel.replace(os.sep, "/")


def unified_diff(names: list[str] | None = None) -> str:
    """The diff text for ``names`` (default: every implemented patch)."""
    from .patches import catalog, pick

    wanted = names or [e.name for e in catalog() if e.patch is not None]
    try:
        entries = pick(wanted)
    except ValueError as exc:
        raise SystemExit(f"sglang-hip-decode: {exc}")
    return render_diff([e.patch for e in entries])  # application order


def render_diff(patches) -> str:
    """The unified diff of ``patches`` (applied in the order given) against the upstream files."""
    from . import patching

    try:
        edits = patching.file_edits(patches)
    except patching.PatchError as exc:
        raise SystemExit(f"sglang-hip-decode: failed: {exc}")
    out = []
    for real_file in sorted(edits, key=_diff_path):
        before, after = edits[real_file]
        path = _diff_path(real_file)
        out.extend(
            difflib.unified_diff(
                before.splitlines(keepends=True),
                after.splitlines(keepends=True),
                fromfile=f"a/{path}",
                tofile=f"b/{path}",
            )
        )
    return "".join(out)


def cmd_diff(args) -> int:
    _require_sglang()
    text = unified_diff(args.names)
    if not text:
        print("sglang-hip-decode: no implemented patch to diff", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def _probe_import(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return f"importable {getattr(mod, '__version__', '')}".rstrip()


def cmd_doctor(args) -> int:
    from .testing import providers

    lines = [f"sglang-hip-decode {__version__}", f"python {sys.version.split()[0]}"]
    version = gates.sglang_version()
    lines.append(f"sglang {version or 'NOT INSTALLED'} (supported: {gates.sglang_supported(version)})")
    try:
        import torch

        lines.append(f"torch {torch.__version__} (hip {torch.version.hip}, cuda {torch.version.cuda})")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            arch = getattr(props, "gcnArchName", None) or f"sm_{props.major}{props.minor}"
            lines.append(f"gpu {props.name}, arch {arch}, {torch.cuda.device_count()} device(s)")
        else:
            lines.append("gpu none")
    except Exception as exc:
        lines.append(f"torch not importable: {exc}")
    lines.append(f"platform {gates.platform()}")
    for module in ("triton", "aiter", "tilelang"):
        lines.append(f"{module} {_probe_import(module)}")
    print("\n".join(lines))
    print()
    rows = []
    for name in sorted(providers.kernels()):
        res = providers.resolve(name)
        passed = "; ".join(f"{k}: {r}" for k, r in res.reasons) or "-"
        rows.append([name, res.kind or "NONE", passed])
    print(_table(rows, ["kernel", "provider", "passed over"]))
    return 0 if version is not None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sglang-hip-decode", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="patch statuses under the current switches")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("diff", help="unified diff against the upstream sglang files")
    p.add_argument("names", nargs="*", help="patch names (default: every implemented patch)")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("doctor", help="environment and kernel providers")
    p.set_defaults(func=cmd_doctor)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""``sglang-hip-decode``: status, diff, releases and doctor.

* ``status [--json]``: the installed sglang release and the platform, then every planned patch with
  this release's targets, its default and the status it gets in this process under the current
  switches (the patch is really applied here, so a changed upstream shows up as ``failed: ...``).
  Exit code, both forms: 0 when every selected patch is applied or off for a switch, the platform,
  upstream having it or not applying to this release; 1 when a selected patch failed or this sglang
  is unsupported; 2 when a switch is malformed or names an unknown or unimplemented patch (and
  nothing failed); 3 when sglang is not installed.
* ``diff [NAME ...] [--release X] [--source WHEEL|DIR]``: the edits each patch declares for a
  release as a unified diff against that release's files, with paths ``a/python/sglang/...`` that
  ``git apply`` accepts in its checkout. The text is the installed sglang's (default) or a release
  wheel's / checkout's (``--source``); the release is the source's own unless ``--release`` names it.
  No name: every implemented patch, in application order; one upstream already has there is left out
  (said on stderr).
* ``releases [--markdown]``: what every patch does on every verified release (README's table).
* ``doctor``: torch, GPU and HIP arch, Triton, aiter / TileLang importable, and which provider each
  kernel resolves to.
* ``find-copies [nsa|mxfp4|indexer ...] [--arm unpatched|patched|both] [--json]``: the decode
  harness's real sglang paths under the redundant-copy finder (``testing.find_copies``).
* ``trace-diff OFF ON [--json] [--layers N] [--events auto|kernels|ops] [--step-marker RE] [--all]``:
  two torch.profiler chrome traces (SGLang's ``/start_profile`` output) compared per decode step and
  per layer, kernel by kernel (``sglang_hip_decode.tracediff``). Exit 0, or 2 for an unreadable
  trace or one with no decode steps (the message says which).
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
    print(f"sglang-hip-decode {__version__}: sglang {report.sglang} "
          f"(verified {gates.OLDEST_RELEASE} ... {gates.NEWEST_VERIFIED}), platform {report.platform}")
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


def unified_diff(names: list[str] | None = None, release: str | None = None, source: str | None = None) -> str:
    """The diff text for ``names`` (default: every implemented patch) on ``release`` (default: the
    source's), against ``source`` (a wheel or folder; default: the installed sglang)."""
    from .declare import format_release
    from .patches import catalog, pick

    wanted = names or [e.name for e in catalog() if e.patch is not None]
    try:
        entries = pick(wanted)
    except ValueError as exc:
        raise SystemExit(f"sglang-hip-decode: {exc}")
    read, release = _diff_source(release, source)
    patches = []
    for entry in entries:  # application order
        declared = entry.patch.for_release(release)
        if not entry.patch.candidates(release):
            why = "declares nothing for it" if declared is None else declared.why_no_edits()
            print(f"sglang-hip-decode: {entry.name}: no edits on sglang {format_release(release)}: {why}", file=sys.stderr)
            continue
        patches.append(entry.patch)
    return render_diff(patches, read, release)


def _diff_source(release: str | None, source: str | None):
    """``(read, parsed release)`` for ``diff``; exits with a clear message on bad input."""
    from . import patching
    from .declare import parse_release

    wanted = parse_release(release) if release is not None else None
    if release is not None and wanted is None:
        raise SystemExit(f"sglang-hip-decode: --release {release!r} is not a release string (e.g. 0.5.12.post1)")
    if source is not None:
        try:
            read = patching.source_reader(source)
        except (OSError, patching.PatchError, ValueError) as exc:  # a missing path, not a wheel, a bad zip
            raise SystemExit(f"sglang-hip-decode: --source {source}: {exc}")
        own = gates.version_in_text(read("sglang/_version.py"))
        if wanted is None and parse_release(own) is None:
            raise SystemExit(f"sglang-hip-decode: --source {source} does not say its release (no sglang/_version.py): "
                             "give --release")
        if wanted is not None and own is not None and parse_release(own) != wanted:
            raise SystemExit(f"sglang-hip-decode: --source {source} is sglang {own}, not {release}")
        return read, wanted or parse_release(own)
    installed = _require_sglang()
    if wanted is not None and parse_release(installed) != wanted:
        raise SystemExit(f"sglang-hip-decode: sglang {installed} is installed; for {release} give --source "
                         f"(its wheel, e.g. from `pip download --no-deps sglang=={release}`, or a checkout)")
    if parse_release(installed) is None:
        raise SystemExit(f"sglang-hip-decode: the installed sglang's version {installed!r} is not a release string: "
                         "give --release")
    return patching.installed_sglang_reader(), parse_release(installed)


def render_diff(patches, read=None, release=None) -> str:
    """The unified diff of ``patches`` (applied in the order given, as declared for ``release``)
    against the files ``read`` returns (default: the installed sglang's)."""
    from . import patching

    try:
        edits = patching.edit_file_texts(patches, read or patching.installed_sglang_reader(), release)
    except patching.PatchError as exc:
        raise SystemExit(f"sglang-hip-decode: failed: {exc}")
    out = []
    for name in sorted(edits):
        before, after = edits[name]
        out.extend(
            difflib.unified_diff(
                before.splitlines(keepends=True),
                after.splitlines(keepends=True),
                fromfile=f"a/python/{name}",
                tofile=f"b/python/{name}",
            )
        )
    return "".join(out)


def cmd_diff(args) -> int:
    text = unified_diff(args.names, args.release, args.source)
    if not text:
        print("sglang-hip-decode: no patch has edits to diff on this release", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def release_rows() -> list[list[str]]:
    """``[[releases, cell per implemented patch ...], ...]``: what each patch does on each verified
    release, consecutive releases with the same cells merged, and a last row for newer releases."""
    from .declare import parse_release
    from .patches import catalog

    patches = [e.patch for e in catalog() if e.patch is not None]

    def cell(patch, release):
        declared = patch.for_release(release)
        if declared is None:
            return "not declared"
        if declared.upstream is not None:
            return f"upstream ({declared.upstream.change}, since {declared.upstream.since})"
        if declared.not_applicable:
            return f"not applicable ({declared.not_applicable})"
        methods: dict[str, int] = {}
        for e in declared.edits:
            module = e.target.split(":")[0].rsplit(".", 1)[-1]
            methods[module] = methods.get(module, 0) + 1
        return "applies: " + ", ".join(f"`{m}`" + (f" ({n} methods)" if n > 1 else "") for m, n in methods.items())

    groups: list[tuple[list[str], list[str]]] = []
    for release in gates.VERIFIED_RELEASES:
        cells = [cell(p, parse_release(release)) for p in patches]
        if groups and groups[-1][1] == cells:
            groups[-1][0].append(release)
        else:
            groups.append(([release], cells))
    rows = [[_span(names)] + cells for names, cells in groups]
    newer = []
    for p in patches:  # a newer release gets the open-ended last range, if the patch has one
        last = p.for_release(parse_release(gates.NEWEST_VERIFIED))
        if last is None or last.last is not None:
            newer.append("not declared")
        else:
            shown = cell(p, parse_release(gates.NEWEST_VERIFIED))
            newer.append(shown.replace("applies:", "tried (anchors decide):", 1) if last.edits else shown)
    rows.append([f"newer than {gates.NEWEST_VERIFIED}"] + newer)
    return [["release"] + [p.name for p in patches]] + rows


def _span(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"{names[0]}, {names[1]}"
    return f"{names[0]} ... {names[-1]}"


def cmd_releases(args) -> int:
    header, *rows = release_rows()
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print(_table(rows, header))
    return 0


def _probe_import(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return f"importable {getattr(mod, '__version__', '')}".rstrip()


def _release_support(version: str | None) -> str:
    from .declare import parse_release

    release = parse_release(version)
    if version is None:
        return "no patch can apply"
    if release is None:
        return "not a release string: no patch applies"
    if release < parse_release(gates.OLDEST_RELEASE):
        return f"older than {gates.OLDEST_RELEASE}: no patch applies"
    if release > parse_release(gates.NEWEST_VERIFIED):
        return f"newer than the newest verified, {gates.NEWEST_VERIFIED}: tried with the newest edits"
    return f"verified {gates.OLDEST_RELEASE} ... {gates.NEWEST_VERIFIED}"


def cmd_doctor(args) -> int:
    from .testing import providers

    lines = [f"sglang-hip-decode {__version__}", f"python {sys.version.split()[0]}"]
    version = gates.sglang_version()
    lines.append(f"sglang {version or 'NOT INSTALLED'} ({_release_support(version)})")
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
    print("(providers are what this project's tests and benchmarks run for each ROCm kernel a patch sits "
          "between; a server always calls upstream's own kernels. NONE: no provider can run here, so those "
          "tests and benchmarks skip.)")
    discovered, line = plugin_entry_point()
    print()
    print(line)
    return 0 if version is not None and discovered else 1


ENTRY_POINT_GROUP = "sglang.srt.plugins"


def plugin_entry_point() -> tuple[bool, str]:
    """Whether SGLang's plugin loader will find this plugin (an installed distribution's entry point
    in ``sglang.srt.plugins`` that loads to ``sglang_hip_decode.register``), and a line saying so."""
    from importlib import metadata

    from . import register

    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.value.split(":")[0] == "sglang_hip_decode"]
    if not found:
        return False, (f"plugin entry point: NOT FOUND in group {ENTRY_POINT_GROUP}: SGLang will not load the plugin "
                       "(install the package, e.g. pip install --no-deps the wheel; a PYTHONPATH entry is not enough)")
    ep = found[0]
    allowed = {x.strip() for x in os.environ.get("SGLANG_PLUGINS", "").split(",") if x.strip()}
    if allowed and ep.name not in allowed:  # SGLang's whitelist of plugin names
        return False, (f"plugin entry point: {ep.name} = {ep.value} is found, but SGLANG_PLUGINS="
                       f"{os.environ['SGLANG_PLUGINS']!r} does not name {ep.name!r}: SGLang will skip it")
    same_name = [e for e in metadata.entry_points(group=ENTRY_POINT_GROUP) if e.name == ep.name]
    if len(same_name) > 1:
        return False, (f"plugin entry point: {len(same_name)} entry points are named {ep.name!r} in "
                       f"{ENTRY_POINT_GROUP} ({', '.join(e.value for e in same_name)}): SGLang keeps one of them")
    try:
        loaded = ep.load()
    except Exception as exc:  # noqa: BLE001 - whatever stops SGLang's loader stops it here too
        return False, f"plugin entry point: {ep.name} = {ep.value} does not load ({type(exc).__name__}: {exc})"
    dist = f" (distribution {ep.dist.name} {ep.dist.version})" if getattr(ep, "dist", None) else ""
    if loaded is not register:
        return False, f"plugin entry point: {ep.name} = {ep.value}{dist} loads another register than this package's"
    return True, f"plugin entry point: {ep.name} = {ep.value}{dist}: SGLang's plugin loader will call it"


def cmd_trace_diff(args) -> int:
    from . import tracediff

    try:
        result = tracediff.compare(args.off, args.on, layers=args.layers, events=args.events,
                                   step_marker=args.step_marker)
    except tracediff.TraceError as exc:
        print(f"sglang-hip-decode trace-diff: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else tracediff.render(result, show_all=args.all))
    return 0


def cmd_find_copies(args) -> int:
    _require_sglang(as_json=args.json)
    from .testing import find_copies_paths

    arms = {"unpatched": (False,), "patched": (True,), "both": (False, True)}[args.arm]
    reports = [find_copies_paths.find_copies(kind, patched=patched, calls=args.calls, device=args.device)
               for kind in (args.paths or list(find_copies_paths.PATHS)) for patched in arms]
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print("\n\n".join(find_copies_paths.render(r) for r in reports))
    return 1 if any("unavailable" in r for r in reports) else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, not {text!r}")
    return value


DESCRIPTION = """\
sglang-hip-decode: the ROCm (MI355X) decode patch set for SGLang, as an SGLang plugin. SGLang loads
it at start-up (entry point group sglang.srt.plugins); each patch edits an upstream function in
place, only on HIP unless forced, and each can be switched off. This command shows what applies on
the installed sglang, the edits as diffs, and the tools that check a decode path (trace-diff,
find-copies)."""

SWITCHES = f"""\
switches (environment variables, read when SGLang loads the plugin):
  {gates.ENV_ENABLE}=1|0           apply the patch set (default 1) or nothing
  {gates.ENV_PATCHES}=...  all, none, default, or a comma-separated list of patch names
  {gates.ENV_ANY_PLATFORM}=1  apply HIP-gated patches on CUDA/CPU too (validation only)
  {gates.ENV_STATUS_FILE}=PATH  append one JSON status line per process
  on is any of {'/'.join(gates.SWITCH_ON)}, off any of {'/'.join(gates.SWITCH_OFF)} (any case)

exit codes of status: 0 all selected patches fine, 1 one failed or sglang unsupported, 2 a switch is
malformed or names an unknown patch, 3 sglang not installed"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sglang-hip-decode", description=DESCRIPTION, epilog=SWITCHES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sglang-hip-decode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("status", help="patch statuses under the current switches")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("diff", help="unified diff against the upstream sglang files")
    p.add_argument("names", nargs="*", help="patch names (default: every implemented patch)")
    p.add_argument("--release", help="the release whose declared edits to show (default: the source's)")
    p.add_argument("--source", help="an sglang wheel (.whl) or a folder/checkout holding the sglang package "
                                    "(default: the installed sglang)")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("releases", help="what every patch does on every verified sglang release")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (README's)")
    p.set_defaults(func=cmd_releases)
    p = sub.add_parser("doctor", help="environment and kernel providers")
    p.set_defaults(func=cmd_doctor)
    from .tracediff import DEFAULT_STEP_MARKER

    p = sub.add_parser("trace-diff", help="compare two decode profiles (chrome traces) kernel by kernel",
                       description="Compare the decode steps of two torch.profiler chrome traces (.json or "
                                   ".json.gz, SGLang's /start_profile output): per decode step and per layer, "
                                   "each kernel's count and GPU time in both, what disappeared, what appeared, "
                                   "and the net.")
    p.add_argument("off", help="the trace of the arm without the patches")
    p.add_argument("on", help="the trace of the arm with the patches")
    p.add_argument("--json", action="store_true", help="machine-readable output (raw kernel names included)")
    p.add_argument("--layers", type=_positive_int,
                   help="decoder layers in the model (default: inferred from the OFF trace)")
    p.add_argument("--events", choices=("auto", "kernels", "ops"), default="auto",
                   help="compare GPU kernels or CPU aten ops (default auto: kernels when the trace has any)")
    p.add_argument("--step-marker", default=DEFAULT_STEP_MARKER,
                   help=f"regular expression naming a decode step's span (default: {DEFAULT_STEP_MARKER})")
    p.add_argument("--all", action="store_true", help="list the unchanged kernels too")
    p.set_defaults(func=cmd_trace_diff)
    p = sub.add_parser("find-copies", help="run decode paths and report copies whose output already exists",
                       description="Run the decode harness's real sglang paths (this Python's sglang) under the "
                                   "redundant-copy finder: every copy op whose output equals, byte for byte, a buffer "
                                   "alive at that moment (or relays out a buffer made in the same call), once per call "
                                   "site with the sglang stack, the bytes and how often per call.")
    p.add_argument("paths", nargs="*", choices=[[], "nsa", "mxfp4", "indexer"], metavar="PATH",
                   help="nsa, mxfp4 or indexer (default: all three)")
    p.add_argument("--arm", choices=("unpatched", "patched", "both"), default="both",
                   help="run the path without its patch, with it, or both (default)")
    p.add_argument("--calls", type=_positive_int, default=2, help="decode calls to run under the finder (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the harness runs (default cpu)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_find_copies)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The CLI: status table and exit codes, diff that `git apply` accepts on the 0.5.11 tree, doctor, and
clear errors when sglang is missing. In-process (``cli.main``), except one run of the installed
console script and one Python without sglang."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sglang_hip_decode import cli, patching

from patch_fixtures import DOUBLE_EPS, GROW_HIDDEN, GUARD_RAISES, make

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("sglang-hip-decode")


@pytest.fixture
def switches(monkeypatch):
    """No SGLANG_HIP_DECODE* switch set; returns a setter for the ones a test wants."""
    for key in [k for k in os.environ if k.startswith("SGLANG_HIP_DECODE")]:
        monkeypatch.delenv(key)
    return lambda **env: [monkeypatch.setenv(k, v) for k, v in env.items()]


def run_main(capsys, *args):
    """``cli.main(args)`` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_console_script_prints_the_status_table():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_HIP_DECODE")}
    proc = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "sglang 0.5.11 (verified 0.5.11 ... 0.5.23), platform cpu" in out
    assert "switches: none set (defaults)" in out
    header = next(line for line in out.splitlines() if line.startswith("patch"))
    assert header.split() == ["patch", "targets", "default", "status"]
    from sglang_hip_decode.patches import PLANNED

    for name, _, default in PLANNED:
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f" {'on' if default else 'opt-in'} " in row


def test_status_json_and_switch_problems(switches, capsys):
    switches(SGLANG_HIP_DECODE_PATCHES="nsa-cat-skip,bogus")
    code, out, err = run_main(capsys, "status", "--json")
    assert code == 2, err  # a switch naming an unknown patch
    import json

    data = json.loads(out)
    from sglang_hip_decode.patches import NAMES

    assert list(data["patches"]) == sorted(NAMES)  # sort_keys
    assert any("unknown patch 'bogus'" in p for p in data["problems"])
    assert data["exit_code"] == 2 and data["selected"] == ["nsa-cat-skip"]


@pytest.mark.parametrize("form", [(), ("--json",)])
def test_status_exit_codes_tell_a_script_the_truth(form, switches, capsys):
    # Default switches on this CPU: every patch off for the platform -> 0, in both forms.
    assert run_main(capsys, "status", *form)[0] == 0
    # A malformed switch -> 2 (naming an unimplemented patch: test_plugin's test_report_exit_code).
    switches(SGLANG_HIP_DECODE="maybe")
    assert run_main(capsys, "status", *form)[0] == 2


def test_status_json_exits_1_when_a_patch_failed(stand_in, monkeypatch, capsys):
    monkeypatch.setenv("SGLANG_HIP_DECODE_ANY_PLATFORM", "1")
    rc = cli.main(["status", "--json"])
    import json

    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["exit_code"] == 1 and data["patches"]["t-broken"].startswith("failed: hunk 1")


@pytest.mark.parametrize("form", [(), ("--json",)])
def test_status_with_two_sglang_installations_exits_1(form, switches, monkeypatch, tmp_path, capsys):
    # A fake sglang 0.5.12 distribution ahead of the real one on the path: its metadata is what
    # importlib.metadata reads, while the importable package is 0.5.11's: nothing is applied.
    dist = tmp_path / "sglang-0.5.12.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang\nVersion: 0.5.12\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    switches(SGLANG_HIP_DECODE_ANY_PLATFORM="1")
    code, out, _ = run_main(capsys, "status", *form)
    assert code == 1 and "failed: two sglang installations are visible (metadata says 0.5.12" in out
    from sglang_hip_decode import patches

    assert not any(patching.is_applied(e.patch) for e in patches.catalog() if e.patch is not None)


def test_status_table_with_implemented_patches(stand_in, monkeypatch, capsys):
    monkeypatch.setenv("SGLANG_HIP_DECODE_ANY_PLATFORM", "1")
    rc = cli.main(["status"])
    out = capsys.readouterr().out
    assert rc == 1  # a failed patch makes status exit non-zero
    assert "switches: SGLANG_HIP_DECODE_ANY_PLATFORM=1" in out
    row = next(line for line in out.splitlines() if line.startswith("t-on "))
    assert row.split()[1:4] == ["RMSNorm.__init__", "on", "applied"]
    assert "failed: hunk 1 of" in next(line for line in out.splitlines() if line.startswith("t-broken "))


@pytest.fixture(scope="module")
def upstream_tree(tmp_path_factory):
    """sglang v0.5.11's python/sglang tree, extracted from the release wheel."""
    wheels = sorted((ROOT / ".whl").glob("sglang-0.5.11-*.whl"))
    if not wheels:
        pytest.skip("no sglang 0.5.11 wheel in .whl/ (make venv downloads it)")
    tree = tmp_path_factory.mktemp("sglang-v0.5.11")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.startswith("sglang/")]
        wheel.extractall(tree / "python", members)
    return tree


def git_apply(tree, diff_text, *extra):
    return subprocess.run(["git", "apply", *extra, "-"], cwd=tree, input=diff_text, capture_output=True, text=True)


def test_diff_applies_to_the_upstream_tree(upstream_tree, tmp_path):
    # Three edits in two files; the patched text is what the engine would run.
    patches = [make("t-a", DOUBLE_EPS), make("t-b", GUARD_RAISES)]
    text = cli.render_diff(patches)
    assert "--- a/python/sglang/srt/layers/layernorm.py" in text
    assert "+++ b/python/sglang/srt/layers/attention/nsa/nsa_indexer.py" in text
    assert "+        self.variance_epsilon = eps * 2  # test-only hunk" in text
    check = git_apply(upstream_tree, text, "--check")
    assert check.returncode == 0, check.stderr
    tree = tmp_path / "tree"
    shutil.copytree(upstream_tree, tree)
    applied = git_apply(tree, text)
    assert applied.returncode == 0, applied.stderr
    layernorm = (tree / "python/sglang/srt/layers/layernorm.py").read_text()
    assert patching.patched_source(DOUBLE_EPS.target, patches[:1]) in layernorm
    reverse = git_apply(tree, text, "-R", "--check")
    assert reverse.returncode == 0, reverse.stderr


def test_diff_of_two_patches_on_one_method(upstream_tree):
    text = cli.render_diff([make("t-a", DOUBLE_EPS), make("t-c", GROW_HIDDEN)])
    assert text.count("--- a/python/sglang/srt/layers/layernorm.py") == 1
    assert git_apply(upstream_tree, text, "--check").returncode == 0


def test_diff_of_real_patches(upstream_tree, capsys):
    from sglang_hip_decode.patches import catalog

    implemented = [e.name for e in catalog() if e.patch is not None]
    assert implemented
    code, text, _ = run_main(capsys, "diff")  # no name: every implemented patch
    assert code == 0 and text == cli.unified_diff(implemented)
    assert git_apply(upstream_tree, text, "--check").returncode == 0


def test_diff_refuses_unknown_and_unimplemented_names(stand_in, capsys):
    code, _, _ = run_main(capsys, "diff", "no-such-patch")
    assert code == "sglang-hip-decode: unknown patch no-such-patch (known: t-on, t-opt, t-broken, t-planned)"
    code, _, _ = run_main(capsys, "diff", "t-planned")  # the stand-in catalogue's unimplemented one
    assert code == "sglang-hip-decode: not implemented yet: t-planned"


def test_doctor(capsys):
    code, out, err = run_main(capsys, "doctor")
    assert code == 0, err
    assert "sglang 0.5.11 (verified 0.5.11 ... 0.5.23)" in out
    assert "torch 2.11.0" in out
    assert "aiter not importable" in out and "tilelang not importable" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kernel "))
    end = next(i for i in range(header, len(lines)) if lines[i].startswith("(providers are"))
    rows = {line.split()[0]: line.split()[1] for line in lines[header + 2 : end]}
    assert "NONE: no provider can run here" in lines[end]
    assert lines[-1] == ("plugin entry point: hip_decode = sglang_hip_decode:register (distribution sglang-hip-decode "
                         f"{__import__('sglang_hip_decode').__version__}): SGLang's plugin loader will call it")
    # The implemented kernels resolve to the portable Triton kernel on a GPU, else the torch reference.
    import torch

    expected = "triton" if torch.cuda.is_available() else "torch"
    assert rows["fused_qk_rope_cat_and_cache_mla"] == rows["tilelang_sparse_fwd"] == expected
    assert all(kind in ("rocm", "triton", "torch", "NONE") for kind in rows.values())


def _python_without_site_packages(code):
    """Run ``code`` in a Python that sees this package but no installed distributions (no sglang)."""
    prelude = (
        "import sys; sys.path = [p for p in sys.path if 'site-packages' not in p and '.egg' not in p]; "
        f"sys.path.insert(0, {str(ROOT / 'python')!r}); "
    )
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)


def test_missing_sglang_is_a_clear_error():
    for command in ("status", "diff"):
        proc = _python_without_site_packages(f"from sglang_hip_decode.cli import main; sys.exit(main([{command!r}]))")
        assert proc.returncode == 3
        assert "sglang is not installed" in proc.stderr
    proc = _python_without_site_packages("from sglang_hip_decode.cli import main; sys.exit(main(['status', '--json']))")
    import json

    assert proc.returncode == 3 and json.loads(proc.stdout)["exit_code"] == 3
    proc = _python_without_site_packages("from sglang_hip_decode.cli import main; sys.exit(main(['doctor']))")
    assert proc.returncode == 1 and "sglang NOT INSTALLED" in proc.stdout, proc.stderr
    assert "torch not importable" in proc.stdout
    assert "fused_qk_rope_cat_and_cache_mla  NONE" in proc.stdout
    assert "plugin entry point: NOT FOUND in group sglang.srt.plugins: SGLang will not load the plugin" in proc.stdout
    # The plugin itself, if ever called without sglang, still does not raise.
    proc = _python_without_site_packages(
        "import sglang_hip_decode as s; r = s.register(); print(r.sglang, set(p.status for p in r.patches))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("None ")


def test_doctor_says_when_sglang_plugins_excludes_it(capsys, monkeypatch):
    from sglang_hip_decode import cli

    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else")
    found, line = cli.plugin_entry_point()
    assert not found and "SGLANG_PLUGINS='someone_else' does not name 'hip_decode': SGLang will skip it" in line
    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else, hip_decode")
    assert cli.plugin_entry_point()[0]


def test_version_and_help_say_what_the_tool_is(capsys):
    from sglang_hip_decode import __version__, cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sglang-hip-decode {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "the ROCm (MI355X) decode patch set for SGLang" in out and "``" not in out
    for switch in ("SGLANG_HIP_DECODE=1|0", "SGLANG_HIP_DECODE_PATCHES=", "SGLANG_HIP_DECODE_ANY_PLATFORM=1",
                   "SGLANG_HIP_DECODE_STATUS_FILE=PATH", "on is any of 1/true/yes/on, off any of 0/false/no/off"):
        assert switch in out, switch
    for command in ("status", "diff", "releases", "doctor", "trace-diff", "find-copies"):
        assert f"    {command}" in out, command


def test_validate_help_shows_defaults_and_units(capsys):
    from sglang_hip_decode import validate

    with pytest.raises(SystemExit):
        validate.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("prompt length (tokens) (default: 8192)", "output length (tokens) (default: 1024)",
                 "requests in flight (default: 4)", "seconds for a server to become healthy (default: 1800.0)",
                 "(default: 30000)", "decode steps of the profile"):
        assert text in out, text
    assert "(default: None)" not in out

"""Every release 0.5.11 ... 0.5.23: each patch's declaration is true of that release's source text
(read from the release wheels, no install), the text path equals what the engine runs, and the
parity suites and ``status`` run on 0.5.12.post1, 0.5.13.post1 and 0.5.23 each in their own process
(``PYTHONPATH=.releases/<version>``; 0.5.11 is this venv's sglang).

``make test`` fetches the wheels and installs the parity releases first (tools/release_wheels.py)
and sets ``SGLANG_HIP_DECODE_TEST_RELEASES``: then a missing one is a failure, not a skip.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from sglang_hip_decode import gates, patching
from sglang_hip_decode.declare import parse_release
from sglang_hip_decode.patches import catalog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import release_wheels  # noqa: E402

IMPLEMENTED = [e.patch for e in catalog() if e.patch is not None]
REQUIRED = bool(os.environ.get("SGLANG_HIP_DECODE_TEST_RELEASES"))


def _missing(what: str):
    if REQUIRED:
        pytest.fail(f"{what} is missing although make test fetched the releases (tools/release_wheels.py)")
    pytest.skip(f"{what} is missing: run `make releases` (tools/release_wheels.py)")


@functools.lru_cache(maxsize=None)
def reader(version: str):
    path = release_wheels.wheel(version)
    return None if path is None else patching.source_reader(str(path))


def read_release(version: str):
    read = reader(version)
    if read is None:
        _missing(f"the sglang {version} wheel")
    assert gates.version_in_text(read("sglang/_version.py")) == version
    return read


def test_the_verified_releases_are_in_order_and_every_one_is_declared():
    releases = [parse_release(v) for v in gates.VERIFIED_RELEASES]
    assert releases == sorted(releases) and len(set(releases)) == len(releases) == 16
    assert len(IMPLEMENTED) >= 3
    for patch in IMPLEMENTED:
        for release in releases:
            assert patch.for_release(release) is not None, (patch.name, release)


@pytest.mark.parametrize("version", gates.VERIFIED_RELEASES)
def test_each_declaration_is_true_of_the_release_text(version):
    read, release = read_release(version), parse_release(version)
    checked = 0
    for patch in IMPLEMENTED:
        declared = patch.for_release(release)
        for other in patch.releases:
            if not other.edits:
                continue
            if other is declared:  # every anchor matches exactly once in code; the result parses
                edited = patching.edit_file_texts([patch], read, release)
                assert edited and all(before != after for before, after in edited.values())
                for name, (_, after) in edited.items():
                    ast.parse(after, filename=name)
                checked += 1
            elif declared is not None and set(other.edits) <= set(declared.edits):
                patching.edit_file_texts([patch.at(other.edits)], read, release)  # a part of this range's: fits
            else:  # another range's edits do not fit this text (the ranges really differ)
                with pytest.raises(patching.PatchError):
                    patching.edit_file_texts([patch.at(other.edits)], read, release)
        for other in patch.releases:
            if other.upstream is None:
                continue
            present = [patching.evidence_present(read, where, t) for where, t in other.upstream.evidence]
            assert other.upstream.evidence, (patch.name, other.describe())
            if other is declared:  # upstream's equivalent is there
                assert all(present), (patch.name, other.upstream.evidence)
                checked += 1
            elif release < parse_release(other.first):  # and not before its range
                assert not any(present), (patch.name, other.describe())
        if declared is not None and declared.not_applicable:
            checked += 1  # said so (nothing of it to find in the text)
    assert checked == len(IMPLEMENTED)  # each patch: applies, upstream or not applicable, on every verified release


def test_the_text_path_is_what_the_engine_runs_here():
    # edit_file_texts (diff, the status test) and the engine (patched_source) agree on the installed release.
    read = patching.installed_sglang_reader()
    compared = 0
    for patch in IMPLEMENTED:
        if not patch.candidates(patching.installed_release()):
            continue
        edited = patching.edit_file_texts([patch], read)
        for target in patching.for_release(patch).targets:
            module = target.split(":")[0]
            assert patching.patched_source(target, [patch]) in edited[patching.module_file(module)][1]
            compared += 1
    assert compared >= 3


def _release_env(version: str, **extra) -> dict:
    where = release_wheels.target(version)
    if not (where / "sglang" / "_version.py").is_file():
        _missing(f"the sglang {version} install in {where}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_HIP_DECODE")}
    env.update(PYTHONPATH=os.pathsep.join([str(where), str(ROOT / "test")]), CUDA_VISIBLE_DEVICES="", **extra)
    return env


# What each parity file must do on each release: "ran" (its tests passed) or "skipped" (the patch has
# no edits there, said as a module-level skip).
PARITY = {
    "0.5.12.post1": {"test_nsa_cat_skip.py": "skipped", "test_mxfp4_vbmm_layout.py": "ran",
                     "test_indexer_rope_guard.py": "ran", "test_hip_alt_stream.py": "ran",
                     "test_hip_dual_stream_av4.py": "ran", "test_gates.py": "ran", "test_find_copies.py": "ran",
                     "test_dsv4_sparse_decode_patch.py": "skipped", "test_dsv4_fused_compress_patch.py": "skipped"},
    "0.5.13.post1": {"test_nsa_cat_skip.py": "skipped", "test_mxfp4_vbmm_layout.py": "skipped",
                     "test_indexer_rope_guard.py": "ran", "test_hip_alt_stream.py": "skipped",
                     "test_hip_dual_stream_av4.py": "skipped", "test_gates.py": "ran", "test_find_copies.py": "ran",
                     "test_mla_decode_dsa.py": "ran", "test_dsv4_sparse_decode_patch.py": "ran",
                     "test_dsv4_fused_compress_patch.py": "ran"},
    "0.5.23": {"test_nsa_cat_skip.py": "skipped", "test_mxfp4_vbmm_layout.py": "skipped",
               "test_indexer_rope_guard.py": "ran", "test_hip_alt_stream.py": "skipped",
               "test_hip_dual_stream_av4.py": "skipped", "test_gates.py": "ran", "test_find_copies.py": "ran",
               "test_mla_decode_dsa.py": "ran", "test_dsv4_sparse_decode_patch.py": "ran",
               "test_dsv4_fused_compress_patch.py": "ran"},
}


def test_the_parity_releases_are_the_ones_installed():
    assert tuple(PARITY) == release_wheels.PARITY


@pytest.mark.parametrize("version", list(PARITY))
def test_parity_suites_on_the_release(version, tmp_path):
    env = _release_env(version)
    seen = subprocess.run([sys.executable, "-c", "from sglang_hip_decode import gates; "
                           "print(gates.sglang_version(), gates.sglang_package_version())"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert seen.stdout.split() == [version, version], seen.stderr  # this process sees that release only
    report = tmp_path / "junit.xml"
    files = [str(ROOT / "test" / name) for name in PARITY[version]]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           f"--junitxml={report}", *files], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    outcome: dict[str, dict[str, int]] = {}
    reasons: dict[str, list[str]] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        # a test: classname "test.test_x", name "test_y"; a skipped module: classname "", name "test.test_x"
        name = (case.get("classname") or case.get("name")).rsplit(".", 1)[-1] + ".py"
        skipped = case.find("skipped")
        outcome.setdefault(name, {"passed": 0, "skipped": 0})["skipped" if skipped is not None else "passed"] += 1
        if skipped is not None:
            reasons.setdefault(name, []).append(skipped.text or skipped.get("message", ""))
    assert set(outcome) == set(PARITY[version]), outcome
    for name, expected in PARITY[version].items():
        counts = outcome[name]
        if expected == "ran":
            assert counts["passed"] >= 3, (version, name, counts)
        else:  # the whole module, for the reason the declaration gives
            assert counts == {"passed": 0, "skipped": 1}, (version, name, counts)
            assert f"has no edits on sglang {version}: " in reasons[name][0], reasons[name]


@pytest.mark.parametrize("version, expected", [
    ("0.5.12.post1", {"nsa-cat-skip": "upstream: sglang 0.5.12.post1 has this (sglang#24125, since 0.5.12)",
                      "mxfp4-vbmm-layout": "applied", "indexer-rope-guard": "applied",
                      "hip-alt-stream": "off (opt-in; add it to SGLANG_HIP_DECODE_PATCHES)",
                      "dsv4-sparse-decode": "not applicable: no DeepSeek-V4 before 0.5.13",
                      "dsv4-fused-compress": "not applicable: no DeepSeek-V4 before 0.5.13"}),
    ("0.5.13.post1", {"nsa-cat-skip": "upstream: sglang 0.5.13.post1 has this (sglang#24125, since 0.5.12)",
                      "mxfp4-vbmm-layout": "upstream: sglang 0.5.13.post1 has this (sglang#25463, since 0.5.13)",
                      "indexer-rope-guard": "applied"}),
    ("0.5.23", {"nsa-cat-skip": "upstream: sglang 0.5.23 has this (sglang#24125, since 0.5.12)",
                "mxfp4-vbmm-layout": "upstream: sglang 0.5.23 has this (sglang#25463, since 0.5.13)",
                "indexer-rope-guard": "applied",
                # opt-in and not selected, yet what the release has is said rather than "off (opt-in)"
                "hip-alt-stream": "upstream: sglang 0.5.23 has this (the dual-stream `not _use_aiter` guard; "
                                  "SGLANG_ROCM_USE_MULTI_STREAM=1 for the stream, since 0.5.13)",
                "hip-dual-stream-av4": "not applicable: not ported past 0.5.12.post1 (from 0.5.18 ROCm decodes in "
                                       "forward_mla_rocm.py)",
                "dsv4-sparse-decode": "off (opt-in; add it to SGLANG_HIP_DECODE_PATCHES)",
                "dsv4-fused-compress": "off (opt-in; add it to SGLANG_HIP_DECODE_PATCHES)"}),
])
def test_status_on_the_release(version, expected):
    # The console script, the platform forced: what a user on that release sees.
    env = _release_env(version, SGLANG_HIP_DECODE_ANY_PLATFORM="1")
    script = Path(sys.executable).with_name("sglang-hip-decode")
    table = subprocess.run([str(script), "status"], env=env, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stdout + table.stderr
    assert f"sglang {version} (verified 0.5.11 ... 0.5.23)" in table.stdout
    proc = subprocess.run([str(script), "status", "--json"], env=env, capture_output=True, text=True, timeout=300)
    data = json.loads(proc.stdout)
    assert data["sglang"] == version and data["exit_code"] == 0
    assert {name: data["patches"][name] for name in expected} == expected
    for name, status in expected.items():  # the table row says the same
        row = next(line for line in table.stdout.splitlines() if line.startswith(name + " "))
        assert row.rstrip().endswith(status), row


def test_releases_table_in_the_readme_is_the_commands_output(capsys):
    from sglang_hip_decode import cli

    assert cli.main(["releases", "--markdown"]) == 0
    table = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- releases: sglang-hip-decode releases --markdown -->\n", "<!-- /releases -->"
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0] == table
    assert table.count("\n") == 2 + 3 + 1  # header, rule, three groups of releases, newer ones


def _extract(wheel_path: Path, names, tree: Path) -> None:
    import zipfile

    with zipfile.ZipFile(wheel_path) as wheel:
        for name in names:
            (tree / "python" / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / "python" / name).write_bytes(wheel.read(name))


@pytest.mark.parametrize("version, files, left_out", [
    ("0.5.12.post1", ["sglang/srt/layers/attention/nsa/nsa_indexer.py",
                      "sglang/srt/models/deepseek_common/attention_forward_methods/forward_mla.py",
                      "sglang/srt/models/deepseek_v2.py"], ["nsa-cat-skip"]),
    ("0.5.23", ["sglang/srt/layers/attention/dsa/dsa_indexer.py", "sglang/srt/layers/attention/deepseek_v4_backend_hip_radix.py",
                "sglang/srt/layers/attention/dsv4/compressor_v2.py"],
     ["nsa-cat-skip", "mxfp4-vbmm-layout", "hip-alt-stream"]),
])
def test_diff_of_a_release_from_its_wheel_applies_to_its_tree(version, files, left_out, tmp_path, capsys):
    from sglang_hip_decode import cli

    read_release(version)
    wheel_path = release_wheels.wheel(version)
    code = cli.main(["diff", "--source", str(wheel_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(line[len("--- a/python/"):] for line in out.splitlines() if line.startswith("--- a/")) == sorted(files)
    for name in left_out:  # said, not silently dropped
        assert f"sglang-hip-decode: {name}: no edits on sglang {version}: upstream has it (" in err
    _extract(wheel_path, files, tmp_path)
    check = subprocess.run(["git", "apply", "--check", "-"], cwd=tmp_path, input=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # --release naming the source's own release: the same text
    assert cli.main(["diff", "--source", str(wheel_path), "--release", version]) == 0
    assert capsys.readouterr().out == out


def test_diff_refuses_a_release_it_cannot_show(capsys, tmp_path):
    from sglang_hip_decode import cli

    def refused(*args):
        with pytest.raises(SystemExit) as exc:
            cli.main(["diff", *args])
        return str(exc.value.code)

    assert refused("--release", "banana") == "sglang-hip-decode: --release 'banana' is not a release string (e.g. 0.5.12.post1)"
    assert refused("--release", "0.5.23").startswith("sglang-hip-decode: sglang 0.5.11 is installed; for 0.5.23 give --source")
    missing = tmp_path / "nothing-here"
    assert refused("--source", str(missing)).startswith(f"sglang-hip-decode: --source {missing}:")
    (tmp_path / "sglang").mkdir()  # a folder with a package but no _version.py
    assert "does not say its release" in refused("--source", str(tmp_path))
    read_release("0.5.13")
    wheel_path = str(release_wheels.wheel("0.5.13"))
    assert refused("--source", wheel_path, "--release", "0.5.12") == (
        f"sglang-hip-decode: --source {wheel_path} is sglang 0.5.13, not 0.5.12")
    # a release on which no patch has edits: exit 1, each one said
    (tmp_path / "sglang" / "_version.py").write_text("__version__ = version = '0.5.10'\n")
    assert cli.main(["diff", "--source", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("declares nothing for it") == len(IMPLEMENTED) and "no patch has edits to diff" in err


def test_releases_command_table(capsys):
    from sglang_hip_decode import cli

    assert cli.main(["releases"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["release"] + [p.name for p in IMPLEMENTED]
    rows = {line.split("  ")[0].strip(): line for line in lines[2:]}
    assert list(rows) == ["0.5.11", "0.5.12, 0.5.12.post1", "0.5.13 ... 0.5.23", "newer than 0.5.23"]
    assert rows["0.5.11"].count("applies:") == len(IMPLEMENTED) - 3  # all but the three DeepSeek-V4 patches
    assert "not applicable (no DeepSeek-V4 before 0.5.13)" in rows["0.5.11"]
    assert "tried (anchors decide): `dsa_indexer`" in rows["newer than 0.5.23"]


def test_the_ab_runner_on_a_dsa_release(files, tmp_path):
    # The GLM-5 preset on 0.5.23 against the stand-in server (which calls the real plugin, now on
    # 0.5.23): --dsa-* flags, the server's dsa_* fields checked, only the guard measured and applied
    # in every process, the release in the report.
    from runner_helpers import free_port, processes_on_port, run_runner, runner_args

    env = _release_env("0.5.23", SGLANG_HIP_DECODE_ANY_PLATFORM="1")
    port = free_port()
    out = tmp_path / "ab"
    proc = run_runner(runner_args(files, out, port, threshold=0.9) + ["--preset", "glm5", "--tp", "1"],
                      {"PYTHONPATH": env["PYTHONPATH"], "SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["sglang_release"] == "0.5.23" and results["versions"]["sglang"] == "0.5.23"
    assert results["patches_measured"] == ["indexer-rope-guard"]
    assert results["server_args"] == ("--trust-remote-code --attention-backend dsa --dsa-decode-backend tilelang "
                                      "--dsa-prefill-backend tilelang")
    on = results["arms"]["on"]
    assert on["server"]["dsa_decode_backend"] == "tilelang" and on["server"]["version"] == "0.5.23"
    assert on["applied"] == ["indexer-rope-guard"] and on["processes"] == 2
    for record in on["status"]:
        assert record["sglang"] == "0.5.23"
        assert record["patches"]["nsa-cat-skip"] == "upstream: sglang 0.5.23 has this (sglang#24125, since 0.5.12)"
    assert "; sglang 0.5.23" in (out / "report.md").read_text()
    assert processes_on_port(port) == []


def test_diff_of_a_release_between_ranges_shows_what_the_engine_applies(tmp_path, capsys):
    # A folder that says 0.5.11.post1 (no such release) over 0.5.11's files: nsa-cat-skip's 0.5.11
    # edits match (the range after it says upstream), as patching.apply picks them.
    from sglang_hip_decode import cli
    from sglang_hip_decode.patches import nsa_cat_skip

    read_release("0.5.11")
    wheel_path = release_wheels.wheel("0.5.11")
    import zipfile

    with zipfile.ZipFile(wheel_path) as wheel:
        names = [n for n in wheel.namelist() if n.startswith("sglang/srt/") and n.endswith(".py")]
        wheel.extractall(tmp_path, names)
    (tmp_path / "sglang" / "_version.py").write_text("__version__ = version = '0.5.11.post1'\n")
    assert cli.main(["diff", "--source", str(tmp_path), "nsa-cat-skip"]) == 0
    out = capsys.readouterr().out
    assert "+++ b/python/sglang/srt/layers/attention/nsa_backend.py" in out
    read = patching.source_reader(str(tmp_path))
    assert patching.edit_file_texts([nsa_cat_skip.PATCH], read, parse_release("0.5.11.post1")) == \
        patching.edit_file_texts([nsa_cat_skip.PATCH], read, parse_release("0.5.11"))


def test_method_span_is_the_definition_python_binds(tmp_path):
    # The last definition of a name; a class or method under if/try still counts (the engine edits the
    # live function, which is that one).
    import importlib.util
    import inspect

    src = ("class A:\n    def f(self):\n        return 1\n\n    def f(self):\n        return 2\n"
           "if True:\n    class B:\n        try:\n            @staticmethod\n            def h():\n                return 3\n"
           "        except Exception:\n            pass\n")
    (tmp_path / "span_mod.py").write_text(src)
    spec = importlib.util.spec_from_file_location("span_mod", tmp_path / "span_mod.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for cls, name in (("A", "f"), ("B", "h")):
        lines, first = inspect.getsourcelines(inspect.unwrap(getattr(getattr(module, cls), name)))
        assert patching.method_span(src, [cls, name]) == (first - 1, first - 1 + len(lines))
    with pytest.raises(patching.PatchError, match="class C not found"):
        patching.method_span(src, ["C", "f"])
    with pytest.raises(patching.PatchError, match="A.g not defined"):
        patching.method_span(src, ["A", "g"])

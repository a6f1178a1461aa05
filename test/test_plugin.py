"""register() and the switches: statuses, precedence, never raising, and SGLang's own loader.

The decisions run against a stand-in catalog of test-only patches on real sglang methods
(patch_fixtures.py); the real patch set is checked for its planned names.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sglang_hip_decode
from sglang_hip_decode import evaluate, gates, patching
from sglang_hip_decode import patches as patch_set

from patch_fixtures import DOUBLE_EPS, GROW_HIDDEN, MISSING, RMSNORM, STAND_IN_PATCHES

FORCE = "off (not HIP; set SGLANG_HIP_DECODE_ANY_PLATFORM=1 to force)"
HERE = Path(__file__).resolve().parent


def statuses(report):
    return {p.name: p.status for p in report.patches}


def test_real_catalog_reports_every_planned_patch():
    report = evaluate({}, apply=False)
    assert [(p.name, p.default) for p in report.patches] == [(name, default) for name, _, default in patch_set.PLANNED]
    statuses = [report.status_of(e.name) for e in patch_set.catalog() if e.patch is None]
    assert statuses == ["not implemented"] * len(statuses)


def test_not_hip_applies_nothing_by_default(stand_in):
    original = patching.resolve_target(RMSNORM)[2]
    report = evaluate({})
    assert statuses(report) == {
        "t-on": FORCE,
        "t-opt": "off (opt-in; add it to SGLANG_HIP_DECODE_PATCHES)",
        "t-broken": FORCE,
        "t-planned": "not implemented",
    }
    assert patching.resolve_target(RMSNORM)[2] is original
    assert report.applied == ()


def test_any_platform_applies_the_default_set_and_a_failure_stays_a_status(stand_in):
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert statuses(report) == {
        "t-on": "applied",
        "t-opt": "off (opt-in; add it to SGLANG_HIP_DECODE_PATCHES)",
        "t-broken": "failed: hunk 1 of sglang.srt.layers.attention.nsa.nsa_indexer:Indexer._update_rope_guarded "
        "did not match (upstream changed)",
        "t-planned": "not implemented",
    }
    from sglang.srt.layers.layernorm import RMSNorm

    assert RMSNorm(4).variance_epsilon == 2e-6


def test_hip_platform_needs_no_force(stand_in, monkeypatch):
    monkeypatch.setattr(gates, "platform", lambda: "hip")
    assert evaluate({}).status_of("t-on") == "applied"


@pytest.mark.parametrize(
    "patches, expect_on, expect_opt",
    [
        ("all", "applied", "applied"),
        ("none", "off (SGLANG_HIP_DECODE_PATCHES=none)", "off (SGLANG_HIP_DECODE_PATCHES=none)"),
        ("t-opt", "off (not in SGLANG_HIP_DECODE_PATCHES)", "applied"),
        (" t-opt , t-on ", "applied", "applied"),
        ("default", "applied", "off (opt-in; add it to SGLANG_HIP_DECODE_PATCHES)"),
    ],
)
def test_patch_selection(stand_in, patches, expect_on, expect_opt):
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": patches})
    assert (report.status_of("t-on"), report.status_of("t-opt")) == (expect_on, expect_opt)
    assert report.problems == ()


def test_unknown_patch_name_is_reported_not_raised(stand_in):
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "t-on,t-typo"})
    assert report.status_of("t-on") == "applied"
    assert report.status_of("t-opt") == "off (not in SGLANG_HIP_DECODE_PATCHES)"
    assert len(report.problems) == 1 and "unknown patch 't-typo'" in report.problems[0]
    assert "t-on" in report.problems[0]  # the message lists the known names


NOT_A_SWITCH = "is not a switch value (on: 1/true/yes/on; off: 0/false/no/off; any case)"


@pytest.mark.parametrize(
    "value, status, problem",
    [
        ("0", "off (SGLANG_HIP_DECODE=0)", None),
        ("off", "off (SGLANG_HIP_DECODE=off)", None),
        ("maybe", f"off (SGLANG_HIP_DECODE='maybe' {NOT_A_SWITCH})",
         f"SGLANG_HIP_DECODE='maybe' {NOT_A_SWITCH}; applying nothing"),
    ],
)
def test_kill_switch(stand_in, value, status, problem):
    report = evaluate({"SGLANG_HIP_DECODE": value, "SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "all"})
    assert report.status_of("t-on") == status
    assert report.status_of("t-opt") == status
    assert report.status_of("t-planned") == "not implemented"
    assert report.applied == ()
    assert report.problems == ((problem,) if problem else ())


def test_malformed_any_platform_is_explained_and_not_forced(stand_in):
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "yes please"})
    assert report.status_of("t-on") == FORCE
    assert report.problems == (f"SGLANG_HIP_DECODE_ANY_PLATFORM='yes please' {NOT_A_SWITCH}; HIP-gated patches stay HIP-only",)


@pytest.mark.parametrize("version, status", [
    ("0.5.10.post1", "unsupported sglang 0.5.10.post1 (releases 0.5.11 and later: older ones load no plugins)"),
    ("0.5.11rc1", "unsupported sglang 0.5.11rc1 (releases 0.5.11 and later: older ones load no plugins)"),
    ("0.5", "unsupported sglang '0.5' (not a release string this plugin can read)"),
    ("main-abc123", "unsupported sglang 'main-abc123' (not a release string this plugin can read)"),
    (None, "unsupported sglang (not installed)"),
])
def test_unsupported_sglang_applies_nothing(stand_in, monkeypatch, version, status):
    monkeypatch.setattr(gates, "sglang_version", lambda: version)
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "all"})
    for name in ("t-on", "t-opt", "t-broken"):
        assert report.status_of(name) == status
    assert report.applied == () and not any(patching.is_applied(p) for p in STAND_IN_PATCHES)


def test_two_sglang_installations_apply_nothing(stand_in, monkeypatch):
    # The metadata (importlib.metadata) names one release, the importable package another: which
    # code runs is unknown, so nothing is applied and the status says why.
    monkeypatch.setattr(gates, "sglang_version", lambda: "0.5.23")
    assert gates.sglang_package_version() == "0.5.11"  # the importable package's _version.py
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "all"})
    expected = ("failed: two sglang installations are visible (metadata says 0.5.23, the importable package's "
                "_version.py says 0.5.11): applying nothing")
    assert all(report.status_of(n) == expected for n in ("t-on", "t-opt", "t-broken"))
    assert report.applied == () and report.exit_code == 1


def _release_catalog(monkeypatch, version, *patches):
    """sglang ``version`` as metadata and package both say, and a catalogue of ``patches``."""
    monkeypatch.setattr(gates, "sglang_version", lambda: version)
    monkeypatch.setattr(gates, "sglang_package_version", lambda: version)
    monkeypatch.setattr(patch_set, "catalog", lambda: [patch_set.Entry(p.name, p.name, True, p) for p in patches])
    monkeypatch.setattr(patch_set, "NAMES", tuple(p.name for p in patches))
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "all"})
    for p in patches:
        patching.unapply(p)
    return report


def _per_release(name, *releases):
    return patching.Patch(name=name, summary="test-only", gate="hip", releases=tuple(releases))


UPSTREAM = patching.Upstream("0.5.13", "sglang#1")


@pytest.mark.parametrize("version, status", [
    ("0.5.11", "applied"),
    ("0.5.12.post1", "applied"),
    ("0.5.13", "upstream: sglang 0.5.13 has this (sglang#1, since 0.5.13)"),
    ("0.5.23+rocm700", "upstream: sglang 0.5.23+rocm700 has this (sglang#1, since 0.5.13)"),
])
def test_a_patch_does_what_it_declares_for_the_release(monkeypatch, version, status):
    patch = _per_release("t-rel", patching.Releases("0.5.11", "0.5.12.post1", edits=(DOUBLE_EPS,)),
                         patching.Releases("0.5.13", None, upstream=UPSTREAM))
    report = _release_catalog(monkeypatch, version, patch)
    assert report.status_of("t-rel") == status
    assert report.applied == (("t-rel",) if status == "applied" else ())
    assert report.exit_code == 0
    row = report.patches[0]
    assert row.targets == ((RMSNORM,) if status == "applied" else ())


def test_a_release_newer_than_the_newest_verified_is_tried_with_the_newest_edits(monkeypatch):
    newest = _per_release("t-new", patching.Releases("0.5.11", "0.5.12", not_applicable="test-only"),
                          patching.Releases("0.5.13", None, edits=(DOUBLE_EPS,)))
    report = _release_catalog(monkeypatch, "0.6.0", newest)
    assert report.status_of("t-new") == "applied (verified up to 0.5.23)" and report.applied == ("t-new",)
    # the anchors decide: a newer release whose text differs fails, and nothing is left applied
    broken = _per_release("t-new", patching.Releases("0.5.13", None, edits=(DOUBLE_EPS, MISSING)))
    report = _release_catalog(monkeypatch, "0.6.0", broken)
    assert report.status_of("t-new").startswith("failed: hunk 1 of ") and report.applied == ()
    assert report.exit_code == 1
    assert patching.resolve_target(RMSNORM)[2] is patching.original(RMSNORM)


def test_a_release_between_two_ranges_tries_both_and_applies_all_or_nothing(monkeypatch):
    # 0.5.12.post2 (no such release) lies between 0.5.11..0.5.12.post1 and 0.5.13+.
    first_fails = _per_release("t-gap", patching.Releases("0.5.11", "0.5.12.post1", edits=(MISSING,)),
                               patching.Releases("0.5.13", None, edits=(GROW_HIDDEN,)))
    report = _release_catalog(monkeypatch, "0.5.12.post2", first_fails)
    assert report.status_of("t-gap") == ("applied (sglang 0.5.12.post2 lies between the declared ranges; "
                                         "the edits for 0.5.13+ matched)")
    assert report.applied == ("t-gap",) and report.exit_code == 0
    assert report.patches[0].targets == (MISSING.target, RMSNORM)  # both candidates' targets
    # neither matches (the second one half: its first edit would apply): failed, and nothing applied
    neither = _per_release("t-gap", patching.Releases("0.5.11", "0.5.12.post1", edits=(MISSING,)),
                           patching.Releases("0.5.13", None, edits=(DOUBLE_EPS, MISSING)))
    report = _release_catalog(monkeypatch, "0.5.12.post2", neither)
    status = report.status_of("t-gap")
    assert status.startswith("failed: sglang 0.5.12.post2 lies between t-gap's declared ranges and matches neither: "
                             "the edits for 0.5.11..0.5.12.post1: hunk 1 of "), status
    assert "; the edits for 0.5.13+: hunk 1 of " in status
    assert report.applied == () and report.exit_code == 1
    assert patching.resolve_target(RMSNORM)[2] is patching.original(RMSNORM)
    # between an edit range and an upstream one: only the edits are tried
    upstream_after = _per_release("t-gap", patching.Releases("0.5.11", "0.5.12.post1", edits=(DOUBLE_EPS,)),
                                  patching.Releases("0.5.13", None, upstream=UPSTREAM))
    report = _release_catalog(monkeypatch, "0.5.12.post2", upstream_after)
    assert report.status_of("t-gap").startswith("applied (sglang 0.5.12.post2 lies between")
    # no neighbour with edits: said, nothing tried, not a fault
    nothing = _per_release("t-gap", patching.Releases("0.5.11", "0.5.12", not_applicable="test-only"),
                           patching.Releases("0.5.13", None, upstream=UPSTREAM))
    report = _release_catalog(monkeypatch, "0.5.12.post2", nothing)
    assert report.status_of("t-gap") == ("not applicable: t-gap declares nothing for sglang 0.5.12.post2 "
                                         "(its ranges: 0.5.11..0.5.12, 0.5.13+)")
    assert report.exit_code == 0


def test_between_two_upstream_ranges_is_upstream_and_after_a_closed_last_range_is_nothing(monkeypatch):
    both_upstream = _per_release("t-up", patching.Releases("0.5.12", "0.5.17", upstream=UPSTREAM),
                                 patching.Releases("0.5.18", None, upstream=patching.Upstream("0.5.13", "sglang#2")))
    report = _release_catalog(monkeypatch, "0.5.17.post1", both_upstream)
    assert report.status_of("t-up") == "upstream: sglang 0.5.17.post1 has this (sglang#1, since 0.5.13)"
    closed = _per_release("t-closed", patching.Releases("0.5.11", "0.5.23", edits=(DOUBLE_EPS,)))
    assert closed.candidates(patching.parse_release("0.5.24")) == ()  # not tried: beyond what it declares
    report = _release_catalog(monkeypatch, "0.5.24", closed)
    assert report.status_of("t-closed") == ("not applicable: t-closed declares nothing for sglang 0.5.24 "
                                            "(its ranges: 0.5.11..0.5.23)")
    assert report.applied == () and report.exit_code == 0


@pytest.mark.parametrize("package, status", [
    ("0.5.12-post1", "applied"),  # the same release, spelled otherwise
    ("0.0.0+unknown", "applied"),  # a _version.py that says nothing usable: no second opinion
    ("0.5.12", "failed: two sglang installations are visible (metadata says 0.5.12.post1, the importable package's "
               "_version.py says 0.5.12): applying nothing"),
])
def test_two_installations_only_when_both_versions_are_releases_and_differ(stand_in, monkeypatch, package, status):
    monkeypatch.setattr(gates, "sglang_version", lambda: "0.5.12.post1")
    monkeypatch.setattr(gates, "sglang_package_version", lambda: package)
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "t-on"})
    assert report.status_of("t-on") == status


def test_metadata_without_an_importable_package_applies_nothing(stand_in, monkeypatch):
    monkeypatch.setattr(gates, "sglang_version", lambda: "0.5.23")
    monkeypatch.setattr(gates, "sglang_importable", lambda: False)
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "all"})
    expected = "unsupported sglang 0.5.23 (its metadata is installed, the sglang package is not importable)"
    assert all(report.status_of(n) == expected for n in ("t-on", "t-opt", "t-broken")) and report.applied == ()


def test_release_declarations_refuse_bad_input():
    R = patching.Releases
    with pytest.raises(ValueError, match="exactly one of"):
        R("0.5.11", edits=(DOUBLE_EPS,), upstream=UPSTREAM)
    with pytest.raises(ValueError, match="exactly one of"):
        R("0.5.11")
    with pytest.raises(ValueError, match="not release strings"):
        R("0.5.x", edits=(DOUBLE_EPS,))
    with pytest.raises(ValueError, match="the range is empty"):
        R("0.5.13", "0.5.12", edits=(DOUBLE_EPS,))
    with pytest.raises(ValueError, match="in order and not overlap"):
        _per_release("t", R("0.5.11", "0.5.13", edits=(DOUBLE_EPS,)), R("0.5.13", None, upstream=UPSTREAM))
    with pytest.raises(ValueError, match="in order and not overlap"):
        _per_release("t", R("0.5.11", None, edits=(DOUBLE_EPS,)), R("0.5.13", None, upstream=UPSTREAM))
    with pytest.raises(ValueError, match="not both, not neither"):
        patching.Patch(name="t", summary="", edits=(DOUBLE_EPS,), releases=(R("0.5.11", edits=(DOUBLE_EPS,)),))
    with pytest.raises(ValueError, match="a target appears twice"):
        R("0.5.11", edits=(DOUBLE_EPS, GROW_HIDDEN))


def test_release_strings_parse_in_pep440_order():
    P = patching.parse_release
    assert P("0.5.11+rocm700") == P("0.5.11") == P("v0.5.11") == (0, 5, 11, 0)
    assert P("0.5.12.post1") == P("0.5.12-post1") == P("0.5.12post1") == P("0.5.12.POST1")
    order = ["0.5.10.post1", "0.5.11.dev3", "0.5.11rc1", "0.5.11", "0.5.11.post0", "0.5.11.post1", "0.5.12.post1.dev2",
             "0.5.12.post1", "0.5.12.post2.dev3", "0.5.12.post2", "0.5.13", "0.6.0"]
    assert [P(v) for v in order][:2] == [P("0.5.10.post1"), (0, 5, 11, -1)]
    assert all(P(a) < P(b) for a, b in zip(order[2:], order[3:])), [P(v) for v in order]
    assert P("0.5.11.dev3") == P("0.5.11rc1") == P("0.5.11.rc1")  # one place: before the release
    assert [P(v) for v in ("0.5", "x", "", None, "0.5.11.post", "0.5.11.1", "0.5.11 rc1")] == [None] * 7
    shown = {v: patching.format_release(P(v)) for v in ("0.5.12.post1", "0.5.23", "0.5.13rc1", "0.5.12.post2.dev3")}
    assert shown == {"0.5.12.post1": "0.5.12.post1", "0.5.23": "0.5.23", "0.5.13rc1": "0.5.13 (pre-release or dev build)",
                     "0.5.12.post2.dev3": "0.5.12.post2 (dev build)"}


def test_an_unexpected_exception_in_one_patch_does_not_stop_the_others(stand_in, monkeypatch):
    real_apply = patching.apply

    def apply(patch, release=None):
        if patch.name == "t-on":
            raise MemoryError("simulated")
        return real_apply(patch, release)

    monkeypatch.setattr(patching, "apply", apply)
    report = evaluate({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "all"})
    assert report.status_of("t-on") == "failed: MemoryError: simulated"
    assert report.status_of("t-opt") == "applied"


def test_register_never_raises_and_logs_one_line_per_patch(stand_in, monkeypatch, caplog, tmp_path):
    status_file = tmp_path / "status.jsonl"
    monkeypatch.setenv("SGLANG_HIP_DECODE_ANY_PLATFORM", "1")
    monkeypatch.setenv("SGLANG_HIP_DECODE_STATUS_FILE", str(status_file))
    with caplog.at_level(logging.INFO, logger="sglang_hip_decode"):
        report = sglang_hip_decode.register()
        sglang_hip_decode.register()  # every process may call it more than once
    assert report.status_of("t-on") == "applied"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sglang-hip-decode: t-")]
    assert lines[:4] == [
        "sglang-hip-decode: t-on: applied",
        "sglang-hip-decode: t-opt: off (opt-in; add it to SGLANG_HIP_DECODE_PATCHES)",
        lines[2],
        "sglang-hip-decode: t-planned: not implemented",
    ]
    assert lines[2].startswith("sglang-hip-decode: t-broken: failed: hunk 1")
    records = [json.loads(line) for line in status_file.read_text().splitlines()]
    assert len(records) == 2 and records[0]["patches"] == records[1]["patches"]
    assert records[0]["applied"] == ["t-on"] and records[0]["pid"] == os.getpid()

    def boom(*a, **k):
        raise RuntimeError("evaluate exploded")

    monkeypatch.setattr(sglang_hip_decode, "evaluate", boom)
    with caplog.at_level(logging.WARNING, logger="sglang_hip_decode"):
        report = sglang_hip_decode.register()
    # Still a report, and still a status line, so a runner sees why nothing applied.
    assert report.patches == () and report.applied == ()
    assert report.problems == ("register() failed: RuntimeError: evaluate exploded",)
    assert any("register() failed: RuntimeError: evaluate exploded" in r.getMessage() for r in caplog.records)
    records = [json.loads(line) for line in status_file.read_text().splitlines()]
    assert len(records) == 3 and records[2]["problems"] == ["register() failed: RuntimeError: evaluate exploded"]


def test_unwritable_status_file_is_a_warning(stand_in, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("SGLANG_HIP_DECODE_STATUS_FILE", str(tmp_path / "no" / "such" / "dir" / "s.jsonl"))
    with caplog.at_level(logging.WARNING, logger="sglang_hip_decode"):
        assert sglang_hip_decode.register() is not None
    assert any("cannot write status file" in r.getMessage() for r in caplog.records)


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "hip_decode"]
    assert len(eps) == 1 and eps[0].value == "sglang_hip_decode:register"
    assert eps[0].load() is sglang_hip_decode.register


def run_load_plugins(tmp_path, env_extra):
    """Start a fresh Python that calls SGLang's own load_plugins(), as a server process does."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import patch_fixtures
        patch_fixtures.install_test_catalog()
        from sglang.srt.plugins import load_plugins
        load_plugins()
        load_plugins()  # SGLang guards repeated calls; the plugin is idempotent anyway
        from sglang.srt.layers.layernorm import RMSNorm
        print("EPS", RMSNorm(4).variance_epsilon)
        """
    )
    status_file = tmp_path / "status.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_HIP_DECODE")}
    env.update(env_extra, SGLANG_HIP_DECODE_STATUS_FILE=str(status_file))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in status_file.read_text().splitlines()]
    return proc, records


def test_sglang_load_plugins_applies_and_reports(tmp_path):
    proc, records = run_load_plugins(tmp_path, {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert "EPS 2e-06" in proc.stdout
    assert len(records) == 1
    assert records[0]["patches"]["t-on"] == "applied"
    assert records[0]["applied"] == ["t-on"]
    assert records[0]["sglang"] == "0.5.11" and records[0]["platform"] == "cpu"
    assert "sglang-hip-decode: t-on: applied" in proc.stderr


def test_sglang_load_plugins_with_kill_switch(tmp_path):
    proc, records = run_load_plugins(tmp_path, {"SGLANG_HIP_DECODE": "0", "SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert "EPS 1e-06" in proc.stdout
    assert records[0]["applied"] == []
    assert records[0]["patches"]["t-on"] == "off (SGLANG_HIP_DECODE=0)"


def test_register_with_broken_sglang_metadata_still_reports(stand_in, monkeypatch, tmp_path):
    # importlib.metadata raising something other than PackageNotFoundError (a broken dist-info).
    from importlib import metadata

    def broken(name):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(metadata, "version", broken)
    status_file = tmp_path / "status.jsonl"
    monkeypatch.setenv("SGLANG_HIP_DECODE_STATUS_FILE", str(status_file))
    monkeypatch.setenv("SGLANG_HIP_DECODE_ANY_PLATFORM", "1")
    report = sglang_hip_decode.register()
    assert report is not None and report.sglang is None and report.applied == ()
    assert report.status_of("t-on") == "unsupported sglang (version unreadable)"
    assert any(p.startswith("cannot read sglang's version: UnicodeDecodeError") for p in report.problems)
    record = json.loads(status_file.read_text())
    assert record["applied"] == [] and record["patches"]["t-on"].startswith("unsupported sglang (version unreadable)")


STATUS_FILE_SCRIPT = """
import sys, time
sys.path.insert(0, {here!r})
import patch_fixtures
patch_fixtures.install_test_catalog()
import sglang_hip_decode
start = time.monotonic()
report = sglang_hip_decode.register()
print("SECONDS", time.monotonic() - start, "PATCHES", len(report.patches), "APPLIED", ",".join(report.applied))
"""


def run_register_with_status_file(path, timeout=60, force=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_HIP_DECODE")}
    env.update(SGLANG_HIP_DECODE_STATUS_FILE=str(path))
    if force:  # the stand-in patch really applies (imports sglang); else nothing does, a fast start
        env.update(SGLANG_HIP_DECODE_ANY_PLATFORM="1")
    # A subprocess with a timeout: a register() that blocks fails this test instead of hanging the suite.
    return subprocess.run([sys.executable, "-c", STATUS_FILE_SCRIPT.format(here=str(HERE))], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_status_file_that_is_a_fifo_never_blocks(tmp_path):
    fifo = tmp_path / "status.fifo"
    os.mkfifo(fifo)
    proc = run_register_with_status_file(fifo, force=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PATCHES 4 APPLIED t-on" in proc.stdout  # the patches still apply; only the status line is skipped
    assert float(proc.stdout.split()[1]) < 30
    assert f"cannot write status file {fifo}" in proc.stderr
    # With a reader on the other end the open succeeds, but a FIFO is still not a status file.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        proc = run_register_with_status_file(fifo)
        assert proc.returncode == 0 and "not a regular file" in proc.stderr, proc.stderr[-2000:]
        assert os.read(reader, 4096) == b""  # the writer has gone and wrote nothing into it
    finally:
        os.close(reader)


def test_status_file_that_is_a_directory_is_a_warning(tmp_path):
    proc = run_register_with_status_file(tmp_path)
    assert proc.returncode == 0 and "PATCHES 4" in proc.stdout
    assert f"cannot write status file {tmp_path}" in proc.stderr


@pytest.mark.parametrize(
    "env, code",
    [
        ({}, 0),  # off the platform: not a fault
        ({"SGLANG_HIP_DECODE": "0"}, 0),
        ({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1", "SGLANG_HIP_DECODE_PATCHES": "t-on"}, 0),
        ({"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"}, 1),  # t-broken is selected by default and fails
        ({"SGLANG_HIP_DECODE_PATCHES": "t-on,t-typo"}, 2),  # unknown name
        ({"SGLANG_HIP_DECODE_PATCHES": "t-planned"}, 2),  # asked for by name, not implemented
        ({"SGLANG_HIP_DECODE": "maybe"}, 2),  # malformed switch
    ],
)
def test_report_exit_code(stand_in, env, code):
    report = evaluate(env)  # really applied: a failure shows only then
    assert report.exit_code == code, (report.patches, report.problems)


@pytest.mark.parametrize("version", ["0.5.10", "0.5", None])
def test_unsupported_sglang_is_a_fault_for_the_exit_code(stand_in, monkeypatch, version):
    monkeypatch.setattr(gates, "sglang_version", lambda: version)
    assert evaluate({}, apply=False).exit_code == 1
    assert evaluate({"SGLANG_HIP_DECODE_PATCHES": "none"}, apply=False).exit_code == 0  # nothing selected

"""The runner's decode profile (sglang_hip_decode.profiling) against the stand-in server process:
the trace it returns, a server without /start_profile, a server that dies during the load, and the
report section when a profile is missing."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from sglang_hip_decode import tracediff, validate
from sglang_hip_decode.profiling import ProfileError, decode_profile

from runner_helpers import HERE, free_port


def start_standin(tmp_path, *extra):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "standin_server.py"), "--model-path", str(tmp_path),
                             "--port", str(port), "--skip-plugin", "--attention-backend", "nsa", "--tp-size", "2",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the stand-in server did not come up")


@pytest.fixture
def standin(tmp_path, request):
    proc, url = start_standin(tmp_path, *getattr(request, "param", ()))
    yield proc, url
    proc.kill()
    proc.wait()


PROFILE = dict(num_steps=3, concurrency=3, input_len=8, output_len=4, prefix="on", timeout=60, poll=0.05)


def test_profile_returns_rank0_trace_of_decode_at_the_concurrency(standin, tmp_path):
    _, url = standin
    (tmp_path / "prof").mkdir()
    stale = tmp_path / "prof" / "old-TP-0.trace.json.gz"
    stale.write_text("an earlier run's")
    trace = decode_profile(url, tmp_path / "prof", **PROFILE)
    assert not stale.exists() and trace.name.startswith("on-") and "TP-0" in trace.name
    assert sorted(p.name.split("-TP-")[1] for p in (tmp_path / "prof").iterdir()) == ["0.trace.json.gz",
                                                                                     "1.trace.json.gz"]
    steps = tracediff.read_steps(trace)
    assert [s.label for s in steps.steps] == ["step[DECODE bs=3]"] * 3  # every stream was decoding


@pytest.mark.parametrize("standin", [("--no-profile",)], indirect=True)
def test_a_server_without_the_endpoint_is_a_profile_error(standin, tmp_path):
    _, url = standin
    with pytest.raises(ProfileError, match="/start_profile answered HTTP 404"):
        decode_profile(url, tmp_path / "prof", **PROFILE)


@pytest.mark.parametrize("standin", [("--die-after", "1", "--token-ms", "50")], indirect=True)
def test_a_load_that_ends_early_is_a_profile_error(standin, tmp_path):
    _, url = standin
    with pytest.raises(ProfileError, match="decode-load request ended"):
        decode_profile(url, tmp_path / "prof", **PROFILE)


@pytest.mark.parametrize("standin", [("--profile-writes-nothing",)], indirect=True)
def test_a_profile_that_never_comes_is_stopped(standin, tmp_path):
    _, url = standin
    with pytest.raises(ProfileError, match="no complete rank-0 decode trace .* asked the server to /stop_profile"):
        decode_profile(url, tmp_path / "prof", **dict(PROFILE, timeout=2))
    deadline = time.monotonic() + 5
    while True:  # the server sees a closed stream at its next token
        with urllib.request.urlopen(url + "/standin_state", timeout=5) as resp:
            state = __import__("json").loads(resp.read())
        if state["open_streams"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert state["stop_profile"] == 1 and state["open_streams"] == 0  # stopped, and the streams closed


def test_check_stops_the_wait(standin, tmp_path):
    proc, url = standin

    class Stop(Exception):
        pass

    def check():
        raise Stop

    with pytest.raises(Stop):
        decode_profile(url, tmp_path / "prof", **PROFILE, check=check)
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:  # the server lives on; streams closed
        assert resp.status == 200


def test_report_says_why_there_is_no_kernel_table():
    results = {"arms": {"off": {"profile": {"error": "/start_profile answered HTTP 404: nope"}},
                        "on": {"profile": {"trace": "/x/on-1-TP-0.trace.json.gz"}}}}
    kernels = validate.kernel_table(results)
    assert kernels == {"error": "off: /start_profile answered HTTP 404: nope"}
    assert validate.render_kernels(kernels)[-1] == "No kernel table: off: /start_profile answered HTTP 404: nope"
    results["arms"]["off"] = {}
    assert validate.kernel_table(results) == {"error": "off: not taken"}

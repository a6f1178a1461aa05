"""The A/B runner's statistics (sglang_hip_decode.abstats): per-request TPOT from bench_serving's
details, the Wilson interval against published values, the GSM8K verdicts, the bootstrap on
simulated A/Bs (request noise dominating, launch drift dominating: few differences invented at 0%, a
real one found and covered; no verdict from one launch per arm), and the launch schedule; then the
runner end to end against the stand-in server with a known injected slowdown."""

from __future__ import annotations

import json
import random

import pytest

from sglang_hip_decode import abstats, validate

from runner_helpers import free_port, processes_on_port, run_runner, runner_args


def test_request_tpots_are_bench_servings_definition():
    record = {"itls": [[0.010, 0.012, 0.011], [0.020], [], [0.5]], "output_lens": [4, 2, 1, 0]}
    # (sum of the gaps) / (output tokens - 1); one-token and empty requests have no TPOT
    assert abstats.request_tpots_ms(record) == pytest.approx([11.0, 20.0])
    with pytest.raises(ValueError, match="--output-details"):
        abstats.request_tpots_ms({"median_tpot_ms": 1.0})


@pytest.mark.parametrize("correct, n, lo, hi", [(3, 6, 0.1876, 0.8124), (6, 6, 0.6097, 1.0), (0, 10, 0.0, 0.2775),
                                                (81, 100, 0.7222, 0.8749)])
def test_wilson_interval(correct, n, lo, hi):
    got = abstats.wilson(correct, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_gsm8k_verdicts():
    assert abstats.gsm8k_verdict(0.95, 1319, 0.93)["verdict"] == "pass"  # [0.937, 0.960]
    assert abstats.gsm8k_verdict(0.90, 1319, 0.93)["verdict"] == "fail"  # [0.883, 0.915]
    inconclusive = abstats.gsm8k_verdict(0.925, 1319, 0.93)
    assert inconclusive["verdict"] == "inconclusive" and inconclusive["passes"] is False  # the gate: below fails
    assert abstats.gsm8k_verdict(0.5, 6, None)["verdict"] is None


def _simulated(rng: random.Random, shift: float, launches: int = 2, repeats: int = 2, requests: int = 20,
               drift: float = 0.005, noise: float = 0.02):
    """Two arms of ``launches`` server launches of ``repeats`` runs of ``requests`` TPOTs (ms): a drift
    per launch, a smaller one per repeat, and request noise."""
    def arm(scale):
        out = []
        for _ in range(launches):
            level = 20.0 * scale * (1 + rng.gauss(0, drift))
            out.append([[level * (1 + rng.gauss(0, drift / 4)) * (1 + rng.gauss(0, noise)) for _ in range(requests)]
                        for _ in range(repeats)])
        return out
    return arm(1.0), arm(1.0 + shift)


@pytest.mark.parametrize("drift, noise", [(0.005, 0.02), (0.02, 0.005)], ids=["request-noise", "launch-drift"])
def test_bootstrap_on_simulated_ab_runs(drift, noise):
    rng = random.Random(7)
    null = [abstats.tpot_difference(*_simulated(rng, 0.0, launches=4, drift=drift, noise=noise), draws=300, seed=i)
            for i in range(40)]
    false = sum(r["detected"] for r in null)
    assert false <= 6, false  # 95% intervals: ~2 of 40 expected by chance; 4 launches per arm
    shift = 0.05 if drift < 0.01 else 0.10  # a difference several times the drift
    found = [abstats.tpot_difference(*_simulated(rng, shift, launches=4, drift=drift, noise=noise), draws=300, seed=i)
             for i in range(20)]
    assert sum(r["detected"] and r["verdict"] == "slower with the patches" for r in found) >= 18
    assert sum(r["ci_pct"][0] <= shift * 100 <= r["ci_pct"][1] for r in found) >= 16


def test_one_launch_per_arm_gives_no_verdict():
    rng = random.Random(3)
    result = abstats.tpot_difference(*_simulated(rng, 0.20, launches=1), draws=200)
    assert not result["detected"] and result["verdict"].startswith("no verdict (an arm ran in one server launch")
    assert result["ci_pct"][0] > 0 and result["launches"] == [1, 1]  # the interval is still reported


def test_a_faster_arm():
    rng = random.Random(5)
    faster = abstats.tpot_difference(*_simulated(rng, -0.05, launches=3), draws=300)
    assert faster["verdict"] == "faster with the patches" and faster["ci_pct"][1] < 0


def test_tpot_difference_refuses_an_empty_arm():
    with pytest.raises(ValueError, match="the on arm has no request TPOT"):
        abstats.tpot_difference([[[1.0, 2.0]]], [[[]]])


@pytest.mark.parametrize("repeats, expect", [
    (1, [("off", [0]), ("on", [0])]),
    (2, [("off", [0]), ("on", [0, 1]), ("off", [1])]),
    (3, [("off", [0]), ("on", [0, 1]), ("off", [1, 2]), ("on", [2])]),
])
def test_launch_schedule_interleaves_and_keeps_servers_warm(repeats, expect):
    assert validate.launch_schedule(repeats) == expect


@pytest.mark.parametrize("slowdown, verdict", [(5, "slower with the patches"), (0, "no difference detected")])
def test_the_runner_finds_a_known_slowdown_and_invents_none(files, tmp_path, slowdown, verdict):
    # The stand-in streams every token 5% slower in the 'on' arm (or not at all); 3 repeats per arm,
    # interleaved, 99% intervals (the same level both ways).
    port = free_port()
    out = tmp_path / "ab"
    args = runner_args(files, out, port, f"--token-ms 20 --slowdown-pct {slowdown}", num_prompts=6, output_len=8,
                       repeats=3, ci_level=0.99, profile_steps=0)
    proc = run_runner(args, {"SGLANG_HIP_DECODE_ANY_PLATFORM": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    tpot = results["verdict"]["tpot"]
    assert tpot["verdict"] == verdict, tpot
    assert tpot["launches"] == [2, 2] and tpot["repeats"] == [3, 3] and tpot["requests"] == [18, 18]
    assert tpot["level"] == 0.99
    if slowdown:
        assert 2.5 < tpot["change_pct"] < 7.5 and tpot["ci_pct"][0] > 0
    else:
        assert tpot["ci_pct"][0] <= 0 <= tpot["ci_pct"][1]
    assert results["schedule"] == [["off", [0]], ["on", [0, 1]], ["off", [1, 2]], ["on", [2]]]
    for arm in ("off", "on"):
        runs = results["arms"][arm]["repeats"]
        assert [r["repeat"] for r in runs] == [0, 1, 2] and all(len(r["tpots_ms"]) == 6 for r in runs)
    assert (out / "on" / "server.2.log").exists() and (out / "off" / "bench_serving.r2.jsonl").exists()
    report = (out / "report.md").read_text()
    assert f"**TPOT: {verdict}.**" in report
    assert "(99% interval, bootstrap over 2 / 2 server launches, their repeats and their 18 / 18 requests;" in report
    assert (out / "tpot_itl.png").stat().st_size > 10_000 and "![TPOT and ITL, off vs on](tpot_itl.png)" in report
    assert processes_on_port(port) == []

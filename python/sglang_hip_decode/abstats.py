"""Statistics of the A/B runner: is the TPOT difference between the arms real, is GSM8K above its threshold.

* **TPOT**: each request's time per output token, ``sum(itls) / (output_len - 1)`` from
  ``bench_serving --output-details`` (what bench_serving's own TPOT is, per request). The arms'
  difference is the change of the median request TPOT, ``(on - off) / off`` in percent, with a 95%
  interval from a bootstrap over the hierarchy the runs have: server launches drawn with replacement
  within each arm, then the repeats of each drawn launch, then their requests (so launch-to-launch
  drift widens the interval, not only the request-to-request spread). An interval that contains 0 is
  "no difference detected"; an arm with a single launch gets no verdict (its drift is unmeasured).
  With two or three launches per arm the bootstrap is coarse: treat a verdict near the edge as a
  reason for more repeats.
* **GSM8K**: the accuracy's 95% Wilson interval over the questions; against a threshold it is
  "pass" (the interval's lower end is at or above it), "fail" (its upper end is below it) or
  "inconclusive" (the threshold is inside the interval: more questions are needed to tell). The
  runner's gate (``passes``) stays the point estimate against the threshold: an accuracy below it fails
  even when the interval is inconclusive.

Pure Python (``random``, ``statistics``): the runner needs nothing beyond the standard library.
"""

from __future__ import annotations

import math
import random
import statistics


def request_tpots_ms(record: dict) -> list[float]:
    """Per-request TPOT in ms from one bench_serving ``--output-details`` record (requests with fewer
    than two output tokens have no TPOT and are left out, as bench_serving leaves them out)."""
    itls, lens = record.get("itls"), record.get("output_lens")
    if not isinstance(itls, list) or not isinstance(lens, list) or len(itls) != len(lens):
        raise ValueError("the bench_serving record has no per-request itls/output_lens (run it with --output-details)")
    return [sum(i) / (n - 1) * 1000.0 for i, n in zip(itls, lens) if n and n > 1 and i]


def _median_of_draw(launches: list[list[list[float]]], rng: random.Random) -> float:
    pooled = []
    for _ in launches:  # launches with replacement, then each drawn launch's repeats, then their requests
        launch = launches[rng.randrange(len(launches))]
        for _ in launch:
            repeat = launch[rng.randrange(len(launch))]
            pooled += [repeat[rng.randrange(len(repeat))] for _ in repeat]
    return statistics.median(pooled)


def tpot_difference(off: list[list[list[float]]], on: list[list[list[float]]], draws: int = 2000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """The median TPOT change from ``off`` to ``on``; each arm is its server launches, each launch its
    benchmark repeats, each repeat its requests' TPOTs (ms). With fewer than two launches in an arm
    the launch-to-launch drift is not measured: the interval is given, but no verdict."""
    for name, arm in (("off", off), ("on", on)):
        if not arm or not all(arm) or not all(r for launch in arm for r in launch):
            raise ValueError(f"the {name} arm has no request TPOT to compare")
    flat = lambda arm: [x for launch in arm for r in launch for x in r]  # noqa: E731
    m_off, m_on = statistics.median(flat(off)), statistics.median(flat(on))
    rng = random.Random(seed)
    diffs = sorted((_median_of_draw(on, rng) - (b := _median_of_draw(off, rng))) / b * 100.0 for _ in range(draws))
    tail = round((1 - level) / 2 * draws)
    lo, hi = diffs[tail], diffs[draws - 1 - tail]
    enough = min(len(off), len(on)) >= 2
    detected = enough and not (lo <= 0.0 <= hi)
    if not enough:
        verdict = "no verdict (an arm ran in one server launch: launch-to-launch drift is not measured; --repeats 3 or more)"
    elif detected:
        verdict = f"{'slower' if lo > 0 else 'faster'} with the patches"
    else:
        verdict = "no difference detected"
    return {"median_off_ms": m_off, "median_on_ms": m_on, "change_pct": (m_on - m_off) / m_off * 100.0,
            "ci_pct": [lo, hi], "level": level, "draws": draws, "launches": [len(off), len(on)],
            "repeats": [sum(map(len, off)), sum(map(len, on))], "requests": [len(flat(off)), len(flat(on))],
            "detected": detected, "verdict": verdict}


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of ``correct`` out of ``n``."""
    if n <= 0:
        raise ValueError("no questions")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def gsm8k_verdict(accuracy: float, questions: int, threshold: float | None) -> dict:
    """Accuracy, its interval, and pass / fail / inconclusive against ``threshold``."""
    lo, hi = wilson(round(accuracy * questions), questions)
    verdict = None if threshold is None else "pass" if lo >= threshold else "fail" if hi < threshold else "inconclusive"
    # the gate is never softer than the point estimate: below the threshold fails, whatever the interval
    passes = None if threshold is None else accuracy >= threshold
    return {"accuracy": accuracy, "questions": questions, "ci": [lo, hi], "threshold": threshold, "verdict": verdict,
            "passes": passes}

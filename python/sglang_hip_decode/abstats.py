"""Statistics of the A/B runner: is the TPOT difference between the arms real, is GSM8K above its threshold.

* **TPOT**: each request's time per output token, ``sum(itls) / (output_len - 1)`` from
  ``bench_serving --output-details`` (what bench_serving's own TPOT is, per request). The arms'
  difference is the change of the median request TPOT, ``(on - off) / off`` in percent, with a 95%
  interval from a two-level bootstrap: repeats drawn with replacement within each arm, then the
  requests within each drawn repeat (so run-to-run drift between server launches widens the
  interval, not only the request-to-request spread). An interval that contains 0 is "no difference
  detected".
* **GSM8K**: the accuracy's 95% Wilson interval over the questions; against a threshold it is
  "pass" (the interval's lower end is at or above it), "fail" (its upper end is below it) or
  "inconclusive" (the threshold is inside the interval: more questions are needed to tell).

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


def _median_of_draw(repeats: list[list[float]], rng: random.Random) -> float:
    pooled = []
    for _ in repeats:
        chosen = repeats[rng.randrange(len(repeats))]
        pooled += [chosen[rng.randrange(len(chosen))] for _ in chosen]
    return statistics.median(pooled)


def tpot_difference(off: list[list[float]], on: list[list[float]], draws: int = 2000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """The median TPOT change from ``off`` to ``on`` (each a list of repeats, each a list of request TPOTs)."""
    for name, arm in (("off", off), ("on", on)):
        if not arm or not all(arm):
            raise ValueError(f"the {name} arm has no request TPOT to compare")
    m_off = statistics.median(x for r in off for x in r)
    m_on = statistics.median(x for r in on for x in r)
    rng = random.Random(seed)
    diffs = sorted((_median_of_draw(on, rng) - (b := _median_of_draw(off, rng))) / b * 100.0 for _ in range(draws))
    lo = diffs[int(math.floor((1 - level) / 2 * draws))]
    hi = diffs[min(draws - 1, int(math.ceil((1 + level) / 2 * draws)) - 1)]
    detected = not (lo <= 0.0 <= hi)
    return {"median_off_ms": m_off, "median_on_ms": m_on, "change_pct": (m_on - m_off) / m_off * 100.0,
            "ci_pct": [lo, hi], "level": level, "draws": draws, "repeats": [len(off), len(on)],
            "requests": [sum(map(len, off)), sum(map(len, on))], "detected": detected,
            "verdict": (f"{'slower' if lo > 0 else 'faster'} with the patches" if detected else "no difference detected")}


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
    return {"accuracy": accuracy, "questions": questions, "ci": [lo, hi], "threshold": threshold, "verdict": verdict}

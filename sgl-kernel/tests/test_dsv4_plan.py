"""The DeepSeek-V4 prefill planner (``dsv4.plan``, host logic): its same-launch decision against a brute
force over every small (prefix, extend), for both ratios."""

from __future__ import annotations

import pytest

from sgl_hip_kernels.dsv4.plan import plan_prefill


def ring_overlap_brute_force(prefix, extend, ratio):
    """Does a kept row land on a ring slot that a block of the same chunk reads as an old row?
    Written out token by token: slot(t) = ((t // ratio) % pages, t % ratio)."""
    pages, overlap = (2, 4) if ratio == 4 else (1, 0)
    slot = lambda t: ((t // ratio) % pages, t % ratio)  # noqa: E731
    total = prefix + extend
    read = {slot(t) for n in range(prefix // ratio, total // ratio) for t in range(max(ratio * n - overlap, 0), prefix)}
    kept = range(max(prefix, ratio * (total // ratio) - overlap, 0), total)
    return any(slot(t) in read for t in kept)


@pytest.mark.parametrize("ratio", [4, 128])
def test_plan_same_launch_decision(ratio):
    """The planner puts the kept-row stores in the compress launch exactly when no store lands on a
    slot a block reads (the interpreter runs programs in order, so a wrong 'yes' would not show as
    a race there: the decision itself is checked against the brute force, for every small case)."""
    lens = range(0, 3 * ratio + 6) if ratio == 4 else [0, 1, 3, 100, 127, 128, 129, 200, 255, 256, 300]
    for prefix in lens:
        for extend in lens:
            plan = plan_prefill([prefix], [extend], ratio)
            assert plan.writes_in_same_launch == (not ring_overlap_brute_force(prefix, extend, ratio)), (prefix, extend)
    assert not plan_prefill([6], [6], 4).writes_in_same_launch and plan_prefill([0], [6], 4).writes_in_same_launch

"""The convergence check every run stores: validation loss over the last fifth of training."""

from __future__ import annotations

import pytest

from sparseroute.train.loop import CONVERGENCE_FLAG, convergence, convergence_steps


def test_the_check_measures_inside_the_last_fifth():
    assert convergence_steps(100) == [80, 90]
    assert convergence_steps(15) == [12, 14]
    assert convergence_steps(1) == convergence_steps(2) == []  # nothing before the end
    for steps in range(2, 300):
        got = convergence_steps(steps)
        assert all(0.8 * steps - 1 <= s < steps for s in got)


def test_slope_change_and_flag():
    falling = convergence([[80, 3.3], [90, 3.2]], 100, 3.1)
    assert falling["points"] == [[80, 3.3], [90, 3.2], [100, 3.1]]
    # loss against the share of training: -0.2 per 0.2 of a run, i.e. -1 per run, over the final loss
    assert falling["relative_slope"] == pytest.approx(-1.0 / 3.1)
    assert falling["relative_change"] == pytest.approx(-0.2 / 3.3)
    assert falling["still_falling"]
    flat = convergence([[80, 3.1], [90, 3.1 * (1 - CONVERGENCE_FLAG / 4)]], 100, 3.1 * (1 - CONVERGENCE_FLAG / 2))
    assert not flat["still_falling"] and flat["relative_slope"] < 0
    assert convergence([], 1, 3.0) is None  # one point: no slope
    assert convergence([[10, 2.0]], 10, 2.0) is None  # the same step twice is one point
